"""tools/ort_scan_floor.py: the scan-state count behind its lower bound, and a run as a user would make it."""
import json

import torch

import vmamba_kernels as vk

from .tool_runner import assert_ok, load_tool, run_script


def test_scan_states_are_counted_for_every_scan_op():
    floor = load_tool('ort_scan_floor')
    g = torch.Generator().manual_seed(0)
    Bt, Dm, L, N = 2, 6, 9, 4
    u, delta = torch.randn(Bt, Dm, L, generator=g), torch.randn(Bt, Dm, L, generator=g)
    A, B, C = -torch.rand(Dm, N, generator=g), torch.randn(Bt, N, L, generator=g), torch.randn(Bt, N, L, generator=g)
    H, W, K, F = 3, 5, 4, 6
    routes = vk.scan_routes('cross', H, W)  # K routes of H·W steps each
    x2 = dict(x=torch.randn(1, H, W, F, generator=g), delta=torch.randn(1, H, W, K, F, generator=g),
              A=-torch.rand(K, F, N, generator=g), B=torch.randn(1, H, W, K, N, generator=g),
              C=torch.randn(1, H, W, K, N, generator=g), D=None, delta_bias=None)
    counter = floor._ScanStates()
    with torch.no_grad(), counter:
        vk.selective_scan(u, delta, A, B, C)
        vk.selective_scan_states(u, delta, A, B)
        vk.selective_scan_2d(**x2, routes=routes)
    assert counter.states == 2 * (Bt * Dm * L * N) + 1 * K * (H * W) * F * N


def test_a_run_writes_the_floor_of_each_model(tmp_path):
    proc = run_script('ort_scan_floor.py', '--models', 'efficientvmamba_tiny,vim2_tiny', '--img-size', '64',
                      '--rounds', '3', '--block-states', '65536', '--no-rest', '--out-dir', tmp_path, timeout=600)
    assert_ok(proc)
    record = json.loads((tmp_path / 'ort_scan_floor.json').read_text())
    rows = {r['model']: r for r in record['rows']}
    assert set(rows) == {'efficientvmamba_tiny', 'vim2_tiny'} and record['ns_per_state'] > 0
    for r in rows.values():  # the floor is the states times the time per state, and its ratio to ConvNeXt-T's
        assert abs(r['floor_ms'] - r['scan_states_m'] * record['ns_per_state']) <= 0.05 + 1e-3 * r['floor_ms']
        ratio = r['floor_ms'] / record['convnext_tiny_ms']
        assert abs(r['floor_x_convnext'] - ratio) <= 0.01 + 1e-2 * ratio
        assert 'rest_ms' not in r
    # ViM2 scans tokens along 4 routes and channels both ways at d_state 16: far more states than EfficientVMamba
    assert rows['vim2_tiny']['scan_states_m'] > 5 * rows['efficientvmamba_tiny']['scan_states_m'] > 0
    assert '| vim2_tiny |' in (tmp_path / 'ort_scan_floor.md').read_text()


def test_the_rest_of_a_model_is_its_file_without_scans(tmp_path):
    floor = load_tool('ort_scan_floor')
    import onnx
    path = floor.rest_file('efficientvmamba_tiny', str(tmp_path), 64)
    ops = {node.op_type for node in onnx.load(path).graph.node}
    assert 'Exp' not in ops and 'Conv' in ops  # no scan's decay left; the convolutions are
    proc = run_script('ort_scan_floor.py', '--models', 'efficientvmamba_tiny', '--img-size', '64', '--rounds', '3',
                      '--block-states', '65536', '--out-dir', tmp_path, timeout=600)
    assert_ok(proc)
    row = json.loads((tmp_path / 'ort_scan_floor.json').read_text())['rows'][0]
    assert row['rest_ms'] > 0 and abs(row['total_ms'] - row['rest_ms'] - row['floor_ms']) <= 0.11
