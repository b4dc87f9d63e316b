"""Compile this library's kernels for an NVIDIA target without a GPU, and read their register use and loops.

Triton compiles for a given target offline and its wheel ships ptxas, so a CPU-only machine can check that
every kernel variant compiles for the GPUs users have, and see the registers and spills of each tile: the
resource that limits these kernels (``model_cards/benchmarks/kernels.md``). Pointer arguments get the
element types of a bf16 model (fp32 parameters and workspaces); nothing here runs a kernel.
"""
import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

__all__ = ["POINTER_TYPES", "compile_kernel", "inner_loop_instructions", "resource_usage"]

POINTER_TYPES = {
    "x": "bf16", "delta": "bf16", "A": "fp32", "B": "bf16", "C": "bf16", "D": "fp32", "delta_bias": "fp32",
    "z": "bf16", "routes": "i32", "param_routes": "i32", "first_visit": "i8", "parallel_ok": "i32",
    "coverage": "i32", "x_visited": "i8", "param_visited": "i8", "out_visited": "i8", "out": "bf16",
    "last_state": "fp32", "chunk_states": "fp32", "dout": "bf16", "dlast_state": "fp32", "dx": "bf16",
    "ddelta": "bf16", "dz": "bf16", "dB_part": "fp32", "dC_part": "fp32", "dA_part": "fp32", "dD_part": "fp32",
    "dbias_part": "fp32", "first_key": "i32", "x_visited_any": "i8", "route_info": "i32",
}


_TYPES = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32", "torch.float64": "fp64",
          "torch.int64": "i64", "torch.int32": "i32", "torch.int8": "i8", "torch.uint8": "u8"}


def compile_kernel(fn, constants: dict, num_warps: int, arch: int = 90, maxnreg=None, args=None):
    """``fn`` compiled for sm_<arch> with its constexpr arguments set from ``constants`` (all must be given);
    ``maxnreg`` caps the registers per thread.

    Without ``args`` every other argument is a 32-bit integer or a pointer typed by ``POINTER_TYPES``. With
    ``args`` (the tensors and integers of a real launch, by name) the signature takes each tensor's element
    type and the specialization Triton applies at launch: integers equal to 1 become constants, multiples of
    16 and 16-byte aligned pointers are marked divisible by 16 (which sets the vector widths the kernel gets).
    """
    missing = [p.name for p in fn.params if p.is_constexpr and p.name not in constants]
    if missing:
        raise ValueError(f"{fn.__name__}: constants not given for {missing}")
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        name = param.name
        if name in constants:
            signature[name] = "constexpr"
            constexprs[(i,)] = constants[name]
        elif args is None:
            signature[name] = "*" + POINTER_TYPES[name] if name in POINTER_TYPES else "i32"
        elif hasattr(args[name], "data_ptr"):
            signature[name] = "*" + _TYPES[str(args[name].dtype)]
            if args[name].data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(args[name], float):
            signature[name] = "fp32"
        else:
            value = int(args[name])
            if value == 1 and not param.do_not_specialize:
                signature[name] = "constexpr"
                constexprs[(i,)] = 1
                continue
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0 and not param.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
    options = dict(num_warps=num_warps) if maxnreg is None else dict(num_warps=num_warps, maxnreg=maxnreg)
    return triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", arch, 32), options=options)


def _bundled_tool(name: str) -> str:
    """Path of a CUDA tool that Triton's wheel ships (ptxas, cuobjdump)."""
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def resource_usage(compiled, arch: str = "sm_90a") -> dict:
    """Registers per thread and spill bytes of a compiled kernel, as Triton's bundled ptxas reports them."""
    ptxas = _bundled_tool("ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        report = subprocess.run([ptxas, f"-arch={arch}", "-v", ptx, "-o", os.path.join(tmp, "kernel.cubin")],
                                capture_output=True, text=True, check=True).stderr
    usage = {}
    for line in report.splitlines():
        words = line.replace(",", " ").split()
        for i, word in enumerate(words[1:], 1):
            if word == "registers" and words[i - 1].isdigit():
                usage["registers"] = int(words[i - 1])
            if word == "spill" and words[i - 2].isdigit():
                usage[f"spill_{words[i + 1]}"] = int(words[i - 2])
    return usage


def inner_loop_instructions(compiled, min_length: int = 150, containing: str = "MUFU") -> collections.Counter:
    """Opcode counts of the innermost long loop of a compiled kernel's SASS: the shortest loop (a backward
    branch and the code it jumps over) of at least ``min_length`` instructions that holds a ``containing``
    instruction (None: any), which in the scan kernels is the chunk or step loop: the one that computes
    exponentials (the loops that zero outputs hold none). Empty when there is none."""
    cuobjdump = _bundled_tool("cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True).stdout
    code = []  # (address, opcode, operands)
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)(?:\.[A-Z0-9_.]+)?\s*(.*)", line)
        if m:
            code.append((int(m.group(1), 16), m.group(2), m.group(3)))
    loops = []
    for address, opcode, operands in code:
        target = re.search(r"0x([0-9a-f]+)", operands) if opcode == "BRA" else None
        if target and int(target.group(1), 16) < address:
            body = [op for a, op, _ in code if int(target.group(1), 16) <= a <= address]
            if len(body) >= min_length and (containing is None or containing in body):
                loops.append(body)
    return collections.Counter(min(loops, key=len)) if loops else collections.Counter()
