"""tools/check_cuda_graphs.py on CPU: argument parsing and the eager comparison path (capture is GPU-only)."""
import json

from .tool_runner import assert_ok, load_tool, run_script


def test_cpu_smoke_runs_eager_comparison(tmp_path):
    proc = run_script('check_cuda_graphs.py', '--models', 'test_resnet', '--img-size', '32', '--batch-size', '2',
                      '--num-classes', '10', '--iters', '1', '--amp', 'fp32', '--device', 'cpu', '--out-dir', tmp_path)
    assert_ok(proc)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{')]
    assert [r['model'] for r in rows] == ['test_resnet']
    row = rows[0]
    assert row['ok'] and row['eager']['infer_err'] <= 1e-3 and row['eager']['train_err'] <= 1e-3
    assert row['manual'].startswith('skipped') and row['compiled'].startswith('skipped')
    saved = json.loads((tmp_path / 'check_cuda_graphs.json').read_text())
    assert saved['rows'][0]['model'] == 'test_resnet'
    assert '| test_resnet | yes |' in proc.stdout


def test_arguments_and_model_lists():
    tool = load_tool('check_cuda_graphs')
    args = tool.parse_args([])
    assert args.models.split(',') == list(tool.DEFAULT_MODELS) and args.amp == 'bf16' and not args.all
    zoo = tool.zoo_models()
    assert set(tool.DEFAULT_MODELS) <= set(zoo) and len(zoo) == 19


def test_comparison_fails_on_a_different_model():
    """The eager comparison can fail: a twin with other parameters gives a large error."""
    import torch
    tool = load_tool('check_cuda_graphs')
    args = tool.parse_args(['--amp', 'fp32', '--batch-size', '2', '--iters', '1'])
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    twin = tool.Eager(model, args, torch.device('cpu'))
    with torch.no_grad():
        model[1].weight.add_(1.0)
    x = torch.randn(2, 3, 2, 2)
    data = [(x, torch.tensor([0, 1])), (x, torch.tensor([0, 1]))]
    twin.model.load_state_dict = lambda state: None  # keep the twin's own (other) parameters
    res = tool.check_eager('m', model, twin, data, args, torch.device('cpu'))
    assert not res['ok'] and res['infer_err'] > 1e-3


def test_compiled_check_counts_graphs_and_times_first_calls(monkeypatch):
    """The compiled path, run on CPU through AOTAutograd (reduce-overhead's inductor and CUDA graphs need a GPU):
    a zoo model compiles one graph per mode, without graph breaks, and matches its eager twin."""
    import timm
    import torch
    import vmamba_zoo  # noqa: F401  (registers the models)
    tool = load_tool('check_cuda_graphs')
    compile_ = torch.compile
    monkeypatch.setattr(torch, 'compile', lambda model, mode=None: compile_(model, backend='aot_eager'))
    args = tool.parse_args(['--amp', 'fp32', '--batch-size', '2', '--iters', '1', '--num-classes', '10'])
    cpu = torch.device('cpu')
    torch.manual_seed(0)
    model = timm.create_model('vmamba_tiny_s1l8', depths=(1, 1, 1, 1), dims=(32, 64, 96, 128), num_classes=10)
    data = [(torch.randn(2, 3, 32, 32), torch.tensor([1, 7])) for _ in range(2)]
    twin = tool.Eager(model, args, cpu)
    res = tool.check_compiled(model, twin, data, args, cpu)
    assert res['infer_ok'] and res['train_ok'], res
    assert res['graphs'] == 2 and res['graph_breaks'] == 0, res
    assert res['first_infer_s'] > 0 and res['first_train_s'] > 0
