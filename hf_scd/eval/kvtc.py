"""KVTC (Staniszewski & Łańcucki, ICLR 2026): transform coding of the whole cache at once, a baseline next to SCD.

One PCA basis for keys and one for values, each over a token's vector of every layer's and KV head's channels
(keys de-rotated, so the basis sees position-free content), centred on the calibration mean. The components, by
decreasing variance, form contiguous groups; a dynamic program gives each group 0 bits (dropped), int2, int4 or FP8
(e4m3), each with an fp16 scale per token, minimising the squared error measured on held-out calibration tokens
under a byte budget. The packed codes are DEFLATE-coded (`zlib`). The first `sink_tokens` and the last
`recent_tokens` of every row ship exactly, in bf16.

Unlike SCD: one global basis rather than one per layer and head, plain (unweighted) squared error, and the recent
window. A ratio names the budget of the *coded* tokens vs BF16 (DEFLATE-coded codes plus scales): the allocation is
a calibration artifact and cannot depend on a request's length. The exact sink and window add their bf16 bytes, so a
request's achieved ratio, what the eval table shows, is lower, much lower on short prompts.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache

from ..arch import ModelHandle
from ..codec import apply_rotary, remove_rotary
from ..prefill import position_ids_from_mask, prefill
from .baselines import FP16_BYTES, KVCoder

SINK_TOKENS = 4
RECENT_TOKENS = 128
GROUP_SIZE = 64
CALIBRATION_TOKENS = 8192
BITS = (0, 2, 4, 8)  # per group: dropped, int2, int4, FP8 e4m3
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# Held-out tokens coded to measure DEFLATE's gain at an allocation, and how often the budget is corrected for it.
GAIN_TOKENS = 512
GAIN_ROUNDS = 3
_NAME = re.compile(r"kvtc-(?P<ratio>\d+(?:\.\d+)?)x(?:-w(?P<recent>\d+))?")


def group_bytes(bits: int, group_size: int) -> int:
    """Bytes per token of one group at `bits` before DEFLATE: its codes and its fp16 scale (nothing if dropped)."""
    return 0 if bits == 0 else group_size * bits // 8 + FP16_BYTES


def quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8, fp16 scales) of x (..., group_size), one absmax scale per group: int2/int4 on a symmetric
    mid-rise grid (all 2**bits levels used, none at zero), 8 bits as FP8 e4m3 bytes."""
    scale = x.abs().amax(-1).half()
    full = scale.float()[..., None]
    if bits == 8:
        ratio = x / torch.where(full > 0, full, torch.ones_like(full)) * FP8_MAX
        return ratio.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8), scale
    half = 2 ** (bits - 1)
    step = full / half
    levels = torch.floor(x / torch.where(step > 0, step, torch.ones_like(step))).clamp(-half, half - 1)
    return (levels + half).to(torch.uint8), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `quantize`, float32; a zero scale (an all-zero group) decodes to zeros."""
    full = scale.float()[..., None]
    if bits == 8:
        return codes.view(torch.float8_e4m3fn).float() * (full / FP8_MAX)
    half = 2 ** (bits - 1)
    return (codes.float() - half + 0.5) * (full / half)


def pack(codes: torch.Tensor, bits: int) -> bytes:
    """uint8 codes below 2**bits, `8 // bits` to a byte (low bits first), in the tensor's order."""
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    packed = (codes.reshape(-1, per).to(torch.int32) << shifts).sum(-1)
    return packed.to(torch.uint8).numpy().tobytes()


def unpack(data: bytes, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `pack`: uint8 codes of `shape`."""
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    packed = torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy()).to(torch.int32)
    return ((packed[:, None] >> shifts) & (2**bits - 1)).reshape(shape).to(torch.uint8)


def allocate_bits(distortion: np.ndarray, group_size: int, budget: int) -> tuple[int, ...]:
    """Bits per group (one of `BITS`) minimising the summed distortion with `group_bytes` totalling at most `budget`
    per token: a knapsack over groups, exact for integer byte costs.

    `distortion[g, i]` is group g's expected squared error per token at `BITS[i]` (at 0 bits: its variance)."""
    costs = [group_bytes(bits, group_size) for bits in BITS]
    budget = max(int(budget), 0)
    best = np.zeros(budget + 1)  # least distortion of the groups so far within each number of bytes
    choices = np.zeros((len(distortion), budget + 1), dtype=np.int8)
    for group, errors in enumerate(distortion):
        options = np.full((len(BITS), budget + 1), np.inf)
        for i, cost in enumerate(costs):
            if cost <= budget:
                options[i, cost:] = best[: budget + 1 - cost] + errors[i]
        choices[group], best = options.argmin(0), options.min(0)
    bits, left = [], budget
    for group in reversed(range(len(distortion))):
        choice = choices[group, left]
        bits.append(BITS[choice])
        left -= costs[choice]
    return tuple(reversed(bits))


def rotary(handle: ModelHandle, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (cos, sin) (batch, seq, head_dim) at the positions `prefill` gives the mask's tokens."""
    return handle.rotary_cos_sin(position_ids_from_mask(attention_mask), torch.float32)


def content_vectors(cache: DynamicCache, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's (keys, values) of all layers and KV heads, (batch, seq, layers*heads*head_dim) float32 on the
    CPU, layer-major then head; keys de-rotated with (cos, sin) (batch, seq, head_dim)."""
    keys = torch.stack([layer.keys for layer in cache.layers]).float()  # (layers, batch, heads, seq, head_dim)
    values = torch.stack([layer.values for layer in cache.layers]).float()
    keys = remove_rotary(keys, cos[None, :, None].to(keys.device), sin[None, :, None].to(keys.device))
    batch, seq = keys.shape[1], keys.shape[3]
    return tuple(x.permute(1, 3, 0, 2, 4).reshape(batch, seq, -1).cpu() for x in (keys, values))


@dataclass(frozen=True)
class PCABasis:
    """One kind's (K or V) calibration artifact: mean, principal components (columns, decreasing variance), the
    held-out tokens the allocation is measured on, and their distortion per group and bit width."""

    mean: torch.Tensor  # (dim,)
    components: torch.Tensor  # (dim, dim)
    held_out: torch.Tensor  # (tokens, dim)
    distortion: np.ndarray  # (groups, len(BITS))

    @classmethod
    def fit(cls, fit: torch.Tensor, held_out: torch.Tensor, group_size: int) -> PCABasis:
        """The basis of `fit` (tokens, dim), and each component group's error on `held_out` at every bit width."""
        if fit.shape[1] % group_size:
            raise ValueError(f"a KV vector of {fit.shape[1]} dims does not split into groups of {group_size}")
        mean = fit.mean(0)
        centred = fit - mean
        _, vectors = torch.linalg.eigh(centred.T @ centred / fit.shape[0])
        components = vectors.flip(-1).contiguous()
        coefficients = ((held_out - mean) @ components).reshape(held_out.shape[0], -1, group_size)
        errors = [coefficients.pow(2)] + [
            (dequantize(*quantize(coefficients, bits), bits) - coefficients).pow(2) for bits in BITS[1:]
        ]
        distortion = torch.stack([e.sum(-1).mean(0) for e in errors], -1).double().numpy()
        return cls(mean, components, held_out, distortion)


@dataclass(frozen=True)
class KVTCBasis:
    """The calibration artifacts every KVTC ratio shares: a basis for keys and one for values."""

    keys: PCABasis
    values: PCABasis
    group_size: int

    @classmethod
    @torch.inference_mode()
    def fit(
        cls,
        model: torch.nn.Module,
        documents: list[list[int]],
        group_size: int = GROUP_SIZE,
        skip_tokens: int = SINK_TOKENS,
        held_out: float = 0.25,
    ) -> KVTCBasis:
        """Fit on the model's K/V over `documents` (token ids), leaving out each one's first `skip_tokens` (the
        sink, shipped exactly); the last `held_out` fraction of tokens only measures the allocation."""
        handle = ModelHandle(model)
        device = next(model.parameters()).device
        rows: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        for doc in documents:
            ids = torch.tensor([doc], device=device)
            cache = prefill(model, ids, None)
            for part, x in zip(rows, content_vectors(cache, *rotary(handle, torch.ones_like(ids))), strict=True):
                part.append(x[0, skip_tokens:])
        keys, values = (torch.cat(part) for part in rows)
        split = int((1 - held_out) * keys.shape[0])
        return cls(
            *(PCABasis.fit(x[:split], x[split:], group_size) for x in (keys, values)),
            group_size=group_size,
        )


class GroupCoder:
    """One kind's wire format: the kept component groups of a basis, each coded at its bit width.

    Codes go group by group (all tokens of a group together) into one DEFLATE stream; the fp16 scales follow raw.
    """

    def __init__(self, basis: PCABasis, bits: tuple[int, ...], group_size: int):
        self.basis, self.bits, self.group_size = basis, bits, group_size
        self.classes: list[tuple[int, int, torch.Tensor]] = []  # (bits, groups, their components (dim, groups*size))
        for width in BITS[1:]:
            groups = torch.tensor([g for g, b in enumerate(bits) if b == width], dtype=torch.long)
            if len(groups):
                columns = (groups[:, None] * group_size + torch.arange(group_size)).reshape(-1)
                self.classes.append((width, len(groups), basis.components[:, columns]))

    @classmethod
    def for_budget(cls, basis: PCABasis, group_size: int, target: float) -> GroupCoder:
        """The allocation whose coded size per token on held-out tokens is about `target` bytes: the knapsack's
        budget is scaled by DEFLATE's measured gain a few times over."""
        sample = basis.held_out[:GAIN_TOKENS]
        budget = target
        for _ in range(GAIN_ROUNDS):
            coder = cls(basis, allocate_bits(basis.distortion, group_size, int(budget)), group_size)
            size = sum(map(len, coder.encode(sample))) / sample.shape[0]
            budget *= target / size if size > 0 else 1.0
        return coder

    def encode(self, x: torch.Tensor) -> tuple[bytes, bytes]:
        """(DEFLATE-coded codes, fp16 scales) of vectors x (tokens, dim)."""
        centred = x - self.basis.mean
        codes, scales = [], []
        for bits, groups, components in self.classes:
            coefficients = (centred @ components).reshape(x.shape[0], groups, self.group_size).transpose(0, 1)
            code, scale = quantize(coefficients, bits)
            codes.append(pack(code, bits))
            scales.append(scale.numpy().tobytes())
        return zlib.compress(b"".join(codes)), b"".join(scales)

    def decode(self, payload: bytes, scales: bytes, tokens: int) -> torch.Tensor:
        """Vectors (tokens, dim) from what `encode` made of `tokens` tokens; dropped components decode to the mean."""
        codes = zlib.decompress(payload)
        scale = torch.from_numpy(np.frombuffer(scales, dtype=np.float16).copy())
        out = self.basis.mean.expand(tokens, -1).clone()
        code_at = scale_at = 0
        for bits, groups, components in self.classes:
            size = groups * tokens * self.group_size * bits // 8
            code = unpack(codes[code_at : code_at + size], bits, (groups, tokens, self.group_size))
            group_scale = scale[scale_at : scale_at + groups * tokens].reshape(groups, tokens)
            coefficients = dequantize(code, group_scale, bits).transpose(0, 1).reshape(tokens, -1)
            out += coefficients @ components.T
            code_at, scale_at = code_at + size, scale_at + groups * tokens
        return out


def parse_kvtc_name(name: str) -> tuple[float, int]:
    """(ratio, recent tokens) of a baseline named `kvtc-<ratio>x` or `kvtc-<ratio>x-w<recent tokens>`."""
    match = _NAME.fullmatch(name)
    if match is None:
        raise ValueError(f"{name!r} is not a KVTC baseline: name it kvtc-<ratio>x or kvtc-<ratio>x-w<recent tokens>")
    ratio = float(match["ratio"])
    if ratio < 1:
        raise ValueError(f"{name!r}: the ratio vs BF16 must be at least 1")
    return ratio, RECENT_TOKENS if match["recent"] is None else int(match["recent"])


class KVTC(KVCoder):
    """KVTC at `ratio` vs BF16 on its coded tokens, the first `sink_tokens` and last `recent_tokens` of each row
    exact; fitted `basis` from `KVTCBasis.fit` on `model`, whose rotary embedding de-rotates and re-rotates keys."""

    def __init__(
        self,
        model: torch.nn.Module,
        basis: KVTCBasis,
        ratio: float,
        sink_tokens: int = SINK_TOKENS,
        recent_tokens: int = RECENT_TOKENS,
    ):
        self.handle = ModelHandle(model)
        self.sink_tokens, self.recent_tokens = sink_tokens, recent_tokens
        self.name = f"kvtc-{ratio:g}x" + ("" if recent_tokens == RECENT_TOKENS else f"-w{recent_tokens}")
        self.dim = basis.keys.mean.numel()
        target = self.dim * FP16_BYTES / ratio
        self.keys = GroupCoder.for_budget(basis.keys, basis.group_size, target)
        self.values = GroupCoder.for_budget(basis.values, basis.group_size, target)

    def roundtrip_layers(
        self, cache: DynamicCache, attention_mask: torch.Tensor | None
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
        first = cache.layers[0].keys
        batch, heads, seq, head_dim = first.shape
        mask = attention_mask if attention_mask is not None else torch.ones(batch, seq, device=first.device).long()
        cos, sin = rotary(self.handle, mask)
        vectors = content_vectors(cache, cos, sin)
        real_tokens = mask[None, :, None, :, None].to(first.dtype)
        shipped = [  # exact bf16 everywhere, padding zeroed; the coded tokens are overwritten below
            torch.stack([getattr(layer, kind) for layer in cache.layers]).to(torch.bfloat16).to(first.dtype)
            * real_tokens
            for kind in ("keys", "values")
        ]
        total = 0
        for row in range(batch):
            real = mask[row].nonzero().squeeze(-1)
            coded = real[self.sink_tokens : max(self.sink_tokens, len(real) - self.recent_tokens)]
            total += (len(real) - len(coded)) * self.dim * FP16_BYTES * 2
            if not len(coded):
                continue
            for is_key, coder, x, out in zip((True, False), (self.keys, self.values), vectors, shipped, strict=True):
                payload, scales = coder.encode(x[row, coded.cpu()])
                total += len(payload) + len(scales)
                decoded = coder.decode(payload, scales, len(coded)).to(first.device)
                decoded = decoded.reshape(len(coded), len(cache.layers), heads, head_dim)
                if is_key:
                    decoded = apply_rotary(decoded, cos[row, coded][:, None, None], sin[row, coded][:, None, None])
                out[:, row][:, :, coded] = decoded.permute(1, 2, 0, 3).to(out.dtype)
        return list(zip(shipped[0], shipped[1], strict=True)), total
