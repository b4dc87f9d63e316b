"""tools/cuda_graphs.py (the shared capture recipe) and its use by tools/benchmark.py, on CPU.

Capture itself needs CUDA (tools/check_cuda_graphs.py checks it on the device); here: the guards, the static-input
copy and replay, the loss, and the benchmark's flag, row fields and eager fallback."""
import inspect

import pytest
import torch
import torch.nn.functional as F

from .tool_runner import load_tool

IMG = 32


@pytest.fixture(scope='module')
def graphs():
    return load_tool('toolkit.cuda_graphs')


@pytest.fixture(scope='module')
def bench():
    return load_tool('benchmark')


# ------------------------------------------------------------------------------------------------ the recipe
def test_capture_on_cpu_raises_a_clear_error(graphs):
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(2, 4), torch.tensor([0, 2])
    with pytest.raises(ValueError, match=r'expected x on cuda, got cpu'):
        graphs.graphed_inference(model, x, 'bf16')
    with pytest.raises(ValueError, match=r'capturable=True'):
        graphs.graphed_train_step(model, torch.optim.AdamW(model.parameters()), x, y, 'bf16')
    opt = torch.optim.AdamW(model.parameters(), capturable=True)
    with pytest.raises(ValueError, match=r'expected x on cuda, got cpu'):
        graphs.graphed_train_step(model, opt, x, y, 'fp32')
    with pytest.raises(TypeError, match='torch.optim.Optimizer'):
        graphs.graphed_train_step(model, None, x, y)


def test_amp_is_validated(graphs):
    model, x = torch.nn.Linear(4, 3), torch.randn(2, 4)
    with pytest.raises(ValueError, match="'fp8'"):
        graphs.graphed_inference(model, x, 'fp8')
    with pytest.raises(ValueError, match='float64'):
        graphs.graphed_inference(model, x, torch.float64)
    with pytest.raises(TypeError, match='int'):
        graphs.graphed_inference(model, x, 16)


class DoublingGraph:
    """Stands in for a captured graph: a replay recomputes the static output from the static input in place."""

    def __init__(self, static_in, static_out):
        self.static_in, self.static_out, self.replays = static_in, static_out, 0

    def replay(self):
        self.replays += 1
        self.static_out.copy_(2 * self.static_in)


def test_replay_reads_the_copied_input_never_a_stale_one(graphs):
    static_in = torch.zeros(2, 3)
    static_out = torch.empty(2, 3)
    step = graphs.GraphedStep(DoublingGraph(static_in, static_out), (static_in,), static_out)
    for _ in range(2):
        x = torch.randn(2, 3)
        out = step(x)
        assert out is static_out and torch.equal(out, 2 * x) and torch.equal(static_in, x)
    x_last = static_in.clone()
    assert torch.equal(step(), 2 * x_last) and step.graph.replays == 3  # no inputs: replay on what is there
    with pytest.raises(ValueError, match=r'shape \(2, 3\) torch.float32, got \(3, 3\) torch.float32'):
        step(torch.randn(3, 3))
    with pytest.raises(ValueError, match='torch.float64'):
        step(torch.randn(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match='expected 1 input tensors, got 2'):
        step(torch.randn(2, 3), torch.randn(2, 3))
    assert torch.equal(static_in, x_last) and step.graph.replays == 3  # a refused call copies and replays nothing


def test_loss_is_fp32_cross_entropy_of_the_mean_head(graphs):
    a, b = torch.randn(4, 5, dtype=torch.bfloat16), torch.randn(4, 5, dtype=torch.bfloat16)
    y = torch.tensor([0, 1, 4, 2])
    loss = graphs.cross_entropy_loss(a, y)
    assert loss.dtype == torch.float32 and torch.allclose(loss, F.cross_entropy(a.float(), y))
    assert torch.allclose(graphs.cross_entropy_loss((a, b), y), F.cross_entropy(((a + b) / 2).float(), y))


def test_the_tools_share_one_recipe():
    for name in ('benchmark', 'check_cuda_graphs'):
        source = inspect.getsource(load_tool(name))
        assert 'CUDAGraph(' not in source and 'torch.cuda.graph(' not in source, name
        assert 'from toolkit.cuda_graphs import' in source, name


# --------------------------------------------------------------------------------------------- benchmark.py
def test_benchmark_flag(bench):
    on, off = bench.build_parser().parse_args([]), bench.build_parser().parse_args(['--no-cuda-graphs'])
    assert on.cuda_graphs is True and off.cuda_graphs is False
    cuda, cpu = torch.device('cuda'), torch.device('cpu')
    assert bench.graphs_wanted(on, cuda) and not bench.graphs_wanted(off, cuda)
    assert not bench.graphs_wanted(on, cpu) and not bench.graphs_wanted(off, cpu)


def test_benchmark_failure_versus_fallback(bench):
    assert not bench.failed('ok')
    assert not bench.failed('train: eager, CUDA graph capture failed (RuntimeError: CUDA error: x)')
    assert not bench.failed('train: OOM')
    assert bench.failed('infer: error RuntimeError: boom')
    assert bench.failed('latency: eager, CUDA graph capture failed (ValueError: v); train: error KeyError: k')
    assert bench.failed('error ValueError: cannot build')


def _args(bench, *extra):
    return bench.build_parser().parse_args(['--batch-size', '2', '--img-size', str(IMG), '--iters', '1',
                                            '--warmup', '0', *extra])


def _sgd(model, capturable):
    return torch.optim.SGD(model.parameters(), lr=1e-3)  # AdamW(capturable=True) cannot step on CPU


def test_benchmark_cpu_row_records_no_graphs(bench):
    row = bench.bench_model('test_resnet', _args(bench), torch.device('cpu'), 'fp32', 'contiguous')
    assert row['cuda_graphs'] is False and row['status'] == 'ok', row
    assert row['train_img_s'] > 0 and row['infer_img_s'] > 0 and row['latency_ms'] > 0


def test_benchmark_falls_back_to_eager_and_says_why(bench, monkeypatch):
    """Capture forced on CPU: the recipe's device guard refuses, every mode is timed eager, the status says so."""
    monkeypatch.setattr(bench, 'graphs_wanted', lambda args, device: True)
    monkeypatch.setattr(bench, 'train_optimizer', _sgd)
    row = bench.bench_model('test_resnet', _args(bench), torch.device('cpu'), 'fp32', 'contiguous')
    assert row['cuda_graphs'] is False
    notes = row['status'].split('; ')
    assert [n.split(':')[0] for n in notes] == ['train', 'infer', 'latency'], row['status']
    for n in notes:
        assert 'eager, CUDA graph capture failed (ValueError: CUDA graph capture needs CUDA tensors' in n, n
    assert not bench.failed(row['status'])
    assert row['train_img_s'] > 0 and row['infer_img_s'] > 0 and row['latency_ms'] > 0 and row['first_step_s'] > 0


def test_benchmark_times_replays_when_capture_succeeds(bench, monkeypatch):
    """With capture standing in for CUDA: the timed calls are the replays, the optimizer is built capturable
    (and rebuilt eager on fallback), the cold start stays an eager step, fp16 training stays eager and says so."""
    calls, built = [], []

    def fake_train(model, optimizer, x, y, amp):
        return lambda: calls.append(('train', amp))

    def fake_infer(model, x, amp):
        return lambda: calls.append(('infer', x.shape[0], amp))

    def optimizer(model, capturable):
        built.append(capturable)
        return _sgd(model, capturable)

    monkeypatch.setattr(bench, 'graphs_wanted', lambda args, device: True)
    monkeypatch.setattr(bench, 'train_optimizer', optimizer)
    monkeypatch.setattr(bench, 'graphed_train_step', fake_train)
    monkeypatch.setattr(bench, 'graphed_inference', fake_infer)
    row = bench.bench_model('test_resnet', _args(bench), torch.device('cpu'), 'bf16', 'contiguous')
    assert row['cuda_graphs'] is True and row['status'] == 'ok', row
    assert built == [True] and row['first_step_s'] > 0
    assert calls == [('train', 'bf16')] * 2 + [('infer', 2, 'bf16')] + [('infer', 1, 'bf16')] * 3, calls

    calls.clear()
    built.clear()
    row = bench.bench_model('test_resnet', _args(bench), torch.device('cpu'), 'fp16', 'contiguous')
    assert row['cuda_graphs'] is False and built == [False], row
    assert row['status'] == "train: eager, fp16's GradScaler step reads the host and cannot be captured"
    assert [c[0] for c in calls] == ['infer'] * 4

    monkeypatch.setattr(bench, 'graphed_train_step', lambda *a: (_ for _ in ()).throw(RuntimeError('no graph')))
    built.clear()
    row = bench.bench_model('test_resnet', _args(bench, '--modes', 'train'), torch.device('cpu'), 'fp32',
                            'contiguous')
    assert built == [True, False] and row['cuda_graphs'] is False and row['train_img_s'] > 0
    assert row['status'] == 'train: eager, CUDA graph capture failed (RuntimeError: no graph)'


# ------------------------------------------------------------------------------------------------ training runs
def _adamw_run(steps, seed=0, capturable=False, state=None):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    gen = torch.Generator().manual_seed(seed + 1)
    batches = [(torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(steps)]
    return model, opt, batches


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()


def test_training_state_undoes_warm_up_steps_exactly(graphs):
    """A run that warms up (three real updates) and restores must continue exactly like a run that never did,
    both from a fresh optimizer (state created during the warm-up is zeroed) and from one with state (resume)."""
    for pre_steps in (0, 2):
        model, opt, batches = _adamw_run(5)
        ref_model, ref_opt, _ = _adamw_run(5)
        _train(model, opt, batches[:pre_steps])
        _train(ref_model, ref_opt, batches[:pre_steps])
        snapshot = graphs.TrainingState(model, opt)
        _train(model, opt, [batches[-1]] * 3)  # the warm-up: moves weights, BN statistics and moments
        assert not torch.equal(model[0].weight, ref_model[0].weight)
        snapshot.restore()
        _train(model, opt, batches[pre_steps:])
        _train(ref_model, ref_opt, batches[pre_steps:])
        for (name, a), b in zip(model.state_dict().items(), ref_model.state_dict().values()):
            assert torch.equal(a, b), (pre_steps, name)
        for p, q in zip(model.parameters(), ref_model.parameters()):
            for k in ('exp_avg', 'exp_avg_sq', 'step'):
                assert torch.equal(opt.state[p][k], ref_opt.state[q][k]), (pre_steps, k)


def test_learning_rate_tensors_follow_the_scheduler(graphs):
    """While installed the groups read device tensors (what a capture bakes in); afterwards they hold the
    scheduler's floats again, and update() copies those floats into the tensors."""
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW([{'params': [model.weight], 'lr': 0.1}, {'params': [model.bias], 'lr': 0.2}])
    rates = graphs.LearningRateTensors(opt, torch.device('cpu'))
    with rates.installed():
        assert [g['lr'] for g in opt.param_groups] == rates.tensors
    assert [g['lr'] for g in opt.param_groups] == [0.1, 0.2]
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step()
    sched.step()
    rates.update()
    assert [t.item() for t in rates.tensors] == pytest.approx([0.05, 0.1])

