"""A zoo model name given to ``timm.create_model`` before ``import vmamba_zoo`` says to import it.

timm only knows the zoo's models once ``import vmamba_zoo`` has registered them; without it, timm's error for
``timm.create_model('groupmamba_tiny')`` is the one a typo gets ("Unknown model"). timm (1.0.29 to 1.0.31) has no
plugin or entry-point hook for its model registry, so the package installs ``vmamba_zoo_timm_hint.pth`` beside
itself: Python's ``site`` runs its one line, ``import vmamba_zoo_timm_hint``, at interpreter start. This module
then imports nothing (no torch, no timm, no vmamba_zoo): it waits for ``timm`` to be imported and wraps
``timm.create_model`` so that its "Unknown model" error for a name of a zoo family ends with the hint. Other
names keep timm's error as it was.
"""
import sys

# The name prefixes of vmamba_zoo's families (tests/models/test_timm_api.py holds them to the registry).
ZOO_PREFIXES = ("plainmamba_", "efficientvmamba_", "spatialmamba_", "groupmamba_", "vim2_", "vmamba_")


def hint(model_name: str):
    """The hint for an unknown ``model_name`` (a pretrained tag after '.' allowed), or None if no zoo family
    names its models so."""
    name = str(model_name).split(".", 1)[0]
    if not name.startswith(ZOO_PREFIXES):
        return None
    return f"{name} is a vmamba_zoo model name: `import vmamba_zoo` registers the zoo's models with timm"


def wrap_create_model(timm) -> None:
    """Give ``timm.create_model`` (and its aliases in ``timm.models``) the hint on its unknown-model error."""
    import functools

    create_model = timm.models.create_model
    if getattr(create_model, "zoo_hint", False):
        return

    @functools.wraps(create_model)
    def create_model_with_zoo_hint(model_name, *args, **kwargs):
        try:
            return create_model(model_name, *args, **kwargs)
        except RuntimeError as e:
            tip = hint(model_name) if str(e).startswith("Unknown model") else None
            if tip is None:
                raise
            e.args = (f"{e.args[0]}: {tip}",) + e.args[1:]
            raise

    create_model_with_zoo_hint.zoo_hint = True
    for module in (timm, timm.models, sys.modules.get("timm.models._factory")):
        if module is not None and getattr(module, "create_model", None) is create_model:
            module.create_model = create_model_with_zoo_hint


class _WrapAfterTimmImport:
    """A meta-path finder that answers only for ``timm``: it hands back the spec the other finders give, with a
    loader that wraps ``create_model`` once timm's ``__init__`` has run. It leaves the import system only then, as
    a ``find_spec('timm')`` that only asks whether timm is installed executes nothing."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "timm":
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None) if finder is not self else None
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_wrap(module):
            exec_module(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            wrap_create_model(module)

        spec.loader.exec_module = exec_then_wrap
        return spec


def install() -> None:
    """Wrap now if timm is imported already, else when it is."""
    if "timm" in sys.modules and hasattr(sys.modules["timm"], "models"):
        wrap_create_model(sys.modules["timm"])
    elif not any(isinstance(f, _WrapAfterTimmImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _WrapAfterTimmImport())


install()
