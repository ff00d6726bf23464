"""Plan: what one operating point does with every layer of a cache and with its first tokens.

Each layer has one coder: a `ReuseUnit` transform-codes the K/V of its layers together (one layer, or a run of
consecutive layers whose heads share one basis and one bit budget; a model's own cache, or, across variants, a
prediction of the consumer's), a `PatchLayer` codes the producer's normalized attention input so the consumer
recomputes K/V with its own projections. The `SinkPolicy` says how the first real tokens of each row travel. Same-model
transfer is a plan of Reuse layers with an exact sink; a cross-variant plan adds Patch layers and a recomputed sink.
The plan encodes a recorded cache into payload layers, checks a payload's layers against itself, and decodes them;
the cache only holds what comes out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from . import backend
from .arch import ModelHandle
from .codec import flat_rows, scatter_rows
from .codes import CODED_KINDS, LayerCodes, TransformCode
from .compat import integration_error
from .errors import ArtifactMismatchError, CacheStateError, CorruptPayloadError, PayloadLimitError
from .patch import Aligner, decode_patch_layer, encode_patch_layer
from .recording import TokenLayout, TokenRecord

KV = tuple[torch.Tensor, torch.Tensor]
# The most K/V memory a rebuilt cache may take unless the caller says otherwise: a peer cannot make us allocate more.
DEFAULT_MAX_KV_BYTES = 8 << 30
# A sink this long ships every token of any row exactly: the plan of the reserved exact point.
ALL_TOKENS = 1 << 62


@dataclass(frozen=True)
class SinkPolicy:
    """How the first real tokens of each row, the attention sink that draws most of the attention mass, travel:
    `exact` of them ship exactly in bf16 (same model); the consumer computes `recomputed` of them itself, with its
    own weights (cross-variant, where the producer's exact K/V would be the wrong model's)."""

    exact: int = 0
    recomputed: int = 0


@dataclass(frozen=True, eq=False)
class ReuseUnit:
    """The K/V of consecutive layers `members`, transform-coded together: the same model's own, or (cross-variant
    Reuse) predicted for the consumer. Its codes travel with its last layer, so a stream sends one unit per frame
    that carries codes; the other layers' frames carry their exact sink alone."""

    members: tuple[int, ...]
    key: TransformCode
    value: TransformCode

    def carries(self, index: int) -> bool:
        return index == self.members[-1]

    def widths(self, index: int) -> tuple[int, int, int]:
        """Bytes per coded token of the (key, value, hidden) codes layer `index` puts on the wire."""
        if not self.carries(index):
            return (0, 0, 0)
        return (self.key.layout.bytes_per_token, self.value.layout.bytes_per_token, 0)

    def scale_widths(self, index: int) -> tuple[int, int, int]:
        """Per-token scale codes of (key, value, hidden) of layer `index`: one per block of the unit's coders."""
        if not self.carries(index):
            return (0, 0, 0)
        return (self.key.bits.shape[0], self.value.bits.shape[0], 0)


@dataclass(frozen=True)
class PatchLayer:
    """The producer's normalized attention input, coded; the consumer predicts its own (`aligner` corrects the linear
    prediction where calibration found that it helps) and recomputes K/V with its own projections."""

    hidden: TransformCode
    aligner: Aligner | None

    def widths(self, index: int) -> tuple[int, int, int]:
        return (0, 0, self.hidden.layout.bytes_per_token)

    def scale_widths(self, index: int) -> tuple[int, int, int]:
        return (0, 0, 1)


@dataclass(frozen=True)
class Plan:
    """One operating point: a coder for every layer (a unit's coder at each of its layers), the sink policy, and the
    KV shape (kv_heads, head_dim)."""

    point: str
    layers: tuple[ReuseUnit | PatchLayer, ...]
    sink: SinkPolicy
    kv_shape: tuple[int, int]

    @property
    def units(self) -> list[ReuseUnit]:
        """The Reuse units, in layer order."""
        return [unit for index in range(len(self.layers)) if (unit := self.unit_ending_at(index)) is not None]

    def unit_ending_at(self, index: int) -> ReuseUnit | None:
        """The Reuse unit whose codes layer `index` carries (its last member), or None."""
        coder = self.layers[index]
        return coder if isinstance(coder, ReuseUnit) and coder.carries(index) else None

    @property
    def patch_layers(self) -> list[int]:
        return [index for index, coder in enumerate(self.layers) if isinstance(coder, PatchLayer)]

    def encode(
        self,
        kv: Sequence[KV],
        record: TokenRecord,
        patch_input: Callable[[int], torch.Tensor],
        packed: bool = True,
    ) -> list[LayerCodes]:
        """Every layer's post-RoPE (keys, values) (batch, H, seq, d) -> its payload codes; `patch_input(layer)` is the
        producer's recorded attention input (batch, seq, hidden) at a Patch layer. All Reuse units are coded
        together (one kernel launch on CUDA); `encode_layer` codes one layer, for streaming. With `packed=False` the
        units' codes are held unpacked (`UnpackedLayerCodes`) where the codec gives them so, for codes that are
        decoded or entropy-coded next."""
        tokens = self.layout(record, [keys.shape[2] for keys, _ in kv])
        layers: list[LayerCodes | None] = [None] * len(self.layers)
        units = self.units
        unit_keys, unit_values = self._unit_inputs(units, kv)
        coders = [(unit.key, unit.value) for unit in units]
        encoded = backend.encode_units(
            unit_keys, unit_values, tokens.cos, tokens.sin, tokens.coded, tokens.sink, coders, packed
        )
        for unit, codes in zip(units, encoded, strict=True):
            for index, layer_codes in zip(unit.members, codes, strict=True):
                layers[index] = layer_codes
        for index in self.patch_layers:
            layers[index] = encode_patch_layer(
                patch_input(index), tokens.coded, self.layers[index].hidden, self.kv_shape
            )
        return layers

    @staticmethod
    def _unit_inputs(units: Sequence[ReuseUnit], kv: Sequence[KV]) -> tuple[list, list]:
        """The units' member layers' keys and values, one list per unit."""
        return (
            [[kv[index][0] for index in unit.members] for unit in units],
            [[kv[index][1] for index in unit.members] for unit in units],
        )

    def encode_layer(
        self,
        index: int,
        kv: Sequence[KV],
        tokens: TokenLayout,
        patch_input: torch.Tensor | None = None,
        packed: bool = True,
    ) -> LayerCodes:
        """Layer `index`'s codes, the same bytes `encode` gives it, from the (keys, values) of layers 0..index (at
        least): a layer can leave while the next is being computed. A unit's last layer codes the whole unit; with
        `packed=False` it holds them unpacked (`UnpackedLayerCodes`) where the codec gives them so, for a frame
        that is entropy-coded next."""
        coder = self.layers[index]
        if isinstance(coder, PatchLayer):
            return encode_patch_layer(patch_input, tokens.coded, coder.hidden, self.kv_shape)
        keys, values = kv[index]
        if not coder.carries(index):
            return backend.layer_codes(keys, values, tokens.cos, tokens.sin, tokens.coded, tokens.sink)
        unit_keys, unit_values = self._unit_inputs([coder], kv)
        pair = (coder.key, coder.value)
        (codes,) = backend.code_units(unit_keys, unit_values, tokens.cos, tokens.sin, tokens.coded, [pair], packed)
        return backend.layer_codes(keys, values, tokens.cos, tokens.sin, tokens.coded, tokens.sink, codes, pair)

    def layout(self, record: TokenRecord, layer_tokens: Sequence[int] = ()) -> TokenLayout:
        """Where the recorded tokens go on the wire under this plan's sink; every layer must hold them all."""
        tokens = record.layout(self.sink.exact)
        for index, held in enumerate(layer_tokens):
            if held != tokens.shape[1]:
                raise integration_error(f"layer {index} holds {held} tokens but {tokens.shape[1]} were recorded.")
        return tokens

    def check(self, layers: Sequence[LayerCodes], record: TokenRecord) -> None:
        """Refuse payload layers this plan did not make: layer count, code and scale widths, token counts. With
        `check_tokens` (the consumer's limits), all before anything is decoded."""
        if len(layers) != len(self.layers):
            raise ArtifactMismatchError(f"payload has {len(layers)} layers, the artifacts' model {len(self.layers)}")
        coded = record.layout(self.sink.exact).coded.numel()
        for index, layer_codes in enumerate(layers):
            self.check_layer(index, layer_codes, coded)

    def check_layer(self, index: int, layer_codes: LayerCodes, coded: int) -> None:
        """One layer's code and scale widths against this plan's coder, and its token count (`coded` coded rows)."""
        coder = self.layers[index]
        widths = tuple(layer_codes.codes_shape(kind)[-1] for kind in CODED_KINDS)
        scale_widths = tuple(getattr(layer_codes, f"{kind}_scales").shape[-1] for kind in CODED_KINDS)
        if widths != coder.widths(index) or scale_widths != coder.scale_widths(index):
            raise ArtifactMismatchError(f"layer {index} codes do not match the artifacts' bit allocation")
        if layer_codes.codes_shape("key")[0] != coded or layer_codes.exact_keys.shape[1:] != self.kv_shape:
            raise ArtifactMismatchError(f"layer {index} of the payload does not match the artifacts' layout")

    def layer_bytes(self, index: int, coded: int, exact: int) -> int:
        """Bytes one layer's codes take for `coded` coded and `exact` sink tokens: what a peer may declare."""
        widths, scales = self.layers[index].widths(index), self.layers[index].scale_widths(index)
        return coded * (sum(widths) + sum(scales)) + 2 * exact * self.kv_shape[0] * self.kv_shape[1] * 2

    def check_tokens(
        self, record: TokenRecord, handle: ModelHandle, max_positions: int | None, max_kv_bytes: int
    ) -> None:
        """Refuse a payload the consumer must not rebuild: token ids outside the vocabulary, positions from
        `max_positions` on (default: the model's `max_position_embeddings`), more K/V than `max_kv_bytes`."""
        config, real = handle.model.config, record.attention_mask
        if bool((record.input_ids[real] >= config.vocab_size).any()):
            raise CorruptPayloadError(f"payload has token ids outside the model's vocabulary of {config.vocab_size}")
        limit = max_positions or getattr(config, "max_position_embeddings", None)
        last = int(record.position_ids[real].max())
        if limit is not None and last >= limit:
            raise PayloadLimitError(f"payload reaches position {last}; this consumer allows positions below {limit}")
        batch, seq = record.input_ids.shape
        element = next(handle.model.parameters()).element_size()
        kv_bytes = 2 * len(self.layers) * batch * seq * self.kv_shape[0] * self.kv_shape[1] * element
        if kv_bytes > max_kv_bytes:
            raise PayloadLimitError(
                f"rebuilding this payload ({batch} x {seq} tokens) takes {kv_bytes / 2**30:.1f} GiB of K/V; the "
                f"limit is {max_kv_bytes / 2**30:.1f} GiB (max_kv_bytes)"
            )

    def decode_layers(
        self, layers: Sequence[LayerCodes], record: TokenRecord, handle: ModelHandle, dtype: torch.dtype
    ) -> list[KV]:
        """Payload layers (checked with `check`) -> every layer's post-RoPE (keys, values) (batch, H, seq, d) in
        `dtype`, keys rotated with the consumer's own (cos, sin) in `record`, before `finish`. All Reuse units are
        decoded together (one kernel launch on CUDA); `decode_layer` decodes layers as they arrive."""
        tokens = record.layout(self.sink.exact)
        kv: list[KV | None] = [None] * len(self.layers)
        units = self.units
        for unit, decoded in zip(units, self._decode_units(units, layers, tokens, dtype), strict=True):
            for index, keys_values in zip(unit.members, decoded, strict=True):
                kv[index] = keys_values
        for index in self.patch_layers:
            kv[index] = self._decode_patch(index, layers[index], tokens, handle, dtype)
        return kv

    def _decode_units(
        self, units: Sequence[ReuseUnit], layers: Sequence[LayerCodes] | dict, tokens: TokenLayout, dtype: torch.dtype
    ) -> list[list[KV]]:
        return backend.decode_units(
            [[layers[index] for index in unit.members] for unit in units],
            tokens.cos,
            tokens.sin,
            tokens.coded,
            tokens.sink,
            [(unit.key, unit.value) for unit in units],
            self.kv_shape,
            tokens.shape,
            dtype,
        )

    def decode_layer(
        self,
        index: int,
        layer_codes: LayerCodes,
        tokens: TokenLayout,
        handle: ModelHandle,
        dtype: torch.dtype,
        waiting: dict[int, LayerCodes],
    ) -> dict[int, KV]:
        """The layers that layer `index`'s arrival completes, with the values `decode_layers` gives them, before
        `finish`: itself, or nothing while its unit waits (in `waiting`) for the last layer, then the whole unit."""
        coder = self.layers[index]
        if isinstance(coder, PatchLayer):
            return {index: self._decode_patch(index, layer_codes, tokens, handle, dtype)}
        waiting[index] = layer_codes
        if not coder.carries(index):
            return {}
        missing = [member for member in coder.members if member not in waiting]
        if missing:
            raise CacheStateError(f"layer {index} arrived before layers {missing} of its unit")
        (decoded,) = self._decode_units([coder], waiting, tokens, dtype)
        for member in coder.members:
            del waiting[member]
        return dict(zip(coder.members, decoded, strict=True))

    def _decode_patch(
        self, index: int, layer_codes: LayerCodes, tokens: TokenLayout, handle: ModelHandle, dtype: torch.dtype
    ) -> KV:
        coder = self.layers[index]
        return decode_patch_layer(
            layer_codes,
            tokens.cos,
            tokens.sin,
            tokens.coded,
            coder.hidden,
            coder.aligner,
            handle.attention(index),
            tokens.shape,
            self.kv_shape,
            dtype,
        )

    def finish(self, kv: list[KV], record: TokenRecord, handle: ModelHandle) -> list[KV]:
        """Decoded layers -> the cache's layers: the consumer's own K/V for a recomputed sink, if any."""
        if self.sink.recomputed:
            self._recompute_sink(kv, record, handle)
        return kv

    def _recompute_sink(self, kv: list[KV], record: TokenRecord, handle: ModelHandle) -> None:
        """Overwrite each row's first `sink.recomputed` real tokens with the consumer's own K/V for them."""
        batch = record.input_ids.shape[0]
        rows = record.layout(self.sink.recomputed).sink
        if rows.numel() != batch * self.sink.recomputed:
            raise CacheStateError(f"every row needs at least {self.sink.recomputed} real tokens")
        own = handle.prefix_cache(record.input_ids.reshape(-1)[rows].reshape(batch, -1))
        every = torch.arange(rows.numel(), device=rows.device)
        for (keys, values), (own_keys, own_values) in zip(kv, own, strict=True):
            scatter_rows(keys, rows, flat_rows(own_keys, every))
            scatter_rows(values, rows, flat_rows(own_values, every))
