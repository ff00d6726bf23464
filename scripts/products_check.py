"""Does the CPU path's bf16 products cost fidelity? The same operating points, on the same held-out documents, with
the reference's products in float32 and in bf16 (what `hf_scd.backend.products` picks on CPUs with native bf16
matmuls), scored by the fidelity protocol against the oracle in one run.

    python scripts/products_check.py [--model default] [--prefix 2048] [--cont 128] [--docs 6] [--points 8x,4x]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hf_scd import backend
from hf_scd.artifacts import SCDArtifacts
from hf_scd.eval.corpus import evaluation_texts, token_documents
from hf_scd.eval.fidelity import teacher_forced_scores_many
from hf_scd.eval.scd_method import SCDTransfer
from hf_scd.models import load_model

REPO = Path(__file__).resolve().parents[1]


class ProductsTransfer(SCDTransfer):
    """`SCDTransfer` with the reference's products forced to one dtype, on both ends."""

    def __init__(self, producer: torch.nn.Module, artifacts: SCDArtifacts, point: str, products: torch.dtype):
        super().__init__(producer, artifacts, point)
        self.products = products
        self.name = f"{self.name}-{str(products).removeprefix('torch.')}"

    def transfer(self, consumer, input_ids, attention_mask):
        chosen = backend.products
        backend.products = lambda device: self.products
        try:
            return super().transfer(consumer, input_ids, attention_mask)
        finally:
            backend.products = chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--artifacts", default=str(REPO / "hub_artifacts" / "smollm2-135m-instruct"))
    parser.add_argument("--prefix", type=int, default=2048)
    parser.add_argument("--cont", type=int, default=128)
    parser.add_argument("--docs", type=int, default=6)
    parser.add_argument("--points", default="8x,4x")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model, tokenizer = load_model(args.model)
    artifacts = SCDArtifacts.from_pretrained(args.artifacts)
    docs = token_documents(tokenizer, evaluation_texts(), args.prefix + args.cont)[: args.docs]
    methods = [
        ProductsTransfer(model, artifacts, point, products)
        for point in args.points.split(",")
        for products in (torch.float32, torch.bfloat16)
    ]
    scores = teacher_forced_scores_many(model, methods, docs, args.prefix, args.cont, batch_size=1)
    print("| method | KL | top-1 | ΔNLL | bytes/token |\n|---|---:|---:|---:|---:|")
    for name, row in scores.items():
        print(f"| {name} | {row['kl']:.4f} | {row['top1']:.3f} | {row['dnll']:.4f} | {row['bytes_per_token']:.0f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "docs": len(docs), "scores": scores}, indent=1))


if __name__ == "__main__":
    main()
