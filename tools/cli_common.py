"""``toolkit.cli`` under its former name, for scripts that still import it so (the same module object)."""
import sys

from toolkit import cli

sys.modules[__name__] = cli
