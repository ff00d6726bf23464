"""Compile the kernels for a GPU without one: `python -m hf_scd.kernels.aot [--arch 90]` prints, per kernel and
autotuning config, the registers, stack (spills) and shared memory a thread block takes, the widths of its global
loads and stores, and the tensor-core work it issues per token and head.

Triton's compiler and ptxas need no GPU, so on a CPU machine this shows what a launch on an H100 would run: each
kernel is compiled with the arguments its real launch builds (Llama-3-8B and SmolLM2 shaped caches, bf16) and the
specialisation Triton would give them (16-byte aligned pointers and multiples of 16, ones folded in).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ._launch import KernelLaunch

SHAPES = {"Llama-3-8B": (32, 8, 128), "SmolLM2-135M": (30, 3, 64)}  # layers, KV heads, head_dim
# The shipped same-model artifacts' joint units: layers, KV heads, head_dim, layers a unit.
JOINT_SHAPES = {"SmolLM2-135M": (30, 3, 64, 5), "Qwen2.5-Coder-0.5B": (24, 2, 64, 8)}
_TYPES = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.uint8: "u8",
}
_ACCESS = re.compile(r"\b(ld|st)\.global(?:\.[a-z]+)*?(?:\.v(\d))?\.b(\d+)\b")
# A warp's mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 or a warpgroup's wgmma.mma_async.sync.aligned.m64n64k16
# .f32.bf16.bf16: its shape and input type.
_MMA = re.compile(r"\b(wgmma\.mma_async|mma)\.sync\.aligned\.m(\d+)n(\d+)k(\d+)\S*?\.(bf16|f16|tf32|s8|u8|e4m3|e5m2)\.")
# Tensor-core rate of each input type relative to bf16 on Hopper (datasheet ratios: TF32 half, 8-bit integers twice).
BF16_COST = {"bf16": 1.0, "f16": 1.0, "tf32": 2.0, "s8": 0.5, "u8": 0.5, "e4m3": 0.5, "e5m2": 0.5}
# Ceilings measured on this workplace's H100 (nvidia-h100-x1): an 8192^3 bf16 matrix product at 798 TFLOP/s
# (.library device KINDS.md, 2026-11-13) and a device-to-device copy at 3023 GB/s read + written (kernels/RESULTS.md).
H100_BF16_FLOPS = 798e12
H100_COPY_BYTES = 3023e9


@dataclass
class Compiled:
    """What ptxas made of one kernel specialisation."""

    registers: int
    stack: int  # bytes per thread of stack frame: spilled registers and local arrays
    shared: int  # bytes per block
    accesses: dict[tuple[str, int], int]  # ("ld" | "st", bytes per access) -> instructions in the PTX
    mma_flops: dict[str, int]  # input type -> tensor-core FLOPs a program issues (all its warps)


def _specialise(run: KernelLaunch, config: triton.Config) -> ASTSource:
    """The kernel with the signature, constants and divisibility hints Triton's launcher derives from `run.args`."""
    params = run.kernel.params
    values = iter(run.args)
    signature, attrs = {}, {}
    constexprs = dict(run.meta) | config.kwargs
    for index, param in enumerate(params):
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            continue
        value = next(values)
        if isinstance(value, torch.Tensor):
            signature[param.name] = "*" + _TYPES[value.dtype]
            aligned = value.data_ptr() % 16 == 0
        elif value == 1:
            signature[param.name] = "constexpr"
            constexprs[param.name] = 1
            continue
        else:
            signature[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            aligned = value % 16 == 0
        if aligned:
            attrs[(index,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=run.kernel, signature=signature, constexprs=constexprs, attrs=attrs)


def cuobjdump() -> Path:
    """The cuobjdump that ships with triton's CUDA backend (FileNotFoundError without one)."""
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.is_file():
        raise FileNotFoundError(path)
    return path


def compile_launch(run: KernelLaunch, config: triton.Config, arch: int = 90) -> Compiled:
    """Compile `run`'s kernel with `config` for sm_`arch` and read back its resource use."""
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    kernel = triton.compile(_specialise(run, config), target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run(
            [str(cuobjdump()), "--dump-resource-usage", cubin.name], capture_output=True, text=True, check=True
        ).stdout
    fields = {key: int(value) for key, value in re.findall(r"(REG|STACK|SHARED):(\d+)", usage)}
    accesses = Counter(
        (op, int(vector or 1) * int(bits) // 8) for op, vector, bits in _ACCESS.findall(kernel.asm["ptx"])
    )
    return Compiled(
        fields["REG"], fields["STACK"], kernel.metadata.shared, dict(accesses), mma_flops(kernel.asm["ptx"], config)
    )


def mma_flops(ptx: str, config: triton.Config) -> dict[str, int]:
    """Tensor-core FLOPs per program, by input type, from the matrix instructions in `ptx`: an mma is one warp's, a
    wgmma one warpgroup's, and every warp (warpgroup) runs the whole instruction stream. The kernels loop only with
    `tl.static_range`, which is unrolled, so each instruction in the PTX runs once at most (the byte chunks past a
    head's last byte are skipped at run time: an upper bound)."""
    flops: Counter[str] = Counter()
    for op, m, n, k, dtype in _MMA.findall(ptx):
        issuers = config.num_warps // 4 if op.startswith("wgmma") else config.num_warps
        flops[dtype] += 2 * int(m) * int(n) * int(k) * issuers
    return dict(flops)


def _random_coder(blocks: int, width: int, max_bits: int, generator: torch.Generator):
    """A coder of `blocks` blocks of `width` with random matrices and a random 0..max_bits allocation."""
    from hf_scd.codes import TransformCode

    bits = torch.randint(0, max_bits + 1, (blocks, width), generator=generator).to(torch.uint8)
    matrix = torch.randn(blocks, width, width, generator=generator)
    steps = torch.tensor([0.0] + [6.0 / 2**b for b in range(1, 9)])
    return TransformCode(torch.zeros(blocks, width), matrix, matrix, steps, bits)


def _bf16_cache(layers: int, heads: int, dim: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys and values (2, layers, 1, H, tokens, d) bf16 in one allocation, cos/sin (tokens, d) bf16, the rows."""
    cache = torch.zeros(2, layers, 1, heads, tokens, dim, dtype=torch.bfloat16)
    return cache, torch.zeros(tokens, dim, dtype=torch.bfloat16), torch.arange(tokens)


def model_launches(layers: int, heads: int, dim: int, tokens: int = 256) -> dict[str, tuple[KernelLaunch, float]]:
    """The encode and decode launches of keys and values of a bf16 cache of this shape (CPU tensors: only their
    dtypes, strides and alignment matter here), at a ~4-bit random allocation, each with the bytes it moves per
    token and head (cache row, codes, scale code, and a head's share of cos/sin for keys)."""
    from .decode import decode_launches
    from .encode import encode_launches

    generator = torch.Generator().manual_seed(0)
    cache, rope, rows = _bf16_cache(layers, heads, dim, tokens)
    launches = {}
    for kind, rotary in (("key", True), ("value", False)):
        xs = list(cache[int(not rotary)].unbind(0))
        codes = [_random_coder(heads, dim, 8, generator) for _ in range(layers)]
        (encode,), packed, scales = encode_launches(xs, rope, rope, rows, codes, rotary)
        (decode,) = decode_launches(packed, scales, rope, rope, rows, codes, xs, rotary)
        code_bytes = sum(p.shape[1] for p in packed) / (layers * heads) + 1
        moved = dim * cache.element_size() + code_bytes + (2 * dim * rope.element_size() / heads if rotary else 0)
        launches[f"encode {kind}s"], launches[f"decode {kind}s"] = (encode, moved), (decode, moved)
    return launches


def block_launches(layers: int, heads: int, dim: int, members: int, tokens: int = 256) -> dict[str, tuple]:
    """The block path's launches for keys and values of a bf16 cache of this shape coded in joint units of
    `members` layers (one block each), at a ~2-bit random allocation (8x), each with the bytes it moves per token
    and head: the cache row in bf16 and its fp32 vector for gather and scatter (plus cos/sin for keys), the fp32
    coefficients and the codes for quantize and dequantize."""
    from .blocks import decode_steps, encode_steps

    generator = torch.Generator().manual_seed(0)
    cache, rope, rows = _bf16_cache(layers, heads, dim, tokens)
    launches = {}
    for kind, rotary in (("key", True), ("value", False)):
        xs = list(cache[int(not rotary)].unbind(0))
        codes = [_random_coder(1, members * heads * dim, 4, generator) for _ in range(layers // members)]
        encode, packed, scales = encode_steps(xs, members, rope, rope, rows, codes, rotary)
        decode = decode_steps(packed, scales, rope, rope, rows, codes, xs, members, rotary)
        code_bytes = sum(p.shape[1] for p in packed) / (layers * heads) + 1 / (members * heads)
        rope_bytes = 2 * dim * rope.element_size() / heads if rotary else 0
        row_bytes = dim * (cache.element_size() + 4) + rope_bytes
        gather, scatter = encode[0], decode[-1]  # one of each: the layers share a cache allocation
        launches[f"gather {kind}s"], launches[f"scatter {kind}s"] = (gather, row_bytes), (scatter, row_bytes)
        launches[f"quantize {kind}s"] = (encode[-1], dim * 4 + code_bytes)
        launches[f"dequantize {kind}s"] = (decode[0], dim * 4 + code_bytes)
    return launches


def configs(run: KernelLaunch) -> list[triton.Config]:
    """The autotuning configs a launch of `run` would try."""
    tuned = run.tuned
    return tuned.early_config_prune(tuned.configs, dict(zip(tuned.arg_names, run.args, strict=False)), **run.meta)


def _mma(got: Compiled, block_t: int, moved: float) -> tuple[float, str, float]:
    """bf16-equivalent tensor-core FLOPs per token-head, their split by input type, and the ratio of the time those
    take at the H100's bf16 rate to the time its copy bandwidth takes to move the token-head's bytes: above 1 the
    kernel cannot reach copy bandwidth even at the tensor cores' full rate."""
    per_row = {dtype: flops / block_t for dtype, flops in got.mma_flops.items()}
    work = sum(BF16_COST[dtype] * flops for dtype, flops in per_row.items())
    split = " ".join(f"{flops / 1e3:.0f}K {dtype}" for dtype, flops in sorted(per_row.items()))
    return work, split, (work / H100_BF16_FLOPS) / (moved / H100_COPY_BYTES)


def _accesses(accesses: dict[tuple[str, int], int], op: str) -> str:
    found = sorted(((width, count) for (kind, width), count in accesses.items() if kind == op), reverse=True)
    return " ".join(f"{count}x{width}B" for width, count in found)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability to compile for (90: H100/H200)")
    parser.add_argument("--first-config", action="store_true", help="only each kernel's first autotuning config")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    print(f"triton {triton.__version__}, sm_{args.arch}")
    print(
        "| model | kernel | BLOCK_T | warps | registers | stack (B) | shared (B) | global loads | global stores "
        "| MMA FLOP / token-head | compute / copy time |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---|---|---|---:|")
    rows = []
    every = [(model, model_launches(*shape)) for model, shape in SHAPES.items()]
    every += [(f"{model} joint", block_launches(*shape)) for model, shape in JOINT_SHAPES.items()]
    for model, launches in every:
        for name, (run, moved) in launches.items():
            for config in configs(run)[: 1 if args.first_config else None]:
                got = compile_launch(run, config, args.arch)
                block, warps = config.kwargs["BLOCK_T"], config.num_warps
                work, split, bound = _mma(got, block, moved)
                rows.append(dict(model=model, kernel=name, block_t=block, warps=warps, **asdict(got)))
                rows[-1].update(accesses=[[op, width, count] for (op, width), count in got.accesses.items()],
                                meta=run.meta, mma_per_token_head=work, compute_over_copy=bound)  # fmt: skip
                print(
                    f"| {model} | {name} | {block} | {warps} | {got.registers} | {got.stack} | {got.shared} | "
                    f"{_accesses(got.accesses, 'ld')} | {_accesses(got.accesses, 'st')} | {split} | {bound:.2f} |",
                    flush=True,
                )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
