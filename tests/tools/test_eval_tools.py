"""validate.py, convert_checkpoint.py, flops.py and benchmark.py end to end on CPU with small inputs."""
import csv
import json
import os
import re
import subprocess
import sys
import warnings

import pytest
import timm
import torch

from .tool_runner import REPO, assert_ok, load_tool, read_jsonl, run_script, tool_env


# --------------------------------------------------------------------------------------------------- validate
def test_validate_reproduces_training_evaluation(digits_run, tmp_path, capsys):
    """validate.py on a training checkpoint takes the run's settings and finds exactly the accuracy train.py logged."""
    out, _ = digits_run
    last = read_jsonl(os.path.join(out, 'summary.jsonl'))[-1]
    validate = load_tool('validate')
    for ema, prefix in ((False, 'val'), (True, 'ema')):
        result_file = tmp_path / f'result_{ema}.json'
        argv = ['--checkpoint', os.path.join(out, 'last.pth.tar'), '--results-file', str(result_file)]
        assert validate.run_tool(validate.main, argv + (['--use-ema'] if ema else [])) == 0
        result = json.loads(result_file.read_text())
        assert result['images'] == 359 and result['img_size'] == 24 and result['model'] == 'test_resnet'
        assert result['top1'] == pytest.approx(last[f'{prefix}_top1'], abs=1e-3)
        assert result['top5'] == pytest.approx(last[f'{prefix}_top5'], abs=1e-3)
        assert result['loss'] == pytest.approx(last[f'{prefix}_loss'], rel=1e-4)
    assert 'top-1' in capsys.readouterr().out


def _fake_official_efficientvmamba(path):
    """Random weights with the official EfficientVMamba-T names and shapes, wrapped as the released .ckpt."""
    with open(os.path.join(REPO, 'tests', 'data', 'official_keys', 'efficientvmamba_tiny.json')) as f:
        keys = json.load(f)['keys']
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, shape in keys.items():
        if k.endswith('num_batches_tracked'):
            sd[k] = torch.tensor(0)
        elif k.endswith('running_var'):
            sd[k] = torch.rand(shape, generator=g) + 0.5
        else:
            sd[k] = torch.randn(shape, generator=g) * 0.05
    torch.save({'state_dict': sd, 'epoch': 300}, path)
    return sd


def test_convert_official_then_validate_both_ways(tmp_path, capsys):
    src = tmp_path / 'efficient_vmamba_tiny.ckpt'
    official = _fake_official_efficientvmamba(src)
    outs = [tmp_path / 'evm_t.safetensors', tmp_path / 'evm_t.pth']
    proc = run_script('convert_checkpoint.py', '--model', 'efficientvmamba_tiny', '--src', src, '--out', outs[0],
                      '--out', outs[1], '--img-size', '32')
    assert_ok(proc)
    assert 'strict load into efficientvmamba_tiny OK' in proc.stdout
    assert proc.stdout.count('strict re-load OK') == 2

    import safetensors.torch
    converted = safetensors.torch.load_file(str(outs[0]))
    as_pth = torch.load(outs[1], weights_only=True)
    model = load_tool('toolkit.cli').create_model('efficientvmamba_tiny')
    assert set(converted) == set(model.state_dict()) == set(as_pth)
    for k in converted:
        assert torch.equal(converted[k], as_pth[k])
    # every official tensor's values survive the conversion (possibly renamed/reshaped): compare as sorted value sets
    official_values = sorted(round(float(v.double().sum()), 6) for v in official.values() if v.numel() > 1)
    converted_values = sorted(round(float(v.double().sum()), 6) for v in converted.values() if v.numel() > 1)
    assert sum(official_values) == pytest.approx(sum(converted_values), rel=1e-6, abs=1e-4)

    # validate through the family's checkpoint_filter_fn (official file) and from the converted weights: identical
    validate = load_tool('validate')
    results = []
    for ckpt in (src, outs[0]):
        result_file = tmp_path / f'{os.path.basename(ckpt)}.json'
        argv = ['--model', 'efficientvmamba_tiny', '--checkpoint', str(ckpt), '--num-classes', '1000',
                '--img-size', '32', '--batch-size', '120', '--results-file', str(result_file)]
        assert validate.run_tool(validate.main, argv) == 0
        results.append(json.loads(result_file.read_text()))
    assert 'checkpoint_filter_fn' in results[0]['weights']
    assert (results[0]['top1'], results[0]['top5']) == (results[1]['top1'], results[1]['top5'])
    assert results[0]['loss'] == pytest.approx(results[1]['loss'], rel=1e-6)


def test_convert_rejects_wrong_checkpoint(tmp_path, capsys):
    convert = load_tool('convert_checkpoint')
    bad = tmp_path / 'bad.pth'
    torch.save({'state_dict': {'not.a.key': torch.zeros(3)}}, bad)
    assert convert.run_tool(convert.main, ['--model', 'efficientvmamba_tiny', '--src', str(bad),
                                           '--out', str(tmp_path / 'x.safetensors')]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'strict load' in err[0] and 'missing keys' in err[0]
    assert convert.run_tool(convert.main, ['--model', 'efficientvmamba_tiny', '--src', '/no/such.pth']) == 2
    assert 'source checkpoint not found' in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------ flops
def _hook_macs(model, x):
    """Independent oracle: multiply-adds of every Conv2d and Linear, from their output shapes."""
    total = {'conv': 0, 'linear': 0}

    def conv_hook(m, inp, out):
        k = m.kernel_size[0] * m.kernel_size[1]
        total['conv'] += out.numel() * (m.in_channels // m.groups) * k

    def linear_hook(m, inp, out):
        total['linear'] += out.numel() * m.in_features

    hooks = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    hooks += [m.register_forward_hook(linear_hook) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return total


def test_flop_counts_match_an_analytic_oracle_on_a_cnn():
    flops = load_tool('flops')
    model = load_tool('toolkit.cli').create_model('test_resnet').eval()
    x = torch.randn(1, 3, 64, 64)
    oracle = _hook_macs(model, x)
    with torch.no_grad():
        _, fv = flops.fvcore_count(model, x)
        _, tc = flops.torch_count(model, x)
    split = flops.split_counts(fv, tc)
    assert split['fvcore_conv'] == oracle['conv'] and split['fvcore_linear'] == oracle['linear']
    assert split['torch_conv'] == 2 * oracle['conv'] and split['torch_linear'] == 2 * oracle['linear']


@pytest.mark.parametrize('name', ['efficientvmamba_tiny', 'groupmamba_tiny', 'plainmamba_l1', 'spatialmamba_tiny',
                                  'vim2_tiny', 'vmamba_tiny_s1l8'])
def test_flop_counter_consistent_with_fvcore_on_zoo_models(name):
    """Matmul/conv part exactly 2x (flop_counter counts a multiply-add as 2), scan part the same registered count."""
    flops = load_tool('flops')
    model = load_tool('toolkit.cli').create_model(name, img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        _, fv = flops.fvcore_count(model, x)
        _, tc = flops.torch_count(model, x)
    s = flops.split_counts(fv, tc)
    assert s['fvcore_conv'] > 0 and s['fvcore_linear'] > 0 and s['fvcore_scan'] > 0, (fv, tc)
    assert s['torch_conv'] == 2 * s['fvcore_conv'], (fv, tc)
    assert s['torch_linear'] == 2 * s['fvcore_linear'], (fv, tc)
    assert s['torch_scan'] == s['fvcore_scan'], (fv, tc)
    # batched matmuls/einsums: fvcore also prices contraction-free einsums (numpy's einsum_path), which
    # flop_counter does not count at all, so 2x fvcore can only exceed flop_counter, and only by a little
    assert s['torch_batched'] <= 2 * s['fvcore_batched']
    assert 2 * s['fvcore_batched'] - s['torch_batched'] <= 0.01 * (s['torch_conv'] + s['torch_linear'])
    if name == 'plainmamba_l1':
        # independent count from the architecture: 24 layers, each 4 snake routes over the 4x4 tokens of a 64px
        # input, Dm = 2 x 192 channels, d_state 16, D applied inside every route: 9·K·L·Dm·N + K·L·Dm
        K, L, Dm, N = 4, (64 // 16) ** 2, 2 * 192, 16
        assert s['fvcore_scan'] == 24 * (9 * K * L * Dm * N + K * L * Dm)


def test_flops_tool_table_and_model_card_update(tmp_path):
    cards = tmp_path / 'cards'
    cards.mkdir()
    card = cards / 'efficientvmamba.md'
    card.write_text('# EfficientVMamba\n\nintro\n\n<!-- flops-table:start -->\nold table\n<!-- flops-table:end -->\n'
                    '\nafter\n')
    untouched = cards / 'notafamily.md'
    untouched.write_text('<!-- flops-table:start -->\nkeep\n<!-- flops-table:end -->\n')
    out_json = tmp_path / 'flops.json'
    proc = run_script('flops.py', '--models', 'efficientvmamba', '--img-size', '64', '--json', out_json,
                      '--update-cards', cards)
    assert_ok(proc)
    rows = {r['model']: r for r in json.loads(out_json.read_text())}
    assert set(rows) == {'efficientvmamba_tiny', 'efficientvmamba_small', 'efficientvmamba_base'}
    # the same counts as calling fvcore directly
    flops = load_tool('flops')
    model = load_tool('toolkit.cli').create_model('efficientvmamba_tiny', img_size=64).eval()
    with torch.no_grad():
        total, _ = flops.fvcore_count(model, torch.randn(1, 3, 64, 64))
    assert rows['efficientvmamba_tiny']['gflops_fvcore'] == pytest.approx(total / 1e9)
    assert rows['efficientvmamba_tiny']['params_m'] == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6)
    assert rows['efficientvmamba_tiny']['paper_gflops'] is None  # paper FLOPs are at 224 only
    text = card.read_text()
    assert text.startswith('# EfficientVMamba\n\nintro\n\n<!-- flops-table:start -->\n| model |')
    assert text.endswith('<!-- flops-table:end -->\n\nafter\n') and 'old table' not in text
    assert text.count('| efficientvmamba_') == 3 and 'python tools/flops.py --update-cards --img-size 64' in text
    assert untouched.read_text() == '<!-- flops-table:start -->\nkeep\n<!-- flops-table:end -->\n'
    assert 'efficientvmamba_small' in proc.stdout


# -------------------------------------------------------------------------------------------------- benchmark
def test_benchmark_cpu_smoke_writes_tables(tmp_path):
    out = tmp_path / 'bench'
    proc = run_script('benchmark.py', '--models', 'test_resnet,efficientvmamba_tiny', '--batch-size', '2',
                      '--img-size', '32', '--iters', '2', '--warmup', '1', '--amp', 'fp32,bf16',
                      '--memory-formats', 'contiguous,channels_last', '--device', 'cpu', '--out-dir', out,
                      '--commit', 'abc1234', '--empty-triton-cache')
    assert_ok(proc)
    with open(out / 'benchmark.csv') as f:
        rows = list(csv.DictReader(f))
    assert [(r['model'], r['precision'], r['memory_format']) for r in rows] == [
        (m, p, f) for m in ('test_resnet', 'efficientvmamba_tiny') for p in ('fp32', 'bf16')
        for f in ('contiguous', 'channels_last')]
    for r in rows:
        assert r['status'] == 'ok' and r['cuda_graphs'] == 'False', r  # nothing is captured on CPU
        assert float(r['infer_img_s']) > 0 and float(r['train_img_s']) > 0 and float(r['latency_ms']) > 0
        # the host's part of a step is part of the step (medians of per-step pairs keep the order)
        assert 0 < float(r['train_host_ms']) <= float(r['train_step_ms']), r
        assert float(r['first_step_s']) > 0, r  # cold start: the build and the first training step
    md = (out / 'benchmark.md').read_text()
    meta = json.loads((out / 'benchmark.json').read_text())
    assert 'commit abc1234,' in md and meta['commit'] == 'abc1234'
    assert 'Command: `python tools/benchmark.py --models test_resnet' in md
    assert 'CUDA graphs: off (CPU)' in md and meta['cuda_graphs'] is False and '| CUDA graphs |' in md
    assert md.count('| efficientvmamba_tiny |') == 4 and meta['rows'] == json.loads(json.dumps(meta['rows']))


def test_benchmark_times_onnxruntime_beside_eager(tmp_path):
    pytest.importorskip('onnxruntime')
    pytest.importorskip('onnxscript')
    model = timm.create_model('test_resnet').eval()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.onnx.export(model, (torch.randn(2, 3, 32, 32),), dynamo=True, verbose=False,
                          dynamic_shapes=({0: 'batch', 2: 'height', 3: 'width'},)).save(str(tmp_path / 'test_resnet.onnx'))
    out = tmp_path / 'bench'
    proc = run_script('benchmark.py', '--models', 'test_resnet,efficientvmamba_tiny', '--modes', 'latency,ort',
                      '--onnx-dir', tmp_path, '--img-size', '32', '--iters', '2', '--warmup', '1', '--amp', 'fp32',
                      '--device', 'cpu', '--out-dir', out)
    assert proc.returncode == 1, proc.stderr[-2000:]  # a model without its file is a failed row
    rows = {r['model']: r for r in json.loads((out / 'benchmark.json').read_text())['rows']}
    assert rows['test_resnet']['status'] == 'ok' and rows['test_resnet']['ort_latency_ms'] > 0
    missing = rows['efficientvmamba_tiny']
    assert missing['latency_ms'] > 0 and 'ort_latency_ms' not in missing
    assert 'ort: error FileNotFoundError: no efficientvmamba_tiny.onnx in --onnx-dir' in missing['status']
    assert '| onnxruntime bs1 (ms) |' in (out / 'benchmark.md').read_text()


def test_benchmark_interleaved_latency_with_ratios(tmp_path):
    out = tmp_path / 'bench'
    proc = run_script('benchmark.py', '--models', 'test_resnet,efficientvmamba_tiny', '--modes', 'latency',
                      '--interleave', '--ratio-to', 'test_resnet', '--img-size', '32', '--iters', '3', '--warmup',
                      '1', '--amp', 'fp32', '--memory-formats', 'contiguous,channels_last', '--device', 'cpu',
                      '--out-dir', out)
    assert_ok(proc)
    meta = json.loads((out / 'benchmark.json').read_text())
    rows = {(r['model'], r['memory_format']): r for r in meta['rows']}
    assert sorted(rows) == sorted((m, f) for m in ('test_resnet', 'efficientvmamba_tiny')
                                  for f in ('contiguous', 'channels_last'))
    for (model, fmt), r in rows.items():
        assert r['status'] == 'ok' and r['latency_ms'] > 0 and r['batch_size'] == 1, r
        ref = rows['test_resnet', fmt]['latency_ms']
        assert r['latency_ratio'] == pytest.approx(r['latency_ms'] / ref, abs=0.006), r
    assert rows['test_resnet', 'contiguous']['latency_ratio'] == 1.0
    md = (out / 'benchmark.md').read_text()
    assert 'round-robin over the models' in md and 'Latency ratio: to test_resnet in the same run.' in md
    assert '| latency ratio |' in md


def test_benchmark_interleaves_onnxruntime_with_eager_and_gives_both_ratios(tmp_path):
    pytest.importorskip('onnxruntime')
    pytest.importorskip('onnxscript')
    names = ('test_resnet', 'test_efficientnet')
    for name in names:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            torch.onnx.export(timm.create_model(name).eval(), (torch.randn(2, 3, 32, 32),), dynamo=True,
                              verbose=False, dynamic_shapes=({0: 'batch', 2: 'height', 3: 'width'},)
                              ).save(str(tmp_path / f'{name}.onnx'))
    out = tmp_path / 'bench'
    proc = run_script('benchmark.py', '--models', ','.join(names), '--modes', 'latency,ort', '--onnx-dir', tmp_path,
                      '--interleave', '--ratio-to', 'test_resnet', '--img-size', '32', '--iters', '3', '--warmup', '1',
                      '--amp', 'fp32', '--device', 'cpu', '--out-dir', out)
    assert_ok(proc)
    rows = {r['model']: r for r in json.loads((out / 'benchmark.json').read_text())['rows']}
    ref = rows['test_resnet']
    for r in rows.values():
        assert r['status'] == 'ok' and r['latency_ms'] > 0 and r['ort_latency_ms'] > 0, r
        assert r['latency_ratio'] == pytest.approx(r['latency_ms'] / ref['latency_ms'], abs=0.006), r
        assert r['ort_latency_ratio'] == pytest.approx(r['ort_latency_ms'] / ref['ort_latency_ms'], abs=0.006), r
    assert ref['ort_latency_ratio'] == 1.0
    assert '| onnxruntime ratio |' in (out / 'benchmark.md').read_text()


def test_benchmark_model_lists():
    bench = load_tool('benchmark')
    names = bench.resolve_models('zoo-tiny,baselines')
    assert names[-4:] == ['convnext_tiny', 'swin_tiny_patch4_window7_224', 'resnet50', 'mambaout_tiny']
    families = load_tool('toolkit.cli').zoo_families()
    for family, members in families.items():
        assert any(n in names for n in members), f'no T variant of {family} benchmarked'
    assert 'groupmamba_base' not in names and 'plainmamba_l1' in names


def test_tools_bad_arguments(capsys):
    for tool, argv, message in (
            ('validate', ['--model', 'nope_xyz'], "unknown model 'nope_xyz'"),
            ('validate', ['--checkpoint', '/no/such.pth'], 'checkpoint not found'),
            ('flops', ['--models', 'nope_xyz'], "unknown model 'nope_xyz'"),
            ('flops', ['--counters', 'abacus'], '--counters'),
            ('benchmark', ['--amp', 'fp8'], '--amp must list'),
            ('benchmark', ['--modes', 'latency,ort'], '--modes ort needs --onnx-dir'),
            ('benchmark', ['--interleave', '--modes', 'infer,latency'], '--interleave times latency only'),
            ('benchmark', ['--models', 'test_resnet', '--ratio-to', 'resnet50', '--device', 'cpu'],
             "--ratio-to 'resnet50' must be one of the models measured"),
            ('benchmark', ['--models', 'resnet18', '--device', 'cuda:7'] if not torch.cuda.is_available()
             else ['--models', 'nope_xyz'], 'CUDA is not available' if not torch.cuda.is_available()
             else 'unknown model'),
    ):
        module = load_tool(tool)
        assert module.run_tool(module.main, argv) == 2, (tool, argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (tool, err)


def test_tools_say_a_missing_zoo_is_why_a_zoo_model_is_unknown(capsys, monkeypatch):
    """Run from a clone where vmamba_zoo is not installed, a zoo model name says so rather than only 'unknown'."""
    module = load_tool('validate')
    cli_common = sys.modules[module.create_model.__module__]
    monkeypatch.setattr(cli_common, 'import_zoo', lambda: False)
    monkeypatch.setattr(timm, 'is_model', lambda name: False)  # as timm answers before the zoo registered
    assert module.run_tool(module.main, ['--model', 'groupmamba_tiny']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown model 'groupmamba_tiny'" in err[0], err
    assert 'vmamba_zoo is not installed' in err[0] and 'pip install -e .' in err[0], err


# ---------------------------------------------------------------------------------------------- bench_kernels
def test_bench_kernels_host_overhead_runs_on_cpu():
    proc = run_script('bench_kernels.py', '--host-overhead', '--shapes', 'groupmamba_t_s1', 'spatialmamba_t_s1')
    assert_ok(proc)
    lines = [line for line in proc.stdout.splitlines() if 'host time per op call' in line]
    assert [line.split()[0] for line in lines] == ['groupmamba_t_s1', 'spatialmamba_t_s1']
    for line in lines:
        fwd, fwd_bwd = (float(w) for w in re.findall(r'(\d+) us', line))
        assert 0 < fwd < fwd_bwd, line


def test_bench_kernels_register_report_compiles_every_candidate_tile():
    proc = run_script('bench_kernels.py', '--registers', '--shapes', 'groupmamba_t_s1')
    assert_ok(proc)
    lines = [line for line in proc.stdout.splitlines() if line.startswith('groupmamba_t_s1')]
    kernels = {re.match(r'groupmamba_t_s1\s+(forward|backward)(, d_state 1)?', line).group(0).split(None, 1)[1]
               for line in lines}
    assert kernels == {'forward', 'backward', 'forward, d_state 1', 'backward, d_state 1'}, kernels
    for line in lines:
        registers = int(re.search(r'(\d+) registers', line).group(1))
        assert 0 < registers <= 255, line


def test_gpu_checks_script_refuses_without_cuda(tmp_path):
    proc = subprocess.run(['bash', os.path.join(REPO, 'tools', 'gpu_checks.sh'), str(tmp_path / 'out')],
                          capture_output=True, text=True, timeout=120, env=tool_env(CUDA_VISIBLE_DEVICES=''),
                          cwd=REPO)
    assert proc.returncode == 2 and 'gpu_checks.sh needs a CUDA device' in proc.stderr, proc.stderr
    assert subprocess.run(['bash', '-n', os.path.join(REPO, 'tools', 'gpu_checks.sh')]).returncode == 0
