"""``toolkit.checkpoint_io`` under its former name, for scripts that still import it so (the same module object)."""
import sys

from toolkit import checkpoint_io

sys.modules[__name__] = checkpoint_io
