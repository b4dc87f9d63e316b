#!/usr/bin/env python3
"""Check that zoo models capture and replay as CUDA graphs, match eager, and time them with and without graphs.

For each model (dropout and drop-path off, so eager and graphs compute the same thing):

- ``manual``: PyTorch's whole-network recipe as tools/toolkit/cuda_graphs.py writes it (the one tools/benchmark.py
  times): warm-up on a side stream, then ``torch.cuda.CUDAGraph`` capture on static tensors of (a) inference and
  (b) a full training step (zero_grad, forward under autocast, CE loss, backward, AdamW with ``capturable=True``);
- ``compiled``: ``torch.compile(model, mode="reduce-overhead")`` (cudagraph trees), inference and forward+backward.

Each replay's outputs, loss and gradients are compared with an eager twin holding the same parameters (norm-relative
error; fp32 1e-3, bf16 5e-2), for the data the graph was captured with and for NEW data copied into the static
input (a stale result would fail). Timings: img/s of eager, manual graph and compiled steps.
One JSON line per model, then a table. ``--device cpu`` runs the eager comparison path only (a smoke test).

    python tools/check_cuda_graphs.py --out-dir results/graphs                      # one T model per family
    python tools/check_cuda_graphs.py --all --batch-size 32 --out-dir results/graphs
    python tools/check_cuda_graphs.py --models test_resnet --img-size 32 --batch-size 2 --device cpu  # smoke
"""
import argparse
import copy
import json
import os
import sys
import time
import traceback

import torch

from toolkit.cuda_graphs import cross_entropy_loss, graphed_inference, graphed_train_step

DEFAULT_MODELS = ("vmamba_tiny_s1l8", "groupmamba_tiny", "efficientvmamba_tiny", "spatialmamba_tiny",
                  "plainmamba_l1", "vim2_tiny")
FAMILY_MODULES = ("vmamba", "groupmamba", "efficientvmamba", "spatialmamba", "plainmamba", "mambamixer")
TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma list of model names")
    p.add_argument("--all", action="store_true", help="every registered zoo model")
    p.add_argument("--batch-size", "-b", type=int, default=32)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--amp", default="bf16", choices=sorted(TOLERANCE), help="autocast dtype of the steps")
    p.add_argument("--modes", default="manual,compiled", help="comma list of 'manual', 'compiled'")
    p.add_argument("--iters", type=int, default=20, help="timed iterations per measurement")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out-dir", default=None, help="write check_cuda_graphs.json here")
    return p.parse_args(argv)


def zoo_models():
    import timm
    import vmamba_zoo  # noqa: F401  (registers the models)

    return sorted({m for module in FAMILY_MODULES for m in timm.list_models(module=module)})


def rel_err(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _autocast(args, device):
    dtype = torch.bfloat16 if args.amp == "bf16" else torch.float32
    return torch.autocast(device.type, dtype=dtype, enabled=args.amp != "fp32")


def _grads(model):
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def _grad_err(model, ref_grads):
    return max(rel_err(g, r) for g, r in zip(_grads(model), ref_grads))


class Eager:
    """The eager twin: forward and gradients at given parameters (state dict copied in before each use)."""

    def __init__(self, model, args, device):
        self.model, self.args, self.device = copy.deepcopy(model), args, device

    def infer(self, state, x):
        self.model.load_state_dict(state)
        self.model.eval()
        with torch.no_grad(), _autocast(self.args, self.device):
            return self.model(x).float()

    def train(self, state, x, y):
        self.model.load_state_dict(state)
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        with _autocast(self.args, self.device):
            loss = cross_entropy_loss(self.model(x), y)
        loss.backward()
        return loss.detach().float(), _grads(self.model)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _img_s(fn, batch, iters, device):
    for _ in range(3):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return batch * iters / (time.perf_counter() - start)


def check_eager(name, model, eager, data, args, device):
    """The eager comparison path (also the CPU smoke test): the twin reproduces the model's own step."""
    (x1, y1), _ = data
    tol = TOLERANCE[args.amp]
    state = _state(model)
    model.eval()
    with torch.no_grad(), _autocast(args, device):
        out = model(x1).float()
    infer_err = rel_err(out, eager.infer(state, x1))
    model.train()
    model.zero_grad(set_to_none=True)
    with _autocast(args, device):
        loss = cross_entropy_loss(model(x1), y1)
    loss.backward()
    ref_loss, ref_grads = eager.train(state, x1, y1)
    train_err = max(rel_err(loss, ref_loss), _grad_err(model, ref_grads))
    return dict(ok=infer_err <= tol and train_err <= tol, infer_err=infer_err, train_err=train_err,
                eager_infer_img_s=_img_s(lambda: eager.infer(state, x1), args.batch_size, args.iters, device),
                eager_train_img_s=_img_s(lambda: eager.train(state, x1, y1), args.batch_size, args.iters, device))


def check_manual(model, eager, data, args, device):
    """torch.cuda.CUDAGraph capture (tools/toolkit/cuda_graphs.py) of inference and of a full training step, replayed
    with two inputs."""
    (x1, y1), (x2, y2) = data
    tol = TOLERANCE[args.amp]
    res = {}
    # (a) inference
    model.eval()
    infer = graphed_inference(model, x1, args.amp)
    state = _state(model)
    errs = [rel_err(infer(x).float(), eager.infer(state, x)) for x in (x1, x2)]
    res.update(infer_err=errs, infer_ok=max(errs) <= tol,
               graph_infer_img_s=_img_s(infer, args.batch_size, args.iters, device))
    del infer
    # (b) training step
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, capturable=True)
    train = graphed_train_step(model, opt, x1, y1, args.amp)
    errs, changed = [], []
    for x, y in ((x1, y1), (x2, y2)):
        state = _state(model)  # the parameters the replay starts from
        before = [p.detach().clone() for p in model.parameters()]
        loss = train(x, y)
        ref_loss, ref_grads = eager.train(state, x, y)
        errs.append(max(rel_err(loss, ref_loss), _grad_err(model, ref_grads)))
        changed.append(any(not torch.equal(b, p) for b, p in zip(before, model.parameters())))
    res.update(train_err=errs, train_ok=max(errs) <= tol and all(changed), params_updated=all(changed),
               graph_train_img_s=_img_s(train, args.batch_size, args.iters, device))
    return res


def _first_call_s(fn, device):
    """Seconds of a compiled function's first call: compilation, warm-up and CUDA graph recording."""
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def check_compiled(model, eager, data, args, device):
    """torch.compile(mode="reduce-overhead"): inference and forward+backward, compared after warm-up. Records the
    first call's seconds of each, the graphs compiled (one per mode: more is a recompilation) and graph breaks."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    (x1, y1), (x2, y2) = data
    tol = TOLERANCE[args.amp]
    cm = torch.compile(model, mode="reduce-overhead")
    res = {}
    model.eval()

    def infer(x):
        with torch.no_grad(), _autocast(args, device):
            return cm(x).float().clone()

    res["first_infer_s"] = _first_call_s(lambda: infer(x1), device)
    for _ in range(2):
        infer(x1)
    state = _state(model)
    errs = [rel_err(infer(x), eager.infer(state, x)) for x in (x1, x2)]
    res.update(infer_err=errs, infer_ok=max(errs) <= tol,
               compiled_infer_img_s=_img_s(lambda: infer(x1), args.batch_size, args.iters, device))
    model.train()

    def train(x, y):
        model.zero_grad(set_to_none=True)
        with _autocast(args, device):
            loss = cross_entropy_loss(cm(x), y)
        loss.backward()
        return loss.detach().clone()

    res["first_train_s"] = _first_call_s(lambda: train(x1, y1), device)
    for _ in range(2):
        train(x1, y1)
    state = _state(model)
    errs = []
    for x, y in ((x1, y1), (x2, y2)):
        loss = train(x, y)
        ref_loss, ref_grads = eager.train(state, x, y)
        errs.append(max(rel_err(loss, ref_loss), _grad_err(model, ref_grads)))
    res.update(train_err=errs, train_ok=max(errs) <= tol,
               compiled_train_img_s=_img_s(lambda: train(x1, y1), args.batch_size, args.iters, device),
               cudagraph_skips=dict(counters["inductor"]).get("cudagraph_skips", 0),
               graphs=counters["stats"]["unique_graphs"], graph_breaks=sum(counters["graph_break"].values()))
    return res


def check_model(name, args, device):
    import timm
    import vmamba_zoo  # noqa: F401

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=args.num_classes, drop_rate=0.0, drop_path_rate=0.0).to(device)
    shape = (args.batch_size, 3, args.img_size, args.img_size)
    g = torch.Generator(device="cpu").manual_seed(1)
    data = [(torch.randn(*shape, generator=g).to(device),
             torch.randint(0, args.num_classes, (args.batch_size,), generator=g).to(device)) for _ in range(2)]
    eager = Eager(model, args, device)
    row = dict(model=name, device=str(device), batch_size=args.batch_size, img_size=args.img_size, amp=args.amp)
    row["eager"] = check_eager(name, model, eager, data, args, device)
    modes = [m for m in args.modes.split(",") if m]
    if device.type != "cuda":
        row.update({m: "skipped (capture needs CUDA)" for m in modes})
    for mode, fn in (("manual", check_manual), ("compiled", check_compiled)):
        if mode in modes and device.type == "cuda":
            try:
                row[mode] = fn(copy.deepcopy(eager.model), eager, data, args, device)
            except Exception as e:  # noqa: BLE001  (report and go on to the next check)
                row[mode] = dict(error=f"{type(e).__name__}: {e}"[:2000], traceback=traceback.format_exc()[-4000:])
    checks = [row["eager"]["ok"]] + [row[m].get(k, False) for m in modes if isinstance(row.get(m), dict)
                                     for k in ("infer_ok", "train_ok")]
    row["ok"] = all(checks)
    return row


def table(rows):
    head = ("model", "ok", "eager inf", "graph inf", "compiled inf", "eager train", "graph train", "compiled train")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def num(d, k):
        return f"{d[k]:.0f}" if isinstance(d, dict) and isinstance(d.get(k), float) else (
            "error" if isinstance(d, dict) and "error" in d else "-")

    for r in rows:
        m, c = r.get("manual"), r.get("compiled")
        lines.append("| " + " | ".join([r["model"], "yes" if r["ok"] else "NO", num(r["eager"], "eager_infer_img_s"),
                                        num(m, "graph_infer_img_s"), num(c, "compiled_infer_img_s"),
                                        num(r["eager"], "eager_train_img_s"), num(m, "graph_train_img_s"),
                                        num(c, "compiled_train_img_s")]) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    names = zoo_models() if args.all else [m for m in args.models.split(",") if m]
    rows = []
    for name in names:
        row = check_model(name, args, device)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("img/s (batch %d, %s)\n%s" % (args.batch_size, args.amp, table(rows)), flush=True)
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, "check_cuda_graphs.json"), "w") as f:
            json.dump(dict(command=" ".join(sys.argv), device=torch.cuda.get_device_name(device)
                           if device.type == "cuda" else "cpu", rows=rows), f, indent=1)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
