"""``toolkit.evaluation`` under its former name, for scripts that still import it so (the same module object)."""
import sys

from toolkit import evaluation

sys.modules[__name__] = evaluation
