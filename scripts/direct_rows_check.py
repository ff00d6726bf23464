"""What the consumer would save if the entropy stage handed the decoder its codes as rows instead of packed bytes.

Today `decompress_payload` packs the codes it decompresses back into the codec's bit layout, and the decoder unpacks
them again into one row per component. This measures, on a real payload, the consumer's work up to the decoder's
products both ways, unit by unit and K/V: as it is (`decompress_payload`, then the codec's `_decode_heads`), and
straight from the stage's rows (the zstd frames' codes regrouped per width, dequantized and multiplied by the decoder
with its rows put in the same order). The two give the same vectors up to the order of the products' sums.

    python scripts/direct_rows_check.py --tokens 2048 --threads 2
"""

from __future__ import annotations

import argparse

import torch
import zstandard

from hf_scd import SCDArtifacts, SCDCache, SCDPayload, backend
from hf_scd.codec import _decode_heads, code_to_scale
from hf_scd.compat import with_cache
from hf_scd.entropy import (
    _codes_of_bytes,
    _groups,
    _read,
    _symbol_bytes_size,
    _width_rows,
    compress_payload,
    decompress_payload,
)
from hf_scd.eval.codec_speed import ARTIFACTS, median_ms
from hf_scd.eval.corpus import evaluation_texts
from hf_scd.models import load_model


def stage_rows(blob: bytes, artifacts: SCDArtifacts) -> tuple[SCDPayload, list, list[torch.Tensor]]:
    """The stripped payload, its (layer, kind, coder, zero-width codes) groups, and each group's codes as the stage
    holds them: one uint8 row per kept component, width by width."""
    stripped_bytes, frames, _ = _read(blob, "payload")
    stripped = SCDPayload.from_bytes(stripped_bytes)
    groups = list(_groups(stripped, artifacts, stripped=True))
    widths = [_width_rows(code, codes.shape[0]) for _, _, code, codes in groups]
    data = torch.frombuffer(
        bytearray(b"".join(zstandard.ZstdDecompressor().decompress(f) for f in frames)), dtype=torch.uint8
    )
    order = sorted(
        (bits, number, codes.shape[0] * index.numel())
        for number, ((_, _, _, codes), part) in enumerate(zip(groups, widths, strict=True))
        for bits, index in part
    )
    pieces = data.split([_symbol_bytes_size(count, bits) for bits, _, count in order])
    symbols = {
        (bits, n): _codes_of_bytes(piece, count, bits) for (bits, n, count), piece in zip(order, pieces, strict=True)
    }
    rows = [
        torch.cat([symbols[bits, n] for bits, _ in part]).view(-1, codes.shape[0])
        for n, ((_, _, _, codes), part) in enumerate(zip(groups, widths, strict=True))
    ]
    return stripped, groups, rows


def permuted_decoders(groups: list, products: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per group: the decoder with each component's step folded in and its rows in the stage's order, the codes' mid
    offsets in that order, and the output mean: the codec's own decoder, reordered. Joint units (one block) only."""
    made = []
    for _, _, code, codes in groups:
        if code.bits.shape[0] != 1:
            raise SystemExit("this check covers artifacts with joint units (one block per unit), as SmolLM2's")
        index = torch.cat([index for _, index in _width_rows(code, codes.shape[0] or 1)])
        decoder = (code.decoder[0] * code.component_steps()[0].unsqueeze(-1))[index]
        offsets = torch.exp2(code.bits.reshape(-1)[index].float()) / 2 - 0.5
        made.append((decoder.unsqueeze(0).to(products), offsets.unsqueeze(-1), code.out_mean.unsqueeze(1).to(products)))
    return made


def through_packed(blob: bytes, artifacts: SCDArtifacts, products: torch.dtype) -> list[torch.Tensor]:
    """As the consumer does it today: the payload decompressed (packed again), then unpacked by the decoder."""
    payload = decompress_payload(blob, artifacts)
    return [
        _decode_heads(
            code, getattr(payload.layers[i], f"{kind}_codes"), getattr(payload.layers[i], f"{kind}_scales"), products
        )
        for i, kind, code, _ in _groups(payload, artifacts)
    ]


def through_rows(blob: bytes, artifacts: SCDArtifacts, decoders: list) -> list[torch.Tensor]:
    """Straight from the stage's rows to the decoder's products."""
    stripped, groups, rows = stage_rows(blob, artifacts)
    out = []
    for (i, kind, _, _), codes, (decoder, offsets, mean) in zip(groups, rows, decoders, strict=True):
        scale = code_to_scale(getattr(stripped.layers[i], f"{kind}_scales")).T
        scaled = codes.float().sub_(offsets).mul_(scale).T.to(decoder.dtype, memory_format=torch.contiguous_format)
        out.append(torch.baddbmm(mean, scaled.unsqueeze(0), decoder))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--points", nargs="+", default=["4x", "8x", "12x"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("default")
    artifacts = SCDArtifacts.from_pretrained(ARTIFACTS)
    text = "\n\n".join(evaluation_texts())
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][:, : args.tokens]
    products = backend.products(torch.device("cpu"))
    print("| point | packed: decompress + unpack + products ms | rows: frames + products ms | ratio | max rel. diff |")
    print("|---:|---:|---:|---:|---:|")
    with torch.inference_mode():
        cache = SCDCache(artifacts, model)
        model(ids, **with_cache(model, cache))
        for point in args.points:
            blob = compress_payload(cache.encode(point), artifacts)
            decoders = permuted_decoders(list(_groups(decompress_payload(blob, artifacts), artifacts)), products)
            pairs = zip(through_rows(blob, artifacts, decoders), through_packed(blob, artifacts, products), strict=True)
            diff = max(float((a.float() - b.float()).abs().max() / b.float().abs().max()) for a, b in pairs)
            before = median_ms(args.repeats, through_packed, blob, artifacts, products)
            after = median_ms(args.repeats, through_rows, blob, artifacts, decoders)
            print(f"| {point} | {before:.0f} | {after:.0f} | {before / after:.2f}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
