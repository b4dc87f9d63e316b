"""Fixtures shared by the tools' tests."""
import pytest

from .tool_runner import assert_ok, run_script


@pytest.fixture(scope='session')
def digits_run(tmp_path_factory):
    """A short embedded-digits training run of a small timm model, shared by the tests that need a trained model."""
    out = tmp_path_factory.mktemp('digits_run')
    proc = run_script('train.py', '--model', 'test_resnet', '--img-size', '24', '--epochs', '2',
                      '--batch-size', '32', '--lr', '2e-3', '--model-ema', '--model-ema-decay', '0.9',
                      '--output', out)
    assert_ok(proc)
    return out, proc
