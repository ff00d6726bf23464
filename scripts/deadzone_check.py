"""Would a dead-zone quantizer with an entropy-constrained allocation beat the fixed bit widths? Measured.

The shipped codec quantizes each component with the plan's fixed number of bits (a mid-rise uniform quantizer whose
levels straddle zero, clipped at its range) and the optional entropy stage rANS-codes the codes. The alternative the
codec v3 issue asks to try: a mid-tread uniform quantizer with a dead zone (q = sign(y) floor(|y| / step + rounding),
reconstructed at q * step), unbounded, entropy-coded, with one slope for all components: component c's step is
alpha * 2^-e_c, where e_c is its water-filled bit depth before clipping (half the log2 of its importance in the
attention metric). Every plan point's bits are b_c = e_c - t_point where 0 < b_c < 8 (clipped elsewhere), so e_c
and the points' water levels t are fitted to those entries by least squares. A component whose spread is small
against its step then codes to 0 nearly always and costs nearly nothing: the allocation is the entropy coder's.

Both run on the same coefficients (the shipped encoder's, per-token RMS scale shipped as the same 8-bit log code),
and both are charged the order-0 entropy of each component's codes on the request (what a per-component static
table would reach; the shipped stage, one table per bit width, is within 2% of it), plus the same scale bytes and
exact sink tokens. Teacher-forced KL / top-1 against the oracle on held-out text, as `hf-scd eval` measures them.

    python scripts/deadzone_check.py --prefix 512 --docs 8
"""

from __future__ import annotations

import argparse
import functools
import json
import math
from pathlib import Path

import torch

from hf_scd import SCDArtifacts, codec
from hf_scd.arch import ModelHandle
from hf_scd.codes import code_to_scale, scale_to_code
from hf_scd.eval.corpus import evaluation_texts, token_documents
from hf_scd.eval.fidelity import teacher_forced_scores_many
from hf_scd.eval.transfer import Shipment, Transfer, rebuild_cache
from hf_scd.models import load_model
from hf_scd.prefill import prefill

REPO = Path(__file__).resolve().parents[1]
SINK = 4  # the shipped artifacts' exact tokens


def order0_bits(codes: torch.Tensor) -> float:
    """Sum over columns of (tokens x order-0 entropy) of integer codes (tokens, components)."""
    total = 0.0
    for column in codes.T:
        _, counts = torch.unique(column, return_counts=True)
        p = counts.double() / column.numel()
        total += float(-(counts.double() * p.log2()).sum())
    return total


@functools.cache
def bit_depths(artifacts: SCDArtifacts) -> torch.Tensor:
    """(units, 2, C) each component's unclipped water-filled bit depth e_c, fitted to every point's bits b = e - t
    where 0 < b < 8; -inf where no point gives the component a bit. Fitted once per artifacts."""
    plans = [artifacts.plan(point.name) for point in artifacts.points]
    bits = torch.stack(
        [torch.stack([torch.stack([u.key.bits[0], u.value.bits[0]]) for u in plan.units]) for plan in plans]
    ).float()  # (points, units, 2, C)
    inside = (bits > 0) & (bits < 8)
    depth = torch.zeros_like(bits[0])
    level = torch.zeros(bits.shape[0], 1, 1, 1)
    for _ in range(50):  # alternating least squares: depth = mean(b + t), t = mean(depth - b), t[0] = 0
        counts = inside.sum(0).clamp(min=1)
        depth = torch.where(inside, bits + level, 0.0).sum(0) / counts
        level = torch.where(inside, depth - bits, 0.0).sum((1, 2, 3), keepdim=True) / inside.sum((1, 2, 3), True)
        level = level - level[0]
    clipped_high = (bits >= 8).any(0) & ~inside.any(0)
    depth = torch.where(clipped_high, 8.0 + level.max(), depth)  # 8 bits even at the coarsest point: that deep
    return torch.where((bits > 0).any(0), depth, float("-inf"))


class Quantizer(Transfer):
    """The shipped encoder and decoder around one of two quantizers, charged order-0 bytes (see the module doc)."""

    def __init__(self, model, artifacts: SCDArtifacts, point: str, alpha: float | None, rounding: float = 0.5):
        super().__init__(model)
        self.handle = ModelHandle(model)
        self.plan = artifacts.plan(point)
        self.depths = bit_depths(artifacts) if alpha is not None else None
        self.alpha, self.rounding = alpha, rounding
        if alpha is None:
            self.name = f"fixed-{point}"
        else:
            self.name = f"deadzone-a{alpha:g}-r{rounding:g}"

    def send(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> Shipment:
        cache = prefill(self.producer, input_ids, attention_mask)
        batch, seq = input_ids.shape
        positions = torch.arange(seq).expand(batch, seq)
        cos, sin = (t.reshape(batch * seq, -1).float() for t in self.handle.rotary_cos_sin(positions, torch.float32))
        rows = torch.tensor([b * seq + s for b in range(batch) for s in range(SINK, seq)])
        layers = [[layer.keys.clone(), layer.values.clone()] for layer in cache.layers]
        heads, dim = layers[0][0].shape[1], layers[0][0].shape[3]
        bits = 0.0
        for number, unit in enumerate(self.plan.units):
            for kind, code in enumerate((unit.key, unit.value)):
                members = [layers[index][kind] for index in unit.members]
                x = torch.stack([codec.flat_rows(m, rows).float() for m in members], 1)  # (rows, M, H, d)
                if kind == 0:
                    x = codec.content_keys(x.flatten(1, 2), cos, sin, rows).view_as(x)
                if self.alpha is None:
                    x_hat, unit_bits = self._fixed(code, x)
                else:
                    x_hat, unit_bits = self._deadzone(code, self.depths[number, kind], x)
                bits += unit_bits + 8 * rows.numel()  # one scale code a token, unit and kind
                if kind == 0:
                    x_hat = codec.rotated_keys(x_hat.flatten(1, 2), cos, sin, rows).view_as(x_hat)
                for member, target in enumerate(members):
                    codec.scatter_rows(target, rows, x_hat[:, member])
        sink_bytes = len(layers) * 2 * batch * SINK * heads * dim * 2
        return Shipment(layers, math.ceil(bits / 8) + sink_bytes, input_ids, attention_mask)

    def receive(self, consumer, shipment: Shipment):
        return rebuild_cache(consumer, [tuple(layer) for layer in shipment.content])

    @staticmethod
    def _fixed(code, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The shipped codec on these vectors: its codes' order-0 bits and its reconstruction."""
        tokens = x.shape[0]
        centred = codec.blocks(code, x) - code.mean.unsqueeze(1)
        packed, scales = codec._encode_heads(code, centred)
        codes = codec.unpack_codes(packed, code.layout).reshape(tokens, -1)
        kept = code.bits.reshape(-1) > 0
        x_hat = codec._decode_heads(code, codec.unpacked_rows(code, packed), scales).transpose(0, 1).reshape(x.shape)
        return x_hat, order0_bits(codes[:, kept])

    def _deadzone(self, code, depth: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Dead-zone mid-tread quantizer, step alpha * 2^-depth, unbounded; the same kind of token scale."""
        if code.mean.shape[0] != 1:
            raise ValueError("the experiment codes joint units (one block)")
        tokens = x.shape[0]
        u = (x.reshape(tokens, -1) - code.mean) @ code.encoder[0]
        coded = depth.isfinite()
        step = torch.where(coded, self.alpha * torch.exp2(-depth), 0.0)
        rms = u[:, coded].pow(2).mean(-1).sqrt()
        scale = code_to_scale(scale_to_code(rms)).unsqueeze(-1)
        y = u[:, coded] / scale
        q = torch.sign(y) * torch.floor(y.abs() / step[coded] + self.rounding)
        y_hat = torch.zeros_like(u)
        y_hat[:, coded] = q * step[coded] * scale
        x_hat = y_hat @ code.decoder[0] + code.out_mean
        return x_hat.view_as(x), order0_bits(q.to(torch.int32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefix", type=int, default=512)
    parser.add_argument("--continuation", type=int, default=256)
    parser.add_argument("--docs", type=int, default=8)
    parser.add_argument("--points", nargs="+", default=["6x", "8x", "10x", "12x"])
    parser.add_argument("--alphas", type=float, nargs="+", default=[48, 96, 192, 288, 384])
    parser.add_argument("--roundings", type=float, nargs="+", default=[0.5, 0.35])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "deadzone_smollm2-135m-instruct.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    artifacts = SCDArtifacts.from_pretrained(REPO / "hub_artifacts" / "smollm2-135m-instruct")
    model, tokenizer = load_model("default")
    docs = token_documents(tokenizer, evaluation_texts(), args.prefix + args.continuation)[: args.docs]
    methods = [Quantizer(model, artifacts, point, None) for point in args.points]
    methods += [
        Quantizer(model, artifacts, args.points[0], alpha, rounding)
        for rounding in args.roundings
        for alpha in args.alphas
    ]
    scores = teacher_forced_scores_many(model, methods, docs, args.prefix, args.continuation)
    bf16 = 2 * 2 * len(model.model.layers) * model.config.num_key_value_heads * model.config.head_dim
    rows = []
    print(f"{len(docs)} docs, {args.prefix}-token prefixes, order-0 bytes (codes + scales + 4 exact sink tokens)")
    print("| method | x vs BF16 | KL | top-1 | dNLL |")
    print("|---|---:|---:|---:|---:|")
    for method in methods:
        s = scores[method.name]
        ratio = bf16 / s["bytes_per_token"]
        rows.append({"method": method.name, "ratio": ratio, **s})
        print(f"| {method.name} | {ratio:.2f}x | {s['kl']:.4f} | {s['top1']:.3f} | {s['dnll']:.4f} |", flush=True)
    args.json.write_text(json.dumps({"prefix": args.prefix, "docs": len(docs), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
