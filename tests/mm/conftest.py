import importlib
import logging
import os

import pytest

ZOO_FAMILIES = ('vmamba', 'spatialmamba', 'efficientvmamba', 'groupmamba', 'mambamixer', 'plainmamba')


@pytest.fixture(scope='session', autouse=True)
def zoo_models():
    """Register the zoo's timm models and the mm backbones (custom_imports does this for Runner)."""
    os.environ.setdefault('OMP_NUM_THREADS', '1')
    for family in ZOO_FAMILIES:
        importlib.import_module(f'vmamba_zoo.models.{family}')
    importlib.import_module('vmamba_zoo.mm')
    from mmengine.logging import MMLogger
    # Detector init_weights logs one line per parameter; keep CI logs readable.
    MMLogger.get_instance('mmengine').setLevel(logging.WARNING)
