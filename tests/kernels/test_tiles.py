"""The tile table: lookups, the tuning switch, the table's file format and the committed table's freshness."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import triton
from triton.runtime.autotuner import Autotuner

from vmamba_kernels.triton import tiles

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _bwd_problem(CPG=96, N=16, dtype=torch.bfloat16):
    """Launch arguments of the general backward with every key argument (and one tensor for the dtypes)."""
    return dict(CPG=CPG, N=N, K=4, BN=tiles.next_pow2(N), BT=tiles.chunk_size(N), IN_MODE=1, DX_MERGE=1,
                GATHER=True, HAS_Z=False, HAS_D=True, HAS_DLAST=False, x=torch.empty(1, dtype=dtype),
                delta=torch.empty(1, dtype=torch.float32))


def _key(tuner, kw):
    return tuner.problem_key(kw)


@pytest.fixture
def table_mode():
    mode = tiles.tune_mode()
    tiles.set_tune_mode("table")
    yield
    tiles.use_table(None)
    tiles.set_tune_mode(mode)


def _table_with(tuner, kw, cfg, family="cpu"):
    name = tiles.cache_key_to_table_key(tuner, _key(tuner, kw))
    return tiles.merge_entries(None, family, tuner.base_fn.__name__, {name: tiles.config_label(cfg)})


def test_table_hit_runs_the_tables_tile(table_mode):
    tuner = tiles.bwd_tuner
    kw = _bwd_problem()
    fitting = tiles.prune_bwd(tuner.configs, {}, **kw)
    assert len(fitting) > 2
    want = fitting[2]
    tiles.use_table(_table_with(tuner, kw, want))
    assert tuner.pick(kw, _key(tuner, kw), family="cpu") is want
    # another GPU family, or another dtype, misses
    assert tuner.pick(kw, _key(tuner, kw), family="sm80") is fitting[0]
    kw32 = _bwd_problem(dtype=torch.float32)
    assert tuner.pick(kw32, _key(tuner, kw32), family="cpu") is fitting[0]
    # the backward's workspaces are sized for the table's tile as well as the first
    assert set(tiles.bwd_block_d_candidates(96, 16)) == {fitting[0].kwargs["BD"], want.kwargs["BD"]}


def test_table_miss_runs_the_first_fitting_tile(table_mode):
    tiles.use_table(tiles.empty_table())
    for tuner, kw, prune in ((tiles.bwd_tuner, _bwd_problem(), tiles.prune_bwd),
                             (tiles.bwd_tuner, _bwd_problem(CPG=3, N=1), tiles.prune_bwd)):
        assert tuner.pick(kw, _key(tuner, kw), family="cpu") is prune(tuner.configs, {}, **kw)[0]
    assert tiles.bwd_block_d_candidates(96, 16) == (tiles.bwd_block_d(96, 16),)


def test_table_tile_that_no_longer_fits_is_ignored(table_mode):
    tuner = tiles.bwd_tuner
    kw = _bwd_problem(CPG=3, N=1)
    fitting = tiles.prune_bwd(tuner.configs, {}, **kw)
    wide = next(c for c in tuner.configs if c not in fitting)
    tiles.use_table(_table_with(tuner, kw, wide))
    assert tuner.pick(kw, _key(tuner, kw), family="cpu") is fitting[0]


class _FakeKernel:
    def __init__(self):
        self.launches = []

    def run(self, *args, **kwargs):
        self.launches.append(kwargs)


def test_launch_without_tuning_runs_no_timing(table_mode, monkeypatch):
    """In table mode the tuner launches the picked tile once and never enters Triton's tuning (which in
    Triton 3.6 times even a single remaining tile)."""
    tuner = copy.copy(tiles.bwd_tuner)
    tuner.cache, tuner.fn = {}, _FakeKernel()
    kw = _bwd_problem()
    want = tiles.prune_bwd(tuner.configs, {}, **kw)[1]
    tiles.use_table(_table_with(tuner, kw, want, family="cpu"))
    monkeypatch.setattr(tiles, "gpu_family", lambda device: "cpu")

    def no_tuning(*args, **kwargs):
        raise AssertionError("tuning ran")

    monkeypatch.setattr(Autotuner, "run", no_tuning)
    for _ in range(2):
        tuner.run(grid=lambda meta: (1,), warmup=False, **kw)
    assert [launch["BD"] for launch in tuner.fn.launches] == [want.kwargs["BD"]] * 2
    assert tuner.fn.launches[0]["num_warps"] == want.num_warps
    assert tuner.best_config is want and list(tuner.cache.values()) == [want]


def _child_modes(env_value):
    env = {k: v for k, v in os.environ.items() if k != "VMAMBA_KERNELS_TUNE"}
    if env_value is not None:
        env["VMAMBA_KERNELS_TUNE"] = env_value
    code = ("import json; from vmamba_kernels.triton import tiles; "
            "print(json.dumps([tiles.tune_mode(), tiles.tuning_runs(), list(tiles.bwd_block_d_candidates(96, 16)), "
            "[c.kwargs['BD'] for c in tiles.prune_bwd(tiles.bwd_tuner.configs, {}, BT=tiles.chunk_size(16), "
            "BN=16, CPG=96, N=16)]]))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_tune_switch_from_the_environment():
    mode, runs, candidates, fitting = _child_modes("1")
    assert (mode, runs) == ("tune", True)
    assert sorted(set(candidates)) == sorted(set(fitting)) and len(fitting) > 1  # every fitting tile is timed
    mode, runs, candidates, fitting = _child_modes("0")
    assert (mode, runs, candidates) == ("first", False, [fitting[0]])
    mode, runs, _, _ = _child_modes(None)
    assert (mode, runs) == ("table", False)


def _fake_tuner(tuner, entries):
    """A stand-in with a tuner's keys and a cache as Triton fills it: key values, then tensor dtypes."""
    fake = copy.copy(tuner)
    fake.cache = dict(entries)
    return fake


def test_table_round_trip(tmp_path):
    tuner = tiles.bwd_tuner
    kw = _bwd_problem()
    cfg = tiles.prune_bwd(tuner.configs, {}, **kw)[3]
    # Triton 3.6 and 3.8 both file a problem under its key values and then its tensors' dtypes
    key = tuple(kw[k] for k in tuner.keys) + ("torch.bfloat16", "torch.float32", "torch.float32")
    entries = tiles.tuned_entries(_fake_tuner(tuner, {key: cfg}))
    name = next(iter(entries))
    assert name.endswith(";bfloat16+float32") and name.startswith("CPG=96,N=16,K=4,")
    assert tiles.parse_table_key(name) == ({k: str(kw[k]) for k in tuner.keys}, ("bfloat16", "float32"))
    assert name == tiles.cache_key_to_table_key(tuner, _key(tuner, kw))  # what a launch looks up

    path = str(tmp_path / "table.json")
    other = tiles.merge_entries(None, "sm80", "selective_scan_bwd_kernel", {"CPG=1;float32": "BD=1,num_warps=8"})
    tiles.write_table(other, path)
    table = tiles.merge_entries(tiles.read_table(path), "sm90", tuner.base_fn.__name__, entries,
                                {"device": "test"})
    tiles.write_table(table, path)
    back = tiles.read_table(path)
    assert back == table
    assert back["gpus"]["sm80"] == other["gpus"]["sm80"]  # other GPU families are kept
    assert back["gpus"]["sm90"]["kernels"][tuner.base_fn.__name__] == entries
    assert back["gpus"]["sm90"]["measured"] == {"device": "test"}
    assert [p.name for p in tmp_path.iterdir()] == ["table.json"]  # no temporary left behind


def test_tool_merges_tuner_caches():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        import tune_tiles
    finally:
        sys.path.pop(0)
    assert tune_tiles.parse_batch_sizes("vim2_tiny=32, plainmamba_l1=64") == {"vim2_tiny": 32, "plainmamba_l1": 64}
    with pytest.raises(ValueError, match="name=batch"):
        tune_tiles.parse_batch_sizes("vim2_tiny")
    fwd = tiles.n1_tuner
    key = (96, 4, 1, True, True, True, True, "torch.bfloat16", "torch.float32")
    fakes = {"route_scan_n1_fwd_kernel": _fake_tuner(fwd, {key: fwd.configs[1]})}
    table = tune_tiles.harvest(tiles.empty_table(), "sm90", fakes, {"models": ["vmamba_tiny_s1l8"]})
    got = table["gpus"]["sm90"]["kernels"]["route_scan_n1_fwd_kernel"]
    assert got == {"CPG=96,K=4,MERGE=1,HAS_D=True,HAS_BIAS=True,SOFTPLUS=True,SAVE_CHUNKS=True;bfloat16+float32":
                   tiles.config_label(fwd.configs[1])}


def test_committed_table_names_existing_tiles_and_keys():
    """A table entry must name a tile of its kernel's list and that tuner's key arguments: a tile list or key
    changed without refilling the table fails here."""
    table = tiles.read_table(tiles.TABLE_PATH)
    assert table["format"] == tiles.TABLE_FORMAT
    for family, gpu in table["gpus"].items():
        assert family.startswith("sm"), family
        for kernel, entries in gpu["kernels"].items():
            assert kernel in tiles.TUNERS, (family, kernel)
            tuner = tiles.TUNERS[kernel]
            labels = {tiles.config_label(c) for c in tuner.configs}
            for key, label in entries.items():
                named, dtypes = tiles.parse_table_key(key)
                assert list(named) == list(tuner.keys) and dtypes, (family, kernel, key)
                assert label in labels, f"{family} {kernel} {key}: {label} is not in the tile list"


def test_table_ships_with_the_package():
    assert os.path.dirname(tiles.TABLE_PATH) == os.path.dirname(os.path.abspath(tiles.__file__))
    with open(os.path.join(ROOT, "setup.cfg")) as f:
        assert "vmamba_kernels.triton = tile_table.json" in f.read()


def test_config_labels_are_unique_per_kernel():
    for kernel, tuner in tiles.TUNERS.items():
        labels = [tiles.config_label(c) for c in tuner.configs]
        assert len(labels) == len(set(labels)), kernel
        assert all(isinstance(c, triton.Config) for c in tuner.configs)
