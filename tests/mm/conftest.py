"""The MMDetection / MMSegmentation tests need mmengine, mmcv 2.1.0 with its compiled ops, mmdet and mmseg.

Without them the whole folder is reported as one skipped test whose reason says how to install them (rather
than five collection errors). Where they must be present (CI sets VMAMBA_ZOO_REQUIRE_MM=1), a missing one
is not skipped: the imports fail loudly.
"""
import importlib
import logging
import os
import pathlib

import pytest

ZOO_FAMILIES = ('vmamba', 'spatialmamba', 'efficientvmamba', 'groupmamba', 'mambamixer', 'plainmamba')
MM_MODULES = {'mmengine': 'mmengine', 'mmcv._ext': 'mmcv 2.1.0 with ops', 'mmdet': 'mmdet', 'mmseg': 'mmseg'}
HOW_TO_INSTALL = ("pip install -c constraints.txt --find-links ../shared/wheels -e '.[mm]' "
                  "(with a prebuilt mmcv wheel there), else `bash tools/install_mmcv.sh` first "
                  "(builds mmcv, about 46 minutes on 2 cores); `make test BUILD_MMCV=1` does both")


def _missing_mm():
    missing = []
    for module, name in MM_MODULES.items():
        try:
            importlib.import_module(module)
        except Exception:  # an mmcv without ops, or one built for another torch, fails here too
            missing.append(name)
    return missing


MISSING = [] if os.environ.get('VMAMBA_ZOO_REQUIRE_MM') == '1' else _missing_mm()

if MISSING:
    collect_ignore_glob = ['test_*.py']

    class _MmMissing(pytest.Item):
        def runtest(self):
            pytest.skip(f"tests/mm need {', '.join(MISSING)}: {HOW_TO_INSTALL}")

        def reportinfo(self):
            return self.path, None, 'tests/mm'

    class _MmFolder(pytest.File):
        def collect(self):
            yield _MmMissing.from_parent(self, name='mm_stack_not_installed')

    def pytest_collect_file(file_path, parent):
        if file_path == pathlib.Path(__file__).with_name('__init__.py'):
            return _MmFolder.from_parent(parent, path=file_path)
        return None


@pytest.fixture(scope='session', autouse=True)
def zoo_models():
    """Register the zoo's timm models and the mm backbones (custom_imports does this for Runner)."""
    if MISSING:
        return
    os.environ.setdefault('OMP_NUM_THREADS', '1')
    for family in ZOO_FAMILIES:
        importlib.import_module(f'vmamba_zoo.models.{family}')
    importlib.import_module('vmamba_zoo.mm')
    from mmengine.logging import MMLogger
    # Detector init_weights logs one line per parameter; keep CI logs readable.
    MMLogger.get_instance('mmengine').setLevel(logging.WARNING)
