"""plot_benchmarks.py and profile_step.py on CPU: the plot and its table from both benchmark formats, the
kernel-kind split, and a profiled step of a small model."""
import json

import pytest

from .tool_runner import assert_ok, load_tool, run_script


def _side_by_side(path, zoo_vmamba_infer):
    results = [
        {'model': 'convnext_tiny', 'infer_bf16_img_s': 7000.0, 'train_bf16_img_s': 2400.0},
        {'model': 'vmamba_t', 'infer_bf16_img_s': 2800.0, 'train_bf16_img_s': 1000.0},
        {'model': 'zoo_vmamba_t', 'config': 'vmamba_tiny_s1l8', 'infer_bf16_img_s': zoo_vmamba_infer,
         'train_bf16_img_s': 1300.0},
        {'model': 'zoo_vim2_t', 'config': 'vim2_tiny', 'infer_bf16_img_s': 400.0, 'train_error': 'OOM'},
    ]
    path.write_text(json.dumps({'meta': {}, 'results': results}))


def test_plot_reads_both_formats_and_later_files_win(tmp_path):
    plot = load_tool('plot_benchmarks')
    first, second, bench = tmp_path / 'a.json', tmp_path / 'b.json', tmp_path / 'bench.json'
    _side_by_side(first, 4000.0)
    _side_by_side(second, 4800.0)
    bench.write_text(json.dumps({'rows': [
        {'model': 'groupmamba_small', 'precision': 'bf16', 'memory_format': 'contiguous', 'infer_img_s': 900.0,
         'train_img_s': 300.0},
        {'model': 'groupmamba_small', 'precision': 'fp32', 'memory_format': 'contiguous', 'infer_img_s': 1.0},
    ]}))
    table = plot.merge([str(first), str(second), str(bench)])
    assert table[('vmamba_tiny_s1l8', 'vmamba_zoo')] == [4800.0, 1300.0]
    assert table[('vmamba_tiny_s1l8', 'official')] == [2800.0, 1000.0]
    assert table[('vim2_tiny', 'vmamba_zoo')] == [400.0, None]  # a failed training stays unplotted
    assert table[('groupmamba_small', 'vmamba_zoo')] == [900.0, 300.0]  # fp32 rows are not mixed in
    top1 = plot.paper_top1()
    assert top1['vmamba_tiny_s1l8'] == 82.6 and top1['convnext_tiny'] == 82.1
    text = plot.markdown(table, top1)
    assert '| vmamba_tiny_s1l8 | official | 82.6 | 2800 | 1000 |' in text

    out = tmp_path / 'plot.png'
    assert plot.run_tool(plot.main, [str(first), str(bench), '--out', str(out)]) == 0
    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and out.stat().st_size > 10_000


def test_plot_rejects_unknown_json_in_one_line(tmp_path):
    bad = tmp_path / 'bad.json'
    bad.write_text(json.dumps({'something': []}))
    proc = run_script('plot_benchmarks.py', bad, '--out', tmp_path / 'x.png')
    assert proc.returncode == 2 and 'neither a side-by-side' in proc.stderr
    assert 'Traceback' not in proc.stderr and not (tmp_path / 'x.png').exists()


def test_plot_marks_superseded_zoo_points_and_rejects_unknown_ones(tmp_path, capsys):
    plot = load_tool('plot_benchmarks')
    data = tmp_path / 'a.json'
    _side_by_side(data, 4800.0)
    out = tmp_path / 'plot.png'
    assert plot.run_tool(plot.main, [str(data), '--out', str(out), '--markdown', '--superseded', 'vim2_tiny']) == 0
    text = capsys.readouterr().out
    assert '| vim2_tiny | vmamba_zoo (superseded) | 82.7 | 400 |  |' in text
    assert '| vmamba_tiny_s1l8 | vmamba_zoo | 82.6 | 4800 | 1300 |' in text  # others unmarked
    assert '| vmamba_tiny_s1l8 | official | 82.6 | 2800 | 1000 |' in text
    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

    proc = run_script('plot_benchmarks.py', data, '--out', tmp_path / 'y.png', '--superseded', 'plainmamba_l1')
    assert proc.returncode == 2 and 'plainmamba_l1' in proc.stderr and 'Traceback' not in proc.stderr
    assert not (tmp_path / 'y.png').exists()


@pytest.mark.parametrize('name,kind', [
    ('void route_scan_n1_fwd_kernel', 'scan'),
    ('nvjet_tst_128x64_64x8_2x1_v_bz_TNT', 'gemm'),
    ('sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64', 'gemm'),
    ('void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float, true>', 'norm'),
    ('void at::native::conv_depthwise2d_forward_kernel<3, c10::BFloat16, int>', 'conv'),
    ('void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<direct_copy_kernel_cuda', 'copy'),
    ('void at::native::vectorized_elementwise_kernel<4, at::native::silu_kernel<float>', 'elementwise'),
    ('void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>', 'optimizer'),
    ('void at::native::reduce_kernel<512, 1, ReduceOp<float, MeanOps>>', 'reduce'),
    ('some_unknown_kernel', 'other'),
])
def test_profile_kinds(name, kind):
    assert load_tool('profile_step').kind_of(name) == kind


def test_profile_step_runs_a_small_model_on_cpu(tmp_path):
    proc = run_script('profile_step.py', '--models', 'test_resnet', '--device', 'cpu', '--batch-size', '2',
                      '--img-size', '32', '--iters', '1', '--warmup', '0', '--profile-steps', '1', '--out-dir', tmp_path)
    assert_ok(proc)
    rows = json.loads((tmp_path / 'profile.json').read_text())['rows']
    assert rows[0]['model'] == 'test_resnet' and 'error' not in rows[0]
    assert rows[0]['launches'] > 0 and rows[0]['cold_first_step_s'] >= rows[0]['cold_build_s']
    assert sum(rows[0]['split_ms'].values()) == pytest.approx(rows[0]['gpu_ms'], rel=1e-2)
    assert '| test_resnet |' in (tmp_path / 'profile.md').read_text()
