"""Tiles of the fused kernels and their tuners: which tile configurations each kernel may run with, which of
them fit a problem, and the tuners that pick one. The launches are in ``launches.py``.

A tuner picks a tile per problem (its key: the tuner's key arguments and the dtypes of its tensor arguments), by
``VMAMBA_KERNELS_TUNE``:
- unset (the default): the committed tile table, ``tile_table.json``, keyed by GPU family ("sm90") and problem;
  a problem it lacks runs the first fitting tile. No tuning runs, so a fresh process starts in seconds.
- ``1``: Triton's tuning runs, timing every fitting tile at a problem's first call (a minute or two per model).
  ``tools/tune_tiles.py`` runs models this way and merges the winners into the table.
- ``0``: the first fitting tile, table ignored.
"""
import functools
import json
import os
import tempfile
from typing import Dict, Iterable, Optional

import triton
from triton.runtime.autotuner import Autotuner

from ..graphs import capturing
from . import scan, scan_n1, scan_steps

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------------------
# The tile table and the tuners that read it

TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tile_table.json")
TABLE_FORMAT = 1


def tune_mode() -> str:
    """"table" (the default), "tune" (VMAMBA_KERNELS_TUNE=1) or "first" (VMAMBA_KERNELS_TUNE=0)."""
    return _mode["tune"]


def set_tune_mode(mode: str) -> None:
    """Switch how tuners pick tiles ("table", "tune" or "first"), forgetting the tiles picked so far."""
    if mode not in ("table", "tune", "first"):
        raise ValueError(f"tune mode must be 'table', 'tune' or 'first', got {mode!r}")
    _mode["tune"] = mode
    for tuner in TUNERS.values():
        tuner.cache.clear()
    _table_labels.cache_clear()
    bwd_block_d_candidates.cache_clear()
    n1_bwd_block_d_candidates.cache_clear()


def tuning_runs() -> bool:
    """Whether a problem's first call times tiles (with host syncs, which a CUDA graph capture forbids)."""
    return _mode["tune"] == "tune"


def config_label(cfg) -> str:
    """A tile's name in the table: its constexprs, warps and register cap, e.g. "BD=16,num_warps=8"."""
    parts = [f"{k}={cfg.kwargs[k]}" for k in sorted(cfg.kwargs)] + [f"num_warps={cfg.num_warps}"]
    if cfg.maxnreg is not None:
        parts.append(f"maxnreg={cfg.maxnreg}")
    return ",".join(parts)


def table_key(names: Iterable[str], values: Iterable, dtypes: Iterable[str]) -> str:
    """A problem's name in the table: the tuner's key arguments by name, then the distinct dtypes of its
    tensor arguments, e.g. "CPG=96,K=4,...;bfloat16+float32"."""
    named = ",".join(f"{n}={v}" for n, v in zip(names, values))
    return named + ";" + "+".join(sorted({str(d).replace("torch.", "") for d in dtypes}))


def parse_table_key(key: str):
    """(key arguments as strings by name, dtypes) of a ``table_key``."""
    named, _, dtypes = key.partition(";")
    values = dict(part.split("=", 1) for part in named.split(",") if part)
    return values, tuple(dtypes.split("+")) if dtypes else ()


def cache_key_to_table_key(tuner, key: tuple) -> Optional[str]:
    """A tuner cache key (Triton's: the key arguments' values, then the dtypes of the tensor arguments, which
    Triton 3.6 and 3.8 both append) as a ``table_key``; None for a key of another shape."""
    n = len(tuner.keys)
    if len(key) < n:
        return None
    return table_key(tuner.keys, key[:n], key[n:])


def tuned_entries(tuner) -> Dict[str, str]:
    """{table_key: config_label} of every problem the tuner has picked a tile for."""
    out = {}
    for key, cfg in tuner.cache.items():
        name = cache_key_to_table_key(tuner, key)
        if name is not None:
            out[name] = config_label(cfg)
    return out


def empty_table() -> dict:
    return {"format": TABLE_FORMAT,
            "about": "Tiles picked by tuning runs (tools/tune_tiles.py), by GPU family, kernel and problem; "
                     "read by vmamba_kernels.triton.tiles.",
            "gpus": {}}


def merge_entries(table: dict, family: str, kernel: str, entries: Dict[str, str], measured: Optional[dict] = None):
    """``table`` with ``entries`` of ``kernel`` on ``family`` added (a problem already there takes the new
    tile); other kernels and GPU families are kept. Returns a new dict."""
    table = json.loads(json.dumps(table)) if table else empty_table()
    if table.get("format") != TABLE_FORMAT:
        raise ValueError(f"tile table format {table.get('format')!r}, expected {TABLE_FORMAT}")
    gpu = table["gpus"].setdefault(family, {"measured": {}, "kernels": {}})
    gpu["kernels"].setdefault(kernel, {}).update(entries)
    gpu["kernels"][kernel] = dict(sorted(gpu["kernels"][kernel].items()))
    if measured:
        gpu["measured"].update(measured)
    table["gpus"] = dict(sorted(table["gpus"].items()))
    return table


def write_table(table: dict, path: str = TABLE_PATH) -> None:
    """Write atomically: a reader sees the old table or the new one, never a part."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tile_table.", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(table, f, indent=1, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_table(path: str = TABLE_PATH) -> dict:
    if not os.path.exists(path):
        return empty_table()
    with open(path) as f:
        table = json.load(f)
    if table.get("format") != TABLE_FORMAT:
        raise ValueError(f"{path}: tile table format {table.get('format')!r}, expected {TABLE_FORMAT}")
    return table


_loaded = {}


def _table() -> dict:
    if "table" not in _loaded:
        _loaded["table"] = read_table(TABLE_PATH)
    return _loaded["table"]


def use_table(table: Optional[dict] = None) -> None:
    """Pick tiles from ``table`` (None: the committed file), forgetting the tiles picked so far."""
    _loaded.clear()
    if table is not None:
        _loaded["table"] = table
    set_tune_mode(_mode["tune"])


def table_label(kernel: str, family: str, key: str) -> Optional[str]:
    """The table's tile for a problem, or None."""
    return _table()["gpus"].get(family, {}).get("kernels", {}).get(kernel, {}).get(key)


@functools.lru_cache(maxsize=None)
def _table_labels(kernel: str, values: tuple) -> frozenset:
    """The tiles the table names, on any GPU family, for problems with these key argument values."""
    want = {n: str(v) for n, v in values}
    found = set()
    for gpu in _table()["gpus"].values():
        for key, label in gpu.get("kernels", {}).get(kernel, {}).items():
            named, _ = parse_table_key(key)
            if all(named.get(n) == v for n, v in want.items()):
                found.add(label)
    return frozenset(found)


def _may_run(tuner, fitting, **values):
    """Of a problem's fitting tiles, those its tuner may run with: all where tuning runs; else the first and
    the ones the table names for problems with these key values (the backward sizes its workspaces for the
    narrowest of them)."""
    if _mode["tune"] == "tune":
        return fitting
    if _mode["tune"] == "first":
        return fitting[:1]
    labels = _table_labels(tuner.base_fn.__name__, tuple(sorted(values.items())))
    return fitting[:1] + [c for c in fitting[1:] if config_label(c) in labels]


_families = {}


def gpu_family(device) -> str:
    """"sm90" for an H100 or H200: the table's GPU key."""
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _families:
        major, minor = torch.cuda.get_device_capability(index)
        _families[index] = f"sm{major}{minor}"
    return _families[index]


class TableTuner(Autotuner):
    """Triton's Autotuner, tuning only where ``tuning_runs()`` (and never inside a CUDA graph capture).
    Otherwise a problem's first call takes the table's tile, or the first fitting one, without timing runs:
    Triton 3.6's Autotuner times a problem's tiles even where one is left."""

    def run(self, *args, **kwargs):
        if len(self.configs) <= 1:
            return super().run(*args, **kwargs)
        all_args = {**dict(zip(self.arg_names, args)), **kwargs}
        key = self.problem_key(all_args)
        config = self.cache.get(key)
        if config is None:
            if _mode["tune"] == "tune" and not capturing():
                return super().run(*args, **kwargs)
            config = self.pick(all_args, key)
            if _mode["tune"] != "tune":  # a tile picked during a capture is tuned at the next call outside one
                self.cache[key] = config
        self.best_config = config
        return self.fn.run(*args, **kwargs, **config.all_kwargs())

    def problem_key(self, all_args) -> tuple:
        """Triton's cache key of the problem (``Autotuner.run`` builds the same)."""
        names = self.__dict__.get("_arg_set")
        if names is None:
            names = self._arg_set = frozenset(self.arg_names)
        key = [all_args[k] for k in self.keys if k in all_args]
        key += [str(v.dtype) for k, v in all_args.items() if k in names and hasattr(v, "dtype")]
        return tuple(key)

    def pick(self, all_args, key, family: Optional[str] = None):
        """The table's tile for the problem where it names a fitting one, else the first fitting tile."""
        fitting = self.early_config_prune(self.configs, {}, **all_args)
        if _mode["tune"] != "first":
            if family is None:
                device = next((v.device for v in all_args.values() if hasattr(v, "device")), None)
                family = gpu_family(device) if device is not None and device.type == "cuda" else "cpu"
            label = table_label(self.base_fn.__name__, family, cache_key_to_table_key(self, key))
            for cfg in fitting:
                if label is not None and config_label(cfg) == label:
                    return cfg
        return fitting[0]


def _tuner(configs, key, prune_configs_by):
    """``triton.autotune`` with a ``TableTuner`` (the class swapped after construction: Autotuner's
    constructor differs between Triton versions)."""

    def wrap(fn):
        tuner = triton.autotune(configs=configs, key=key, prune_configs_by=prune_configs_by)(fn)
        tuner.__class__ = TableTuner
        return tuner

    return wrap


# A plain integer helper: triton.next_power_of_2 is a constexpr function in Triton 3.8, whose calls from Python
# cost microseconds each, and the launchers call it a few dozen times per op.
def next_pow2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()


def chunk_size(N: int) -> int:
    """Steps per saved chunk state (= the backward's chunk): the [steps, channels, states] tiles stay
    near 2048 elements. Small under the interpreter, whose scans run element by element."""
    if INTERPRET:
        return 4
    return max(16, min(64, 2048 // (8 * next_pow2(N))))


def bwd_block_d(CPG: int, N: int) -> int:
    if INTERPRET:
        return min(8, next_pow2(CPG))
    return max(1, min(next_pow2(CPG), 2048 // (chunk_size(N) * next_pow2(N))))


# --------------------------------------------------------------------------------------------------
# Tiles and tuners (plain launches with a fixed tile under the interpreter)

# (BT, BD, num_warps, prefetch, vectorized channels): the first four that fit a problem are tried.
FWD_TILES = [(64, 32, 4, True, True), (32, 32, 4, True, True), (64, 32, 4, True, False), (128, 16, 4, True, True),
              (64, 16, 4, True, True), (16, 16, 8, True, True), (32, 16, 8, True, True), (16, 16, 8, False, True),
              (16, 16, 8, True, False), (8, 16, 4, True, True), (16, 8, 4, True, True)]
# Register-lean tiles, tried as well where they fit: without software prefetching (one set of loop-carried
# tiles) and with a register cap. Most tiles above use 241-255 registers per thread, which allows 8 warps
# per SM; 168 allows 12 and 128 allows 16 (`python tools/bench_kernels.py --registers` shows each tile's
# registers and spills). (BT, BD, num_warps, prefetch, vectorized channels, register cap)
FWD_LEAN_TILES = [(64, 16, 4, False, True, None), (128, 16, 4, False, True, None), (64, 16, 4, False, True, 128)]
TUNE_MODES = {"1": "tune", "0": "first"}  # anything else: "table"
_mode = {"tune": TUNE_MODES.get(os.environ.get("VMAMBA_KERNELS_TUNE", ""), "table")}


def prune_fwd(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    BN, CPG, save_t = args["BN"], args["CPG"], args["SAVE_T"]

    def fits(cfg):
        BT, BD = cfg.kwargs["BT"], cfg.kwargs["BD"]
        return (BD <= max(8, next_pow2(CPG)) and 256 <= BT * BD * BN <= 4096
                and not (args["SAVE_CHUNKS"] and BT > save_t))

    main, lean = configs[:len(FWD_TILES)], configs[len(FWD_TILES):]
    keep = [cfg for cfg in main if fits(cfg)]
    if not keep:  # the smallest tile always fits
        keep = [min(main, key=lambda c: c.kwargs["BT"] * c.kwargs["BD"])]
    return keep[:4] + [cfg for cfg in lean if fits(cfg)]


def even_flags(args):
    return {"EVEN_D": args["CPG"] % args["BD"] == 0,
            "EVEN_T": not args["GATHER"] and args["Lr"] % args["BT"] == 0}


# No reset_to_zero: outputs are overwritten (read-add-store merges are idempotent with first-visit flags);
# the atomic merge, which accumulates, is launched with a fixed tile instead.
fwd_tuner = _tuner(
    configs=[triton.Config({"BT": bt, "BD": bd, "PREFETCH": pf, "VEC": vec}, num_warps=w, maxnreg=cap)
             for bt, bd, w, pf, vec, cap in [t + (None,) for t in FWD_TILES] + FWD_LEAN_TILES],
    key=["CPG", "N", "K", "BN", "OUT_MODE", "MERGE", "GATHER", "HAS_Z", "HAS_D", "SAVE_CHUNKS"],
    prune_configs_by={"early_config_prune": prune_fwd},
)(triton.heuristics({"EVEN_D": lambda a: even_flags(a)["EVEN_D"], "EVEN_T": lambda a: even_flags(a)["EVEN_T"]})(
    scan.selective_scan_fwd_kernel))


# d_state-1 route scan (scan_n1.py): (TT steps per thread, LT segments, BD channels, VEC channels per thread,
# num_warps, prefetch, register cap). Channels take BD / VEC lanes and segments the other lanes and the warps, so
# (BD / VEC)·LT = 32·num_warps. The kernel is bound by issuing instructions (model_cards/benchmarks/kernels.md):
# wider channel vectors share each step's position, B, C and mask work over more channels, and a cap of 168
# registers lets three 4-warp programs share an SM instead of two, for a few spilled registers. The list holds
# the fastest of sweeps on an H200: VMamba-T's stage 1, then its later stages, then GroupMamba-T's stage 1.
N1_TILES = [(4, 16, 32, 4, 4, True, 168), (4, 8, 32, 4, 2, True, 168), (4, 16, 16, 2, 4, True, None),
             (4, 8, 32, 2, 4, True, None), (2, 16, 16, 4, 2, True, None), (4, 8, 16, 2, 2, True, None),
             (8, 4, 32, 2, 2, True, None)]


def _fewest_channels(configs):
    """Tuners must keep a config: where every tile's channel block is wider than the channels, the narrowest."""
    return [min(configs, key=lambda c: c.kwargs["BD"])]


def prune_n1(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    fits = [c for c in configs if not (args["SAVE_CHUNKS"] and c.kwargs["TT"] > args["SAVE_T"])]
    keep = [c for c in fits if c.kwargs["BD"] <= max(8, next_pow2(args["CPG"]))] or _fewest_channels(fits)
    return keep


def even_flags_n1(args):
    return {"EVEN_D": args["CPG"] % args["BD"] == 0, "EVEN_T": args["Lr"] % (args["TT"] * args["LT"]) == 0}


n1_tuner = _tuner(
    configs=[triton.Config({"TT": tt, "LT": lt, "BD": bd, "VEC": vec, "PREFETCH": pf}, num_warps=w, maxnreg=cap)
             for tt, lt, bd, vec, w, pf, cap in N1_TILES],
    key=["CPG", "K", "MERGE", "HAS_D", "HAS_BIAS", "SOFTPLUS", "SAVE_CHUNKS"],
    prune_configs_by={"early_config_prune": prune_n1},
)(triton.heuristics({"EVEN_D": lambda a: even_flags_n1(a)["EVEN_D"], "EVEN_T": lambda a: even_flags_n1(a)["EVEN_T"]})(
    scan_n1.route_scan_n1_fwd_kernel))


# The tile under the interpreter (TT·LT = its chunk_size); BD is capped by the channels.
INTERPRET_N1_TILE = {"TT": 2, "LT": 2, "BD": 8, "VEC": 1, "FLIP": True}  # PREFETCH from the environment


def interpret_n1_tile(CPG):
    return dict(INTERPRET_N1_TILE, BD=min(INTERPRET_N1_TILE["BD"], next_pow2(CPG)),
                PREFETCH=os.environ.get("VMAMBA_KERNELS_PREFETCH", "1") == "1")


# d_state-1 backward tiles: (TT, LT, BD, VEC, num_warps, FLIP, PREFETCH, register cap), chunks of TT·LT =
# chunk_size(1) steps (the saving interval of the chunk states). FLIP: the adjoint's reverse scan over segments
# runs as flips and a forward scan (see the kernel). The fastest of the same sweeps.
N1_BWD_TILES = [(4, 16, 16, 2, 4, False, True, 168), (4, 16, 8, 4, 1, True, True, None),
                 (4, 16, 16, 2, 4, False, False, 128), (4, 16, 16, 2, 4, False, True, None),
                 (4, 16, 8, 4, 1, False, True, None), (8, 8, 16, 2, 2, True, True, None),
                 (2, 32, 16, 4, 4, False, True, None)]


def prune_n1_bwd(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    chunked = [c for c in configs if c.kwargs["TT"] * c.kwargs["LT"] == chunk_size(1)]
    keep = [c for c in chunked if c.kwargs["BD"] <= max(16, next_pow2(args["CPG"]))] or _fewest_channels(chunked)
    return keep


@functools.lru_cache(maxsize=None)
def n1_bwd_block_d_candidates(CPG: int):
    if INTERPRET:
        return (interpret_n1_tile(CPG)["BD"],)
    fitting = prune_n1_bwd(n1_bwd_tuner.configs, {}, CPG=CPG)
    return tuple(sorted({c.kwargs["BD"] for c in _may_run(n1_bwd_tuner, fitting, CPG=CPG)}))


n1_bwd_tuner = _tuner(
    configs=[triton.Config({"TT": tt, "LT": lt, "BD": bd, "VEC": vec, "FLIP": flip, "PREFETCH": pf}, num_warps=w,
                           maxnreg=cap)
             for tt, lt, bd, vec, w, flip, pf, cap in N1_BWD_TILES],
    key=["CPG", "K", "DX_MERGE", "HAS_D", "HAS_BIAS", "SOFTPLUS"],
    prune_configs_by={"early_config_prune": prune_n1_bwd},
)(triton.heuristics({"EVEN_D": lambda a: even_flags_n1(a)["EVEN_D"], "EVEN_T": lambda a: even_flags_n1(a)["EVEN_T"]})(
    scan_n1.route_scan_n1_bwd_kernel))


# Backward tiles: the chunk BT is fixed by the saved chunk states, so the channel block BD and the warps
# are tuned, 8-warp tiles also capped at 128 registers (2 blocks per SM instead of 1). The first config
# that fits is bwd_block_d's with 8 warps (a problem the table lacks runs it). (BD, num_warps, register cap)
BWD_TILES = [(bd, w, cap) for bd in (1, 2, 4, 8, 16, 32, 64, 128) for w, cap in ((8, None), (4, None), (8, 128))]


def prune_bwd(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    BT, BN, CPG = args["BT"], args["BN"], args["CPG"]
    nominal = bwd_block_d(CPG, args["N"])
    fits = [c for c in configs if c.kwargs["BD"] <= max(1, next_pow2(CPG)) and 1024 <= BT * c.kwargs["BD"] * BN <= 4096]
    first = [c for c in configs if c.kwargs["BD"] == nominal and c.num_warps == 8 and c.maxnreg is None]
    keep = first + [c for c in fits if c not in first]
    return keep


@functools.lru_cache(maxsize=None)
def bwd_block_d_candidates(CPG: int, N: int):
    """The channel blocks the backward may run with for a problem (its partial buffers are sized for the
    smallest)."""
    if INTERPRET:
        return (min(8, next_pow2(CPG)),)
    args = dict(BT=chunk_size(N), BN=next_pow2(N), CPG=CPG, N=N)
    fitting = prune_bwd(bwd_tuner.configs, args)
    return tuple(sorted({c.kwargs["BD"] for c in _may_run(bwd_tuner, fitting, CPG=CPG, N=N)}))


# Tuning runs are idempotent: every output is stored (read-add-store merges restart at first visits), except
# the atomic merge, which is launched with the first config instead.
bwd_tuner = _tuner(
    configs=[triton.Config({"BD": bd}, num_warps=w, maxnreg=cap) for bd, w, cap in BWD_TILES],
    key=["CPG", "N", "K", "BN", "BT", "IN_MODE", "DX_MERGE", "GATHER", "HAS_Z", "HAS_D", "HAS_DLAST"],
    prune_configs_by={"early_config_prune": prune_bwd},
)(triton.heuristics({"EVEN_D": lambda a: even_flags(a)["EVEN_D"], "EVEN_T": lambda a: even_flags(a)["EVEN_T"]})(
    scan.selective_scan_bwd_kernel))


# d_state > 1 forward, step by step (scan_steps.py): (BD channels, num_warps, step loop unrolling). A thread
# holds BN·BD / (32·num_warps) states of one channel: all of them where BD = 32·num_warps; fewer channels per
# program (smaller BD) spread a channel's states over 2 or 4 lanes, for problems with few channels.
STEPS_TILES = [(32, 1, 1), (64, 2, 1), (128, 4, 1), (16, 1, 1), (8, 1, 1), (32, 2, 1), (64, 4, 1), (16, 2, 1),
               (32, 1, 2), (16, 1, 2), (8, 1, 2)]


def prune_steps(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    if args["BATCH_LANES"]:  # lanes over images: any block fits
        return list(configs)
    keep = [cfg for cfg in configs if cfg.kwargs["BD"] <= max(8, next_pow2(args["CPG"]))]
    return keep or [min(configs, key=lambda c: c.kwargs["BD"])]


def even_flags_steps(args):
    return {"EVEN_D": args["CPG"] % args["BD"] == 0}


steps_tuner = _tuner(
    configs=[triton.Config({"BD": bd, "UNROLL": unroll}, num_warps=w) for bd, w, unroll in STEPS_TILES],
    key=["CPG", "N", "K", "BN", "OUT_MODE", "MERGE", "GATHER", "HAS_Z", "HAS_D", "SAVE_CHUNKS", "BATCH_LANES"],
    prune_configs_by={"early_config_prune": prune_steps},
)(triton.heuristics({"EVEN_D": lambda a: even_flags_steps(a)["EVEN_D"]})(scan_steps.selective_scan_steps_fwd_kernel))

# By the name of the kernel each tunes (the table's kernel key).
TUNERS = {t.base_fn.__name__: t for t in (fwd_tuner, n1_tuner, n1_bwd_tuner, bwd_tuner, steps_tuner)}
