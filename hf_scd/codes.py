"""What a code is: the data the reference (`codec.py`) and the Triton kernels (`hf_scd/kernels/`) both read and write.

A `TransformCode` is one Reuse unit's calibrated coder of keys or values at one bit allocation (a unit is one layer
or a run of consecutive layers coded together), a `BitLayout` where each
component's bits sit in a token's packed codes, the per-token scale codes are 1/16-octave log codes, and a `LayerCodes`
is what one layer puts on the wire. No math on vectors lives here, so the kernels depend on the format alone.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property

import torch

MAX_BITS = 8
# Per-token scales are shipped as uint8 codes of log2(rms) in steps of 1/SCALE_CODE_STEPS octave.
SCALE_CODE_STEPS = 16
SCALE_CODE_ZERO = 128
# A token's scale is raised above its RMS where the RMS would clip a component of at least this many bits: tokens
# with massive activations (a few per document) otherwise lose their largest coefficients.
PEAK_BITS = 4


def scale_to_code(rms: torch.Tensor) -> torch.Tensor:
    """Per-token RMS -> uint8 log code (1/16-octave steps, 2^-8 .. 2^8)."""
    code = torch.floor(torch.log2(rms.clamp(min=2.0**-8)) * SCALE_CODE_STEPS + 0.5) + SCALE_CODE_ZERO
    return code.clamp(0, 255).to(torch.uint8)


def code_to_scale(code: torch.Tensor) -> torch.Tensor:
    return torch.exp2((code.float() - SCALE_CODE_ZERO) / SCALE_CODE_STEPS)


@dataclass(frozen=True)
class BitLayout:
    """Where each component's bits sit in a token's packed codes, for one bit allocation (heads, dim).

    Each head's components are laid out in order, least significant bit first, and each head's run is padded to
    a whole byte, so a component's code (at most 8 bits) spans at most two bytes and heads never share a byte.
    """

    bits: torch.Tensor  # (heads, dim) uint8

    @cached_property
    def head_bytes(self) -> torch.Tensor:
        """(heads,) int64 bytes of each head's run, padded to a whole byte."""
        return (self.bits.long().sum(-1) + 7) // 8

    @cached_property
    def head_start(self) -> torch.Tensor:
        """(heads,) int64 each head's first byte within a token's packed codes."""
        return torch.cumsum(self.head_bytes, 0) - self.head_bytes

    @cached_property
    def offsets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(byte, shift) of every component's first bit within a token's packed codes, each (heads, dim) int32.

        Components with 0 bits point at their head's first byte with shift 0, so every offset stays in range.
        """
        bits = self.bits.long()
        start_in_head = torch.where(bits > 0, torch.cumsum(bits, -1) - bits, 0)
        byte = self.head_start.unsqueeze(-1) + start_in_head // 8
        return byte.to(torch.int32), (start_in_head % 8).to(torch.int32)

    @property
    def bytes_per_token(self) -> int:
        return int(self.head_bytes.sum())


@dataclass
class TransformCode:
    """Calibrated transform coder of one Reuse unit's keys or values, at one bit allocation.

    A unit's vector per token is its member layers' KV heads side by side, (layers, H, d) flattened, split into G
    blocks of width W that are coded independently: G = H blocks of one head each (per-head coders, W = d), or one
    block of everything (a joint basis across heads and layers, W = layers * H * d). mean (G, W); encoder (G, W, C)
    maps a centred block to C unit-spread coefficients, most important first; decoder (G, C, W) maps them back;
    steps (MAX_BITS + 1,) the quantizer step per bit width for a unit coefficient of a unit-RMS token; bits (G, C) the
    plan's bits per component. out_mean (G, W) is added back after decoding: the same as `mean` when a model codes its
    own cache, the consumer's mean when the decoder predicts another model's vectors (cross-variant Reuse).
    """

    mean: torch.Tensor
    encoder: torch.Tensor
    decoder: torch.Tensor
    steps: torch.Tensor
    bits: torch.Tensor
    out_mean: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.out_mean is None:
            self.out_mean = self.mean

    @cached_property
    def layout(self) -> BitLayout:
        return BitLayout(self.bits.to(torch.uint8).cpu())

    def to(self, device: torch.device) -> TransformCode:
        return TransformCode(*(getattr(self, f.name).to(device) for f in fields(self)))

    def component_steps(self) -> torch.Tensor:
        """Quantizer step (G, C) of every component for a unit-RMS token; 0 where the component gets 0 bits."""
        return self.steps.float()[self.bits.long()]

    def peak_limits(self) -> torch.Tensor:
        """(G, C) the inverse of the largest coefficient each component holds unclipped at scale 1, for components of
        at least PEAK_BITS bits (0 elsewhere): a token's scale is at least its coefficients times these."""
        bits = self.bits.long()
        reach = self.component_steps() * torch.exp2(bits.float() - 1)
        return torch.where(bits >= PEAK_BITS, 1 / torch.where(bits >= PEAK_BITS, reach, 1.0), 0.0)

    def bytes_per_token(self) -> int:
        """Bytes of packed codes and scale codes (one per block) this coder emits per token."""
        return self.layout.bytes_per_token + self.bits.shape[0]


# Coded parts of a layer (the prefixes of LayerCodes' fields): K and V codes, or (Patch layers of a cross-variant plan)
# codes of the attention input.
CODED_KINDS = ("key", "value", "hidden")


@dataclass
class LayerCodes:
    """What one layer puts on the wire: codes and scale codes for K and V, and the exact (sink) tokens in bf16.

    A Reuse unit of several layers ships its codes with its last layer; its other layers carry their sink alone.

    A Patch layer of a cross-variant plan ships, instead of K/V codes, codes of the producer's normalised attention
    input (`hidden_*`); its K/V codes are then zero-width. Other layers' hidden codes are zero-width.
    """

    key_codes: torch.Tensor  # (coded tokens, key bytes) uint8; zero-width but at a unit's last layer
    key_scales: torch.Tensor  # (coded tokens, blocks) uint8
    value_codes: torch.Tensor
    value_scales: torch.Tensor
    exact_keys: torch.Tensor  # (exact tokens, H, d) bf16, de-rotated
    exact_values: torch.Tensor
    hidden_codes: torch.Tensor  # (coded tokens, hidden bytes) uint8
    hidden_scales: torch.Tensor  # (coded tokens, 1 or 0) uint8

    def to(self, device: torch.device | str) -> LayerCodes:
        return LayerCodes(*(getattr(self, f.name).to(device) for f in fields(self)))

    def codes_shape(self, kind: str) -> tuple[int, int]:
        """(coded tokens, bytes per token) of the `kind` ("key", "value", "hidden") codes this layer puts on the
        wire."""
        return tuple(getattr(self, f"{kind}_codes").shape)


CoderPair = tuple[TransformCode, TransformCode]
RowCodes = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
