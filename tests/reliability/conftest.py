"""Helpers of the reliability tests: tiny in-process training runs (``test_resnet``, 16-pixel digits)."""
import pytest

from ..tools.tool_runner import load_tool

TINY = ['--model', 'test_resnet', '--img-size', '16', '--batch-size', '64', '--no-model-ema', '--log-interval', '1',
        '--checkpoint-interval', '0', '--checkpoint-hist', '3']  # numbered epoch checkpoints to resume from


@pytest.fixture(scope='module')
def train():
    return load_tool('train')


@pytest.fixture
def run_train(train, capsys):
    """``run_train(*argv)`` -> (exit status, stderr): tools/train.py's main in this process, as run_tool runs it."""

    def run(*argv):
        code = train.run_tool(train.main, [str(a) for a in (*TINY, *argv)])
        return code, capsys.readouterr().err
    return run
