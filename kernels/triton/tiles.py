"""Tiles of the fused kernels and their tuners: which tile configurations each kernel may run with, which of
them fit a problem, and the ``triton.autotune`` tuners that pick one. The launchers are in ``backend.py``.

``VMAMBA_KERNELS_TUNE=0`` runs the first fitting tile of each problem without tuning runs.
"""
import functools
import os

import triton

from . import scan, scan_n1

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# A plain integer helper: triton.next_power_of_2 is a constexpr function in Triton 3.8, whose calls from Python
# cost microseconds each, and the launchers call it a few dozen times per op.
def _pow2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()


def chunk_size(N: int) -> int:
    """Steps per saved chunk state (= the backward's chunk): the [steps, channels, states] tiles stay
    near 2048 elements. Small under the interpreter, whose scans run element by element."""
    if _INTERPRET:
        return 4
    return max(16, min(64, 2048 // (8 * _pow2(N))))


def _bwd_block_d(CPG: int, N: int) -> int:
    if _INTERPRET:
        return min(8, _pow2(CPG))
    return max(1, min(_pow2(CPG), 2048 // (chunk_size(N) * _pow2(N))))


# --------------------------------------------------------------------------------------------------
# Tiles and tuners (plain launches with a fixed tile under the interpreter)

# (BT, BD, num_warps, prefetch, vectorized channels): the first four that fit a problem are tried.
_FWD_TILES = [(64, 32, 4, True, True), (32, 32, 4, True, True), (64, 32, 4, True, False), (128, 16, 4, True, True),
              (64, 16, 4, True, True), (16, 16, 8, True, True), (32, 16, 8, True, True), (16, 16, 8, False, True),
              (16, 16, 8, True, False), (8, 16, 4, True, True), (16, 8, 4, True, True)]
# Register-lean tiles, tried as well where they fit: without software prefetching (one set of loop-carried
# tiles) and with a register cap. Most tiles above use 241-255 registers per thread, which allows 8 warps
# per SM; 168 allows 12 and 128 allows 16 (`python tools/bench_kernels.py --registers` shows each tile's
# registers and spills). (BT, BD, num_warps, prefetch, vectorized channels, register cap)
_FWD_LEAN_TILES = [(64, 16, 4, False, True, None), (128, 16, 4, False, True, None), (64, 16, 4, False, True, 128)]
_TUNE = os.environ.get("VMAMBA_KERNELS_TUNE", "1") == "1"  # 0: the first fitting tile, no tuning runs


def _prune_fwd(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    BN, CPG, save_t = args["BN"], args["CPG"], args["SAVE_T"]

    def fits(cfg):
        BT, BD = cfg.kwargs["BT"], cfg.kwargs["BD"]
        return (BD <= max(8, _pow2(CPG)) and 256 <= BT * BD * BN <= 4096
                and not (args["SAVE_CHUNKS"] and BT > save_t))

    main, lean = configs[:len(_FWD_TILES)], configs[len(_FWD_TILES):]
    keep = [cfg for cfg in main if fits(cfg)]
    if not keep:  # the smallest tile always fits
        keep = [min(main, key=lambda c: c.kwargs["BT"] * c.kwargs["BD"])]
    return keep[:4] + [cfg for cfg in lean if fits(cfg)] if _TUNE else keep[:1]


def _even(args):
    return {"EVEN_D": args["CPG"] % args["BD"] == 0,
            "EVEN_T": not args["GATHER"] and args["Lr"] % args["BT"] == 0}


# No reset_to_zero: outputs are overwritten (read-add-store merges are idempotent with first-visit flags);
# the atomic merge, which accumulates, is launched with a fixed tile instead.
_fwd_tuned = triton.autotune(
    configs=[triton.Config({"BT": bt, "BD": bd, "PREFETCH": pf, "VEC": vec}, num_warps=w, maxnreg=cap)
             for bt, bd, w, pf, vec, cap in [t + (None,) for t in _FWD_TILES] + _FWD_LEAN_TILES],
    key=["CPG", "N", "K", "BN", "OUT_MODE", "MERGE", "GATHER", "HAS_Z", "HAS_D", "SAVE_CHUNKS"],
    prune_configs_by={"early_config_prune": _prune_fwd},
)(triton.heuristics({"EVEN_D": lambda a: _even(a)["EVEN_D"], "EVEN_T": lambda a: _even(a)["EVEN_T"]})(
    scan.selective_scan_fwd_kernel))


# d_state-1 route scan (scan_n1.py): (TT steps per thread, LT segments, BD channels, VEC channels per thread,
# num_warps, prefetch, register cap). Channels take BD / VEC lanes and segments the other lanes and the warps, so
# (BD / VEC)·LT = 32·num_warps. The kernel is bound by issuing instructions (model_cards/benchmarks/kernels.md):
# wider channel vectors share each step's position, B, C and mask work over more channels, and a cap of 168
# registers lets three 4-warp programs share an SM instead of two, for a few spilled registers. The list holds
# the fastest of sweeps on an H200: VMamba-T's stage 1, then its later stages, then GroupMamba-T's stage 1.
_N1_TILES = [(4, 16, 32, 4, 4, True, 168), (4, 8, 32, 4, 2, True, 168), (4, 16, 16, 2, 4, True, None),
             (4, 8, 32, 2, 4, True, None), (2, 16, 16, 4, 2, True, None), (4, 8, 16, 2, 2, True, None),
             (8, 4, 32, 2, 2, True, None)]


def _fewest_channels(configs):
    """Tuners must keep a config: where every tile's channel block is wider than the channels, the narrowest."""
    return [min(configs, key=lambda c: c.kwargs["BD"])]


def _prune_n1(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    fits = [c for c in configs if not (args["SAVE_CHUNKS"] and c.kwargs["TT"] > args["SAVE_T"])]
    keep = [c for c in fits if c.kwargs["BD"] <= max(8, _pow2(args["CPG"]))] or _fewest_channels(fits)
    return keep if _TUNE else keep[:1]


def _even_n1(args):
    return {"EVEN_D": args["CPG"] % args["BD"] == 0, "EVEN_T": args["Lr"] % (args["TT"] * args["LT"]) == 0}


_n1_tuned = triton.autotune(
    configs=[triton.Config({"TT": tt, "LT": lt, "BD": bd, "VEC": vec, "PREFETCH": pf}, num_warps=w, maxnreg=cap)
             for tt, lt, bd, vec, w, pf, cap in _N1_TILES],
    key=["CPG", "K", "MERGE", "HAS_D", "HAS_BIAS", "SOFTPLUS", "SAVE_CHUNKS"],
    prune_configs_by={"early_config_prune": _prune_n1},
)(triton.heuristics({"EVEN_D": lambda a: _even_n1(a)["EVEN_D"], "EVEN_T": lambda a: _even_n1(a)["EVEN_T"]})(
    scan_n1.route_scan_n1_fwd_kernel))


# The tile under the interpreter (TT·LT = its chunk_size); BD is capped by the channels.
INTERPRET_N1_TILE = {"TT": 2, "LT": 2, "BD": 8, "VEC": 1, "FLIP": True}  # PREFETCH from the environment


def _interpret_n1_tile(CPG):
    return dict(INTERPRET_N1_TILE, BD=min(INTERPRET_N1_TILE["BD"], _pow2(CPG)),
                PREFETCH=os.environ.get("VMAMBA_KERNELS_PREFETCH", "1") == "1")


# d_state-1 backward tiles: (TT, LT, BD, VEC, num_warps, FLIP, PREFETCH, register cap), chunks of TT·LT =
# chunk_size(1) steps (the saving interval of the chunk states). FLIP: the adjoint's reverse scan over segments
# runs as flips and a forward scan (see the kernel). The fastest of the same sweeps.
_N1_BWD_TILES = [(4, 16, 16, 2, 4, False, True, 168), (4, 16, 8, 4, 1, True, True, None),
                 (4, 16, 16, 2, 4, False, False, 128), (4, 16, 16, 2, 4, False, True, None),
                 (4, 16, 8, 4, 1, False, True, None), (8, 8, 16, 2, 2, True, True, None),
                 (2, 32, 16, 4, 4, False, True, None)]


def _prune_n1_bwd(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    chunked = [c for c in configs if c.kwargs["TT"] * c.kwargs["LT"] == chunk_size(1)]
    keep = [c for c in chunked if c.kwargs["BD"] <= max(16, _pow2(args["CPG"]))] or _fewest_channels(chunked)
    return keep if _TUNE else keep[:1]


@functools.lru_cache(maxsize=None)
def n1_bwd_block_d_candidates(CPG: int):
    if _INTERPRET:
        return (_interpret_n1_tile(CPG)["BD"],)
    return tuple(sorted({c.kwargs["BD"] for c in _prune_n1_bwd(_n1_bwd_tuned.configs, {}, CPG=CPG)}))


_n1_bwd_tuned = triton.autotune(
    configs=[triton.Config({"TT": tt, "LT": lt, "BD": bd, "VEC": vec, "FLIP": flip, "PREFETCH": pf}, num_warps=w,
                           maxnreg=cap)
             for tt, lt, bd, vec, w, flip, pf, cap in _N1_BWD_TILES],
    key=["CPG", "K", "DX_MERGE", "HAS_D", "HAS_BIAS", "SOFTPLUS"],
    prune_configs_by={"early_config_prune": _prune_n1_bwd},
)(triton.heuristics({"EVEN_D": lambda a: _even_n1(a)["EVEN_D"], "EVEN_T": lambda a: _even_n1(a)["EVEN_T"]})(
    scan_n1.route_scan_n1_bwd_kernel))


# Backward tiles: the chunk BT is fixed by the saved chunk states, so the channel block BD and the warps
# are tuned, 8-warp tiles also capped at 128 registers (2 blocks per SM instead of 1). The first config
# that fits is _bwd_block_d's with 8 warps (VMAMBA_KERNELS_TUNE=0 runs it). (BD, num_warps, register cap)
_BWD_TILES = [(bd, w, cap) for bd in (1, 2, 4, 8, 16, 32, 64, 128) for w, cap in ((8, None), (4, None), (8, 128))]


def _prune_bwd(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    BT, BN, CPG = args["BT"], args["BN"], args["CPG"]
    nominal = _bwd_block_d(CPG, args["N"])
    fits = [c for c in configs if c.kwargs["BD"] <= max(1, _pow2(CPG)) and 1024 <= BT * c.kwargs["BD"] * BN <= 4096]
    first = [c for c in configs if c.kwargs["BD"] == nominal and c.num_warps == 8 and c.maxnreg is None]
    keep = first + [c for c in fits if c not in first]
    return keep if _TUNE else keep[:1]


@functools.lru_cache(maxsize=None)
def bwd_block_d_candidates(CPG: int, N: int):
    """The channel blocks the backward may run with for a problem (its partial buffers are sized for the
    smallest)."""
    if _INTERPRET:
        return (min(8, _pow2(CPG)),)
    args = dict(BT=chunk_size(N), BN=_pow2(N), CPG=CPG, N=N)
    return tuple(sorted({c.kwargs["BD"] for c in _prune_bwd(_bwd_tuned.configs, args)}))


# Tuning runs are idempotent: every output is stored (read-add-store merges restart at first visits), except
# the atomic merge, which is launched with the first config instead.
_bwd_tuned = triton.autotune(
    configs=[triton.Config({"BD": bd}, num_warps=w, maxnreg=cap) for bd, w, cap in _BWD_TILES],
    key=["CPG", "N", "K", "BN", "BT", "IN_MODE", "DX_MERGE", "GATHER", "HAS_Z", "HAS_D", "HAS_DLAST"],
    prune_configs_by={"early_config_prune": _prune_bwd},
)(triton.heuristics({"EVEN_D": lambda a: _even(a)["EVEN_D"], "EVEN_T": lambda a: _even(a)["EVEN_T"]})(
    scan.selective_scan_bwd_kernel))
