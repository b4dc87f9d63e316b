"""``toolkit.image_data`` under its former name, for scripts that still import it so (the same module object)."""
import sys

from toolkit import image_data

sys.modules[__name__] = image_data
