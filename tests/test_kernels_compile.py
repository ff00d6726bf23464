"""The kernels compile for an H100 (sm_90) with the arguments their real launches build, on this GPU-less machine:
the interpreter runs their arithmetic (test_kernels.py) but not Triton's compiler, which is where shape, layout
and type errors of a GPU build show. Also checks the cache's bf16 tensors are read and written in vectors, never
element by element (2-byte accesses), and that the tensor-core work each compiled program issues is the products'
own, in the types chosen for them: bf16 pieces and 8-bit one-hot products, no TF32, no rows computed twice (the
block path's kernels issue none: its products are cuBLAS's).

`python -m hf_scd.kernels.aot` runs in its own process: this one runs Triton in interpreter mode (conftest.py).
"""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

triton = pytest.importorskip("triton")


def test_kernels_compile_for_sm90_with_vector_accesses(tmp_path):
    from hf_scd.kernels import aot

    try:
        aot.cuobjdump()
    except FileNotFoundError as missing:
        pytest.skip(f"this triton has no CUDA toolchain: {missing}")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    command = [sys.executable, "-m", "hf_scd.kernels.aot", "--first-config", "--json", str(out)]
    subprocess.run(command, cwd=REPO, env=env, check=True, timeout=600)
    rows = json.loads(out.read_text())
    kinds = ("keys", "values")
    fused = {(model, f"{op} {kind}") for model in aot.SHAPES for op in ("encode", "decode") for kind in kinds}
    block_ops = ("gather", "quantize", "dequantize", "scatter")
    blocks = {(f"{model} joint", f"{op} {kind}") for model in aot.JOINT_SHAPES for op in block_ops for kind in kinds}
    assert {(row["model"], row["kernel"]) for row in rows} == fused | blocks
    for row in rows:
        assert row["registers"] > 0
        two_byte = [access for access in row["accesses"] if access[1] == 2]
        assert not two_byte, f"{row['model']} {row['kernel']}: element-wise bf16 accesses {two_byte}"
        # The block path's products are cuBLAS's: its kernels issue no tensor-core work of their own.
        expected = _expected_mma(row) if (row["model"], row["kernel"]) in fused else {}
        assert row["mma_flops"] == expected, f"{row['model']} {row['kernel']}: {row['mma_flops']}"
    # Gather and scatter move the cache and their fp32 vectors in 16-byte vectors.
    for row in rows:
        if row["kernel"].split()[0] in ("gather", "scatter"):
            assert not [access for access in row["accesses"] if access[0] == "st" and access[1] < 16], row


def _expected_mma(row: dict) -> dict[str, int]:
    """Tensor-core FLOPs of one program from the launch's shapes: the projection (encode: 3 piece products, 2 for a
    bf16 value row; decode: one a piece of the decoder) and two one-hot 8-bit products a byte chunk."""
    meta, rows = row["meta"], row["block_t"]
    dim, comps, packed = meta["D"], meta["C"], meta["BYTES_PAD"]
    pieces = (2 if meta["X_EXACT"] else 3) if row["kernel"].startswith("encode") else meta["PIECES"]
    return {"bf16": pieces * 2 * rows * dim * comps, "s8": 2 * 2 * rows * comps * packed}
