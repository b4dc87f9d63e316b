"""Command-line plumbing shared by the tools in this folder.

- bad arguments end the program with ONE line on stderr and exit status 2, never a traceback;
- a YAML recipe (``--config``) sets defaults that command-line flags override;
- models are looked up in timm's registry after importing ``vmamba_zoo`` (which registers the zoo).

The tools are scripts (``python tools/train.py``); they import this module as ``toolkit.cli``.
"""
import argparse
import difflib
import os
import re
import sys
from typing import Callable, Dict, Iterable, List, Optional, Sequence

__all__ = [
    'UsageError', 'ToolArgumentParser', 'run_tool', 'parse_args_with_config', 'import_zoo', 'require_model',
    'zoo_model_names', 'zoo_families', 'resolve_models', 'create_model', 'family_module', 'parse_csv_list',
    'git_commit',
]


class UsageError(Exception):
    """A bad argument or missing input: reported as one line, exit status 2."""


class ToolArgumentParser(argparse.ArgumentParser):
    """argparse, but errors are one line (``prog: error: ...``) instead of usage + error."""

    def error(self, message):
        raise UsageError(f'{message} (see --help)')


def run_tool(main: Callable[[Optional[Sequence[str]]], Optional[int]], argv: Optional[Sequence[str]] = None) -> int:
    """Run ``main(argv)``; a UsageError becomes one stderr line and exit status 2."""
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else 'tool'
    try:
        return int(main(argv) or 0)
    except UsageError as e:
        print(f'{prog}: error: {e}', file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f'{prog}: interrupted', file=sys.stderr, flush=True)
        return 130


def _coerce(action: argparse.Action, value):
    """YAML gives strings for values such as ``5e-4`` (YAML 1.1); convert with the option's own type."""
    if value is None or action.type is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_coerce(action, v) for v in value]
    if isinstance(value, str) or action.type in (float,) and isinstance(value, int):
        try:
            return action.type(value)
        except (TypeError, ValueError) as e:
            raise UsageError(f'config value {action.dest}={value!r} is not a valid {action.type.__name__}') from e
    return value


def load_yaml_config(path: str, parser: argparse.ArgumentParser) -> Dict[str, object]:
    """Read a recipe: a flat mapping of option names (``lr_base`` or ``lr-base``) to values."""
    import yaml
    if not os.path.isfile(path):
        raise UsageError(f'config file not found: {path}')
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise UsageError(f'config file {path} is not valid YAML: {str(e).splitlines()[0]}') from e
    if not isinstance(cfg, dict):
        raise UsageError(f'config file {path} must hold a mapping of option names to values')
    actions = {a.dest: a for a in parser._actions if a.dest not in ('help', argparse.SUPPRESS)}
    out = {}
    for key, value in cfg.items():
        dest = str(key).replace('-', '_')
        if dest not in actions or dest == 'config':
            close = difflib.get_close_matches(dest, list(actions), n=1)
            hint = f' (did you mean {close[0]}?)' if close else ''
            raise UsageError(f'unknown option {key!r} in config file {path}{hint}')
        action = actions[dest]
        value = _coerce(action, value)
        if action.choices is not None and value is not None and value not in action.choices:
            raise UsageError(f'config value {dest}={value!r} is not one of {list(action.choices)}')
        out[dest] = value
    return out


def parse_args_with_config(
        parser: argparse.ArgumentParser,
        argv: Optional[Sequence[str]],
        presets: Optional[Callable[[Dict[str, object]], Dict[str, object]]] = None,
) -> argparse.Namespace:
    """Resolve options: parser defaults < presets(partial) < YAML config < command line.

    ``presets`` receives the options known so far (defaults + config + command line) and returns defaults that depend
    on them (e.g. settings suited to the embedded dataset); anything set in the config or on the command line wins.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser.add_argument('--config', '-c', default=None, metavar='FILE.yaml',
                        help='YAML recipe (e.g. configs/imagenet/<model>.yaml); command-line flags override it')
    pre, _ = parser.parse_known_args(argv)  # malformed flags raise UsageError here
    cfg = load_yaml_config(pre.config, parser) if pre.config else {}
    if presets is not None:
        known = vars(pre).copy()
        known.update(cfg)
        known.update(explicit_args(parser, argv))
        parser.set_defaults(**presets(known))
    parser.set_defaults(**cfg)
    args = parser.parse_args(argv)
    return args


def explicit_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> Dict[str, object]:
    """Only the options given on the command line (parsed with every default suppressed)."""
    saved_defaults = [(a, a.default) for a in parser._actions]
    saved_parser_defaults = parser._defaults
    try:
        for a in parser._actions:
            a.default = argparse.SUPPRESS
        parser._defaults = {}
        ns, _ = parser.parse_known_args(argv)
    finally:
        for a, d in saved_defaults:
            a.default = d
        parser._defaults = saved_parser_defaults
    return vars(ns)


def parse_csv_list(value: Optional[str]) -> List[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        items = []
        for v in value:
            items.extend(parse_csv_list(v))
        return items
    return [v.strip() for v in str(value).split(',') if v.strip()]


_ZOO_IMPORTED = None


def import_zoo() -> bool:
    """Import ``vmamba_zoo`` so that its models are registered with timm. False if it is not installed."""
    global _ZOO_IMPORTED
    if _ZOO_IMPORTED is None:
        try:
            import vmamba_zoo  # noqa: F401  (registers the zoo's models with timm)
            _ZOO_IMPORTED = True
        except ModuleNotFoundError as e:
            if e.name not in ('vmamba_zoo',):
                raise
            _ZOO_IMPORTED = False
    return _ZOO_IMPORTED


def zoo_model_names() -> List[str]:
    """Every model registered by ``vmamba_zoo`` (all families), sorted."""
    import timm
    from timm.models import model_entrypoint as get_model_entrypoint
    import_zoo()
    names = []
    for name in timm.list_models():
        fn = get_model_entrypoint(name)
        if getattr(fn, '__module__', '').startswith('vmamba_zoo.'):
            names.append(name)
    return sorted(names)


def zoo_families() -> Dict[str, List[str]]:
    """{family module short name (e.g. 'plainmamba'): [model names]} for the registered zoo models."""
    from timm.models import model_entrypoint as get_model_entrypoint
    families: Dict[str, List[str]] = {}
    for name in zoo_model_names():
        module = get_model_entrypoint(name).__module__.rsplit('.', 1)[-1]
        families.setdefault(module, []).append(name)
    return families


def require_model(name: str) -> None:
    """UsageError unless ``name`` (optionally with a pretrained tag) is a registered timm or zoo model."""
    import timm
    zoo_registered = import_zoo()
    if not name or not timm.is_model(name):
        choices = timm.list_models()
        close = difflib.get_close_matches(str(name), choices, n=3)
        hint = f'; did you mean {", ".join(close)}?' if close else ''
        if not zoo_registered:  # the zoo's own names are unknown too: say why
            hint += ('; vmamba_zoo is not installed, so none of its models is registered with timm '
                     '(`make install` or `pip install -e .` in the clone)')
        raise UsageError(f'unknown model {name!r}{hint}')


TINY_PATTERN = re.compile(r'(tiny|_t$|_t_|_l1$)')


def zoo_tiny_models() -> List[str]:
    """The smallest model of each zoo family (its tiny variant): the tools' 'zoo-tiny' selection."""
    names = []
    for family, members in sorted(zoo_families().items()):
        tiny = [n for n in members if TINY_PATTERN.search(n)]
        names.extend(tiny or sorted(members)[:1])
    return names


def resolve_models(spec: str, groups: Optional[Dict[str, Callable[[], List[str]]]] = None,
                   nothing: str = 'no models selected') -> List[str]:
    """The models a comma-separated ``--models`` value names, in order and without repeats: 'zoo' (every zoo
    model), a name in ``groups`` (a tool's own selections), a zoo family (its models) or a timm model name."""
    import_zoo()
    families = zoo_families()
    groups = groups or {}
    names = []
    for item in parse_csv_list(spec):
        if item == 'zoo':
            names.extend(zoo_model_names())
        elif item in groups:
            names.extend(groups[item]())
        elif item in families:
            names.extend(families[item])
        else:
            require_model(item)
            names.append(item)
    if not names:
        raise UsageError(nothing)
    return list(dict.fromkeys(names))


def create_model(name: str, img_size: Optional[int] = None, **kwargs):
    """timm.create_model, passing ``img_size`` only to models whose constructor takes it."""
    import timm
    require_model(name)
    if img_size is not None:
        try:
            return timm.create_model(name, img_size=img_size, **kwargs)
        except TypeError as e:
            if 'img_size' not in str(e):
                raise
    return timm.create_model(name, **kwargs)


def family_module(model):
    """The module that defines the model's class (where a family's ``checkpoint_filter_fn`` lives)."""
    return sys.modules.get(type(model).__module__)


def git_commit(default: str = 'unknown') -> str:
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
    try:
        out = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=root, capture_output=True, text=True,
                             timeout=10)
        commit = out.stdout.strip()
        if not commit:
            return default
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ('+dirty' if dirty else '')
    except (OSError, subprocess.SubprocessError):
        return default


def parse_key_values(items: Iterable[str]) -> Dict[str, object]:
    """``['a=1', 'b=x']`` → {'a': 1, 'b': 'x'} with YAML typing of each value."""
    import yaml
    out = {}
    for item in items or []:
        if '=' not in item:
            raise UsageError(f'expected key=value, got {item!r}')
        k, v = item.split('=', 1)
        out[k.strip()] = yaml.safe_load(v)
    return out
