"""Everything is declared in setup.cfg; this file only adds the one file setup.cfg cannot declare."""
import os

from setuptools import setup
from setuptools.command.build_py import build_py

# Installed at the top of site-packages, where Python's ``site`` runs its line at interpreter start: it imports
# the tiny vmamba_zoo_timm_hint module (no torch, no timm), which makes timm's unknown-model error for a zoo
# name say to ``import vmamba_zoo``.
# Guarded: a .pth file that outlives the package (an editable install's is written beside it, outside the wheel's
# record) must not make every interpreter start print an import error.
TIMM_HINT_PTH = ('vmamba_zoo_timm_hint.pth',
                 "import importlib.util as u; u.find_spec('vmamba_zoo_timm_hint') and __import__('vmamba_zoo_timm_hint')\n")


class build_py_with_timm_hint(build_py):
    def run(self):
        super().run()
        # A wheel holds build_lib; an editable wheel (pip install -e) holds the install folder instead.
        folder = self.get_finalized_command('install').install_lib if self.editable_mode else self.build_lib
        name, line = TIMM_HINT_PTH
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, name), 'w') as f:
            f.write(line)


setup(cmdclass={'build_py': build_py_with_timm_hint})
