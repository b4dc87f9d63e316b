"""Whole-step CUDA graphs: the one capture recipe that tools/benchmark.py and tools/check_cuda_graphs.py share.

PyTorch's whole-network recipe (``torch.cuda.graphs`` docs): run the step a few times on a side stream, so that
lazy state (optimizer moments, cuBLAS workspaces, Triton compilation and tuning, route caches) exists before
capture, then capture one step on static tensors with ``torch.cuda.graph``. A replay runs the captured kernels on
whatever the static tensors hold, so new data is copied into them first; the host launches one graph instead of
thousands of kernels, which is where host-bound models gain.

    step = graphed_train_step(model, optimizer, x, y, amp='bf16')   # optimizer built with capturable=True
    loss = step(x_next, y_next)    # copy into the static inputs, replay, return the static loss
    infer = graphed_inference(model.eval(), x, amp='bf16')
    logits = infer(x_next)

The returned tensors are the graph's own outputs: the next replay overwrites them, so clone what must be kept.
The caller chooses ``model.train()`` / ``model.eval()`` before capture; the graph keeps the mode it saw.
"""
import contextlib

import torch
import torch.nn.functional as F

WARMUP_STEPS = 3  # side-stream steps before capture (the count PyTorch's recipe uses)
AMP_DTYPES = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def _amp_dtype(amp):
    """``amp`` as an autocast dtype, or None for no autocast. Accepts a name in AMP_DTYPES, a dtype, or None."""
    if amp is None or isinstance(amp, torch.dtype):
        if amp in (None, torch.float32):
            return None
        if amp not in (torch.bfloat16, torch.float16):
            raise ValueError(f'amp must be bfloat16, float16, float32 or None, got {amp}')
        return amp
    if isinstance(amp, str):
        if amp not in AMP_DTYPES:
            raise ValueError(f'amp must be one of {sorted(AMP_DTYPES)}, got {amp!r}')
        return AMP_DTYPES[amp]
    raise TypeError(f'amp must be a str, a torch.dtype or None, got {type(amp).__name__}')


def _autocast(dtype):
    if dtype is None:
        return torch.autocast('cuda', enabled=False)
    return torch.autocast('cuda', dtype=dtype)


def cross_entropy_loss(out, y):
    """The training loss of both tools: cross entropy in fp32; a model returning several logits (distillation
    heads) is trained on their mean."""
    if isinstance(out, (tuple, list)):
        out = sum(out) / len(out)
    return F.cross_entropy(out.float(), y)


def _require_cuda(model, tensors):
    """Capture needs the model and every static input on a CUDA device: say which one is not."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f'{name} must be a torch.Tensor, got {type(t).__name__}')
        if t.device.type != 'cuda':
            raise ValueError(f'CUDA graph capture needs CUDA tensors: expected {name} on cuda, got {t.device}')
    for pname, p in model.named_parameters():
        if p.device.type != 'cuda':
            raise ValueError(f'CUDA graph capture needs a CUDA model: expected parameter {pname} on cuda, '
                             f'got {p.device}')


def _require_capturable(optimizer):
    """An optimizer whose step reads its step count on the host cannot be captured; Adam-style optimizers say so
    with ``capturable``. Optimizers without the option (e.g. SGD) keep no host-side step state."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f'optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}')
    for i, group in enumerate(optimizer.param_groups):
        if 'capturable' in group and not group['capturable']:
            raise ValueError(f'{type(optimizer).__name__} must be created with capturable=True to be captured '
                             f'in a CUDA graph (param group {i} has capturable=False)')


def copy_inputs(static, new):
    """Copy ``new`` tensors into the graph's ``static`` tensors in place, checking that each matches the shape,
    dtype and device the graph was captured with (a mismatch would otherwise broadcast or fail inside copy_)."""
    if len(new) != len(static):
        raise ValueError(f'expected {len(static)} input tensors, got {len(new)}')
    for i, (s, n) in enumerate(zip(static, new)):
        if not isinstance(n, torch.Tensor):
            raise TypeError(f'input {i} must be a torch.Tensor, got {type(n).__name__}')
        if n.shape != s.shape or n.dtype != s.dtype:
            raise ValueError(f'input {i}: the graph was captured for shape {tuple(s.shape)} {s.dtype}, '
                             f'got {tuple(n.shape)} {n.dtype}')
        if n.device != s.device:
            raise ValueError(f'input {i}: expected device {s.device}, got {n.device}')
    for s, n in zip(static, new):
        if n is not s:
            s.copy_(n)


class GraphedStep:
    """A captured step. ``step()`` replays on what the static inputs hold; ``step(*inputs)`` copies ``inputs`` in
    first. Returns the static output, which the next replay overwrites."""

    def __init__(self, graph, static_inputs, static_output):
        self.graph = graph
        self.static_inputs = tuple(static_inputs)
        self.static_output = static_output

    def __call__(self, *inputs):
        if inputs:
            copy_inputs(self.static_inputs, inputs)
        self.graph.replay()
        return self.static_output


def _warm_up(fn, steps):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(steps):
            fn()
    torch.cuda.current_stream().wait_stream(side)


def graphed_inference(model, x, amp=None, warmup=WARMUP_STEPS):
    """Capture ``model(x)`` under ``torch.no_grad`` and autocast ``amp``; returns a GraphedStep whose call
    ``infer(x_new)`` gives the model's output for ``x_new`` (same shape and dtype as ``x``)."""
    dtype = _amp_dtype(amp)
    _require_cuda(model, {'x': x})
    static_x = x.clone()

    def forward():
        with torch.no_grad(), _autocast(dtype):
            return model(static_x)

    _warm_up(forward, warmup)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = forward()
    return GraphedStep(graph, (static_x,), static_out)


def graphed_train_step(model, optimizer, x, y, amp=None, loss_fn=cross_entropy_loss, warmup=WARMUP_STEPS):
    """Capture a full training step: ``optimizer.zero_grad``, forward under autocast ``amp``,
    ``loss_fn(output, y)``, backward and ``optimizer.step()``. The optimizer must be built with
    ``capturable=True`` where it has that option. Warm-up takes ``warmup`` real steps (the parameters move).
    Returns a GraphedStep: ``step(x_new, y_new)`` trains on the new batch and returns the loss tensor; gradients
    stay in ``p.grad`` until the next replay."""
    dtype = _amp_dtype(amp)
    if not callable(loss_fn):
        raise TypeError(f'loss_fn must be callable, got {type(loss_fn).__name__}')

    def step(static_x, static_y):
        optimizer.zero_grad(set_to_none=True)
        with _autocast(dtype):
            loss = loss_fn(model(static_x), static_y)
        loss.backward()
        optimizer.step()
        return loss

    return capture_train_step(step, model, optimizer, x, y, warmup=warmup, names=('x', 'y'))


def capture_train_step(step, model, optimizer, *inputs, warmup=WARMUP_STEPS, undo_warmup=False, names=None):
    """Capture ``step(*static_inputs)``, a function that runs one whole update of ``model`` with ``optimizer``
    (zero_grad, forward, loss, backward, optimizer step) and returns the loss tensor.

    ``undo_warmup``: put the parameters, buffers and optimizer state back as they were before the warm-up steps,
    so that the first replay is the run's first update (what a training run needs; a benchmark does not care).
    ``names``: what errors call the inputs (default 'input 0', 'input 1', ...).
    Returns a GraphedTrainStep, whose learning rates follow the optimizer's param groups (see
    LearningRateTensors), so a scheduler keeps working."""
    _require_capturable(optimizer)
    _require_cuda(model, dict(zip(names or [f'input {i}' for i in range(len(inputs))], inputs)))
    static_inputs = tuple(t.clone() for t in inputs)
    learning_rates = LearningRateTensors(optimizer, inputs[0].device)
    snapshot = TrainingState(model, optimizer) if undo_warmup else None
    with learning_rates.installed():
        try:
            _warm_up(lambda: step(*static_inputs), warmup)
        finally:  # also when a warm-up step fails: the caller may go on training eagerly
            if snapshot is not None:
                snapshot.restore()
        graph = torch.cuda.CUDAGraph()
        # Gradients are allocated inside the capture, from the graph's pool, so that replays write them in place.
        optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            static_loss = step(*static_inputs)
    return GraphedTrainStep(graph, static_inputs, static_loss, learning_rates)


class GraphedTrainStep(GraphedStep):
    """A captured training step that copies the optimizer's current learning rates in before each replay."""

    def __init__(self, graph, static_inputs, static_output, learning_rates):
        super().__init__(graph, static_inputs, static_output)
        self.learning_rates = learning_rates

    def __call__(self, *inputs):
        self.learning_rates.update()
        return super().__call__(*inputs)


class LearningRateTensors:
    """A captured optimizer step reads a float learning rate as a constant of the graph, so a scheduler's later
    values would never reach it. While capturing, each param group's ``lr`` is a one-element device tensor
    (Adam-style optimizers accept a tensor lr when capturable); afterwards the groups hold floats again, as
    schedulers, logs and checkpoints expect, and ``update()`` copies those floats into the tensors the graph
    reads (a fill kernel per group, no host synchronisation)."""

    def __init__(self, optimizer, device):
        self.optimizer = optimizer
        self.tensors = [torch.tensor(float(g['lr']), device=device, dtype=torch.float32)
                        for g in optimizer.param_groups]

    @contextlib.contextmanager
    def installed(self):
        floats = [g['lr'] for g in self.optimizer.param_groups]
        self.update()
        for g, t in zip(self.optimizer.param_groups, self.tensors):
            g['lr'] = t
        try:
            yield
        finally:
            for g, lr in zip(self.optimizer.param_groups, floats):
                g['lr'] = lr

    def update(self):
        for g, t in zip(self.optimizer.param_groups, self.tensors):
            t.fill_(float(g['lr']))


class TrainingState:
    """Copies of a model's parameters and buffers and of its optimizer's state, taken at construction;
    ``restore()`` writes them back in place (the captured graph keeps reading the same storage). Optimizer state
    that did not exist yet (the first steps of a run) is zeroed, which for Adam-style moments and step counts
    is exactly a fresh optimizer's state."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer
        with torch.no_grad():
            self.tensors = {name: t.detach().clone() for name, t in self._model_tensors()}
            self.optimizer_state = {id(p): {k: v.detach().clone() for k, v in s.items()
                                            if isinstance(v, torch.Tensor)}
                                    for p, s in optimizer.state.items()}

    def _model_tensors(self):
        yield from self.model.named_parameters()
        yield from self.model.named_buffers()

    @torch.no_grad()
    def restore(self):
        for name, t in self._model_tensors():
            t.copy_(self.tensors[name])
        for p, state in self.optimizer.state.items():
            saved = self.optimizer_state.get(id(p), {})
            for k, v in state.items():
                if isinstance(v, torch.Tensor):
                    if k in saved:
                        v.copy_(saved[k])
                    else:
                        v.zero_()
