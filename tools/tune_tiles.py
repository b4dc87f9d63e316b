"""Fill the committed tile table (kernels/triton/tile_table.json) on a GPU.

Runs each model's inference forward and training forward+backward with tuning runs on
(VMAMBA_KERNELS_TUNE=1), reads every tuner's picks and merges them into the table under this GPU's family
("sm90" for H100 and H200), keeping other families' entries. The table is written atomically after each model,
so an interrupted run keeps what it measured. Tuner keys do not include the batch, so a model that runs out of
memory is retried at half the batch, down to --min-batch-size.

    python tools/tune_tiles.py --models vmamba_tiny_s1l8,groupmamba_tiny,efficientvmamba_tiny,spatialmamba_tiny,\\
        plainmamba_l1,vim2_tiny --batch-size 128 --batch-sizes vim2_tiny=32 --amp bf16 \\
        --out kernels/triton/tile_table.json
"""
import argparse
import os
import sys
import time
from datetime import datetime, timezone

os.environ["VMAMBA_KERNELS_TUNE"] = "1"  # before vmamba_kernels is imported


def parse_batch_sizes(items):
    """'vim2_tiny=32,plainmamba_l1=64' → {'vim2_tiny': 32, 'plainmamba_l1': 64}."""
    out = {}
    for item in (items or "").split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"--batch-sizes takes name=batch items, got {item!r}")
        out[name.strip()] = int(value)
    return out


def harvest(table, family, tuners, measured=None):
    """``table`` with every tuner's picks merged in under ``family`` ({kernel name: tuner})."""
    from vmamba_kernels.triton import tiles

    for kernel, tuner in tuners.items():
        table = tiles.merge_entries(table, family, kernel, tiles.tuned_entries(tuner), measured)
    return table


def run_model(name, batch, amp, img_size, device):
    """One inference forward and one training forward+backward at ``batch``."""
    import torch
    from toolkit.cli import create_model, import_zoo

    import_zoo()
    model = create_model(name, img_size=img_size).to(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    cast = torch.autocast("cuda", dtype=dtype) if dtype else torch.autocast("cuda", enabled=False)
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    try:
        model.eval()
        with torch.inference_mode(), cast:
            model(x)
        model.train()
        with cast:
            loss = model(x).float().logsumexp(-1).mean()
        loss.backward()
        torch.cuda.synchronize()
    finally:
        del model, x


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", required=True, help="comma list of model names")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batch-sizes", default="", help="per-model batch, e.g. vim2_tiny=32")
    p.add_argument("--min-batch-size", type=int, default=8, help="smallest batch an out-of-memory retry tries")
    p.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--out", default=None, help="table to merge into (default: the package's tile_table.json)")
    args = p.parse_args(argv)

    import torch
    import triton

    from vmamba_kernels.triton import tiles

    if not torch.cuda.is_available():
        print("tune_tiles: no CUDA device; tuning runs need a GPU", file=sys.stderr)
        return 2
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    batches = parse_batch_sizes(args.batch_sizes)
    out = args.out or tiles.TABLE_PATH
    device = torch.device("cuda")
    family = tiles.gpu_family(device)
    table = tiles.read_table(out)
    measured = {"device": torch.cuda.get_device_name(device), "triton": triton.__version__,
                "torch": torch.__version__, "amp": args.amp,
                "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}
    print(f"tune_tiles: {len(models)} models on {measured['device']} ({family}), triton {triton.__version__}, "
          f"torch {torch.__version__}, into {out}", flush=True)
    start = time.time()
    failed = []
    for i, name in enumerate(models, 1):
        t0 = time.time()
        before = sum(len(t.cache) for t in tiles.TUNERS.values())
        batch = batches.get(name, args.batch_size)
        while True:
            try:
                run_model(name, batch, args.amp, args.img_size, device)
                break
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                if batch // 2 < args.min_batch_size:
                    print(f"[{i}/{len(models)}] {name}: out of memory down to batch {batch}; skipped", flush=True)
                    failed.append(name)
                    batch = None
                    break
                print(f"[{i}/{len(models)}] {name}: out of memory at batch {batch}, retrying at {batch // 2} "
                      "(tuner keys do not include the batch)", flush=True)
                batch //= 2
        torch.cuda.empty_cache()
        if batch is None:
            continue
        new = sum(len(t.cache) for t in tiles.TUNERS.values()) - before
        done = sorted(set(table["gpus"].get(family, {}).get("measured", {}).get("models", [])) | {name})
        table = harvest(table, family, tiles.TUNERS, dict(measured, models=done))
        tiles.write_table(table, out)
        print(f"[{i}/{len(models)}] {name}: batch {batch}, {new} new problems tuned in {time.time() - t0:.0f}s "
              f"(total {time.time() - start:.0f}s); table written", flush=True)
    entries = sum(len(v) for v in table["gpus"].get(family, {}).get("kernels", {}).values())
    print(f"tune_tiles: {entries} {family} problems in {out} after {time.time() - start:.0f}s"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
