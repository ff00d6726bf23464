"""SCDCache: a `transformers.Cache` whose contents can leave the machine as compact codes.

On the producer it behaves like a `DynamicCache` and also records, per cached token, the token id, the rotary
(cos, sin) and position the model really used, and the attention mask, so `encode()` can de-rotate keys exactly
and ship what the consumer needs. On the consumer `from_payload()` rebuilds the layers from codes, re-rotating keys
with the consumer's own rotary embedding; generation then continues as with any cache. The math lives in
`codec.py`; this file only wires it into `generate()`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .artifacts import SCDArtifacts
from .codec import LayerCodes, TransformCode, decode_layers, encode_layers, flat_rows, scatter_rows
from .compat import integration_error
from .errors import ArtifactMismatchError, CacheStateError
from .patch import Aligner, decode_patch_layer, encode_patch_layer
from .payload import SCDPayload


class SCDLayer(DynamicLayer):
    """One layer's cache: post-RoPE keys and values, as attention reads them, that can be coded and rebuilt.

    Coding runs over all layers at once (`SCDCache.encode`, `from_payload`): on a GPU that is one kernel launch for
    every layer's keys and one for their values, instead of two a layer.
    """

    @classmethod
    def holding(cls, keys: torch.Tensor, values: torch.Tensor) -> SCDLayer:
        """A layer that starts from the given post-RoPE keys and values (batch, H, seq, d), held as they are: no
        copy of a freshly decoded cache (`update` would concatenate them onto an empty tensor)."""
        layer = cls()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        return layer

    @classmethod
    def from_patch(
        cls,
        layer_codes: LayerCodes,
        tokens: TokenLayout,
        patch: tuple[TransformCode, Aligner | None],
        attention: torch.nn.Module,
        kv_shape: tuple[int, int],
        dtype: torch.dtype,
    ) -> SCDLayer:
        """A Patch layer: K/V recomputed by the consumer's own attention projections from the aligned input."""
        keys, values = decode_patch_layer(
            layer_codes, tokens.cos, tokens.sin, tokens.coded, *patch, attention, tokens.shape, kv_shape, dtype
        )
        return cls.holding(keys, values)

    def overwrite(self, rows: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Replace tokens `rows` (flat in batch*seq) with the given post-RoPE (batch, H, n, d) keys and values."""
        every = torch.arange(rows.numel(), device=rows.device)
        scatter_rows(self.keys, rows, flat_rows(keys, every))
        scatter_rows(self.values, rows, flat_rows(values, every))


@dataclass(frozen=True)
class TokenLayout:
    """Where a cache's tokens go on the wire, worked out once for all layers: flat (batch*seq) indices of the coded
    and of the exact (sink) tokens, and the rotary (cos, sin) as (batch*seq, head_dim)."""

    shape: tuple[int, int]  # (batch, seq)
    coded: torch.Tensor
    exact: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor


@dataclass
class TokenRecord:
    """What the model used for each cached token: ids, positions, rotary (cos, sin) and the padding mask."""

    input_ids: torch.Tensor  # (batch, seq) int64; -1 where the forward got embeddings, not ids
    position_ids: torch.Tensor  # (batch, seq) int64
    cos: torch.Tensor  # (batch, seq, head_dim)
    sin: torch.Tensor
    attention_mask: torch.Tensor  # (batch, seq) bool
    hidden: torch.Tensor  # (batch, seq, patch candidates, hidden size): producer's attention input at Patch layers

    def layout(self, exact_tokens: int) -> TokenLayout:
        """Coded and exact tokens: the first `exact_tokens` real tokens of each row ship exactly, padding not at all."""
        rank = self.attention_mask.long().cumsum(-1) - 1
        exact = self.attention_mask & (rank < exact_tokens)
        coded = self.attention_mask & ~exact
        return TokenLayout(
            shape=tuple(self.attention_mask.shape),
            coded=coded.reshape(-1).nonzero().squeeze(-1),
            exact=exact.reshape(-1).nonzero().squeeze(-1),
            cos=self.cos.reshape(-1, self.cos.shape[-1]),
            sin=self.sin.reshape(-1, self.sin.shape[-1]),
        )

    def extend(self, other: TokenRecord) -> TokenRecord:
        return TokenRecord(*(torch.cat([a, b], dim=1) for a, b in zip(self._fields(), other._fields(), strict=False)))

    def select(self, index) -> TokenRecord:
        """Apply an index along (batch, seq) to every field, e.g. `[rows]` or `[:, :length]`."""
        return TokenRecord(*(field[index] for field in self._fields()))

    def _fields(self) -> tuple[torch.Tensor, ...]:
        return (self.input_ids, self.position_ids, self.cos, self.sin, self.attention_mask, self.hidden)


@dataclass
class _ForwardNote:
    """What the model's hooks saw of the forward now running, until `SCDCache.update()` claims it."""

    input_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    hidden_states: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None
    patch_inputs: dict[int, torch.Tensor] = field(default_factory=dict)


class SCDCache(Cache):
    """A KV cache bound to a model and to its SCD artifacts.

    Args:
        artifacts: calibration artifacts fitted on `model` (`SCDArtifacts.from_pretrained(...)`).
        model: the model this cache serves; its attention modules are observed to record rotary positions.
        ratio: compress at least this many times below BF16 (most faithful point that does).
        max_kl: or: the smallest point whose validation KL is within this bound.
        point: or: an operating point by name. With none of these, the artifacts' default point.
    """

    def __init__(
        self,
        artifacts: SCDArtifacts,
        model: torch.nn.Module,
        *,
        ratio: float | None = None,
        max_kl: float | None = None,
        point: str | None = None,
    ):
        handle, self.role = artifacts.identify(model)
        super().__init__(layers=[SCDLayer() for _ in range(handle.shape.num_layers)])
        self.artifacts = artifacts
        self.handle = handle
        self.operating_point = artifacts.point(point) if point else artifacts.select_point(ratio, max_kl)
        self.record: TokenRecord | None = None
        # Layers whose attention input the producer records, so any operating point can make them Patch layers.
        has_patches = self.role == "producer" and "patch.layers" in artifacts.tensors
        self.patch_candidates: list[int] = artifacts.tensors["patch.layers"].tolist() if has_patches else []
        self._patch_slots = {layer: slot for slot, layer in enumerate(self.patch_candidates)}
        self._note: _ForwardNote | None = None
        self._observe(model)

    # ---- recording what the model did --------------------------------------------------------------------------

    def _observe(self, model: torch.nn.Module) -> None:
        """Pre-hooks that note what each forward of the model passes (ids and mask to the decoder, positions and
        rotary (cos, sin) to the first attention module, the normalized input of Patch candidates); `update()` then
        claims the note.

        Why `update()` decides, not the hooks: the hooks cannot tell whether a forward runs with *this* cache without
        knowing the keyword transformers passes it under, and that keyword changed (`past_key_values` became `cache`
        in 5.24; the old check then matched nothing and the cache shipped empty). `Cache.update(keys, values,
        layer_idx)` is the contract every attention layer of every release calls on the cache it was handed, so a
        note claimed there belongs to this cache whatever the keyword. A note that is missing when `update()` runs
        is a loud `CacheStateError`, never a silently empty record. The hooks hold the cache weakly and are removed
        when it is garbage-collected.
        """
        ref = weakref.ref(self)

        def on_decoder(_module, args, kwargs):
            cache = ref()
            if cache is not None:
                ids = kwargs.get("input_ids", args[0] if args else None)
                cache._note = _ForwardNote(ids, kwargs.get("attention_mask"))

        def after_decoder(_module, _args, _kwargs, _output):
            cache = ref()
            if cache is not None:
                cache._note = None

        def on_attention(layer: int):
            def hook(_module, args, kwargs):
                cache = ref()
                if cache is None or cache._note is None:
                    return
                hidden = kwargs.get("hidden_states", args[0] if args else None)
                if layer == 0:
                    cache._note.hidden_states = hidden
                    cache._note.position_ids = kwargs.get("position_ids")
                    cache._note.rotary = kwargs.get("position_embeddings")
                if layer in cache._patch_slots:
                    cache._note.patch_inputs[layer] = hidden

            return hook

        hooks = [
            self.handle.decoder.register_forward_pre_hook(on_decoder, with_kwargs=True),
            self.handle.decoder.register_forward_hook(after_decoder, with_kwargs=True),
        ]
        for layer in sorted({0, *self.patch_candidates}):
            attention = self.handle.attention(layer)
            hooks.append(attention.register_forward_pre_hook(on_attention(layer), with_kwargs=True))
        weakref.finalize(self, lambda: [hook.remove() for hook in hooks])

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a layer's new K/V (as `Cache.update`), first claiming what the hooks noted of this forward."""
        if layer_idx == 0:
            self._record_forward(key_states.shape[2])
        if layer_idx in self._patch_slots:
            hidden = self._note.patch_inputs.pop(layer_idx, None) if self._note is not None else None
            if hidden is None:
                raise integration_error(
                    f"the attention input of layer {layer_idx} never reached SCDCache's hook in this forward."
                )
            self.record.hidden[:, -hidden.shape[1] :, self._patch_slots[layer_idx]] = hidden
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def _record_forward(self, seq: int) -> None:
        """Record the tokens of the forward whose first layer is being cached: `seq` new tokens."""
        note = self._note
        if note is None or note.rotary is None:
            raise integration_error(
                "SCDCache.update() was called, but the forward hooks on the model the cache was made for saw no "
                "rotary positions for it: was the cache passed to another model, or does this transformers call "
                "its attention modules differently?"
            )
        hidden, position_ids = note.hidden_states, note.position_ids
        batch = hidden.shape[0]
        # Without explicit position_ids the model computes one row of positions and (cos, sin) for the whole batch.
        cos, sin = (t.expand(batch, *t.shape[1:]) for t in note.rotary)
        if cos.shape[1] != seq:
            raise integration_error(f"the first layer cached {seq} tokens but its attention saw {cos.shape[1]}.")
        if position_ids is None:
            raise CacheStateError("the model's attention got no position_ids; SCDCache needs them to ship positions")
        position_ids = position_ids.expand(batch, seq)
        ids, mask = note.input_ids, note.attention_mask
        if ids is None or ids.shape[-1] != seq:
            ids = torch.full((batch, seq), -1, dtype=torch.long, device=position_ids.device)
        if mask is None or mask.ndim != 2:
            mask = torch.ones(batch, seq, dtype=torch.bool, device=position_ids.device)
        width = hidden.shape[-1] if self.patch_candidates else 0
        patch_inputs = hidden.new_zeros(batch, seq, len(self.patch_candidates), width)
        new = TokenRecord(ids.long(), position_ids.long(), cos, sin, mask[:, -seq:].bool(), patch_inputs)
        if self.record is None:
            self.record = new
            return
        if batch != self.record.input_ids.shape[0]:
            raise CacheStateError(
                f"this forward has batch size {batch} but the cache holds {self.record.input_ids.shape[0]} rows. "
                "generate() does not expand a pre-filled cache for beam search or num_return_sequences; call "
                "cache.batch_repeat_interleave(n) first."
            )
        last = self.record.position_ids[:, -1]
        if bool((position_ids[:, 0] <= last).any()):
            raise CacheStateError(
                f"this forward starts at position {int(position_ids[0, 0])} but the cache already holds positions up "
                f"to {int(last[0])}: the input repeats tokens the cache holds. When continuing from a cache, pass "
                "the cached prefix plus at least one new token to generate()."
            )
        self.record = self.record.extend(new)

    # ---- shipping -----------------------------------------------------------------------------------------------

    def encode(self, point: str | None = None) -> SCDPayload:
        """The cache as compact codes, with everything the consumer needs to continue.

        `point` names another operating point of the artifacts to encode at, instead of the cache's own.
        """
        if self.get_seq_length() == 0:
            raise CacheStateError("the cache is empty: run the model on a prompt with cache=cache first")
        if self.record is None:
            raise integration_error(
                f"the cache holds {self.get_seq_length()} tokens that SCDCache.update() never saw, so nothing was "
                "recorded of them: transformers filled the cache's layers without calling Cache.update()."
            )
        if bool((self.record.input_ids < 0).any()):
            raise CacheStateError(
                "the cache was filled from inputs_embeds, so its token ids are unknown; use input_ids"
            )
        if self.role != "producer":
            raise CacheStateError(
                f"this cache runs on {self.artifacts.config['consumer']['name']}, the consumer of these pair "
                "artifacts; only their producer can encode with them"
            )
        point = self.artifacts.point(point).name if point else self.operating_point.name
        device = self.layers[0].keys.device
        codes = self.artifacts.layer_codes(point, device)
        patches = self.artifacts.patch_codes(point, device)
        tokens = self.record.layout(self.artifacts.exact_tokens)
        kv_shape = (self.handle.shape.num_kv_heads, self.handle.shape.head_dim)
        for index, layer in enumerate(self.layers):
            if layer.get_seq_length() != tokens.shape[1]:
                raise integration_error(
                    f"layer {index} holds {layer.get_seq_length()} tokens but {tokens.shape[1]} were recorded."
                )
        coded = [index for index in range(len(self.layers)) if index not in patches]
        layers: list[LayerCodes | None] = [None] * len(self.layers)
        encoded = encode_layers(
            [self.layers[index].keys for index in coded],
            [self.layers[index].values for index in coded],
            tokens.cos,
            tokens.sin,
            tokens.coded,
            tokens.exact,
            [codes[index] for index in coded],
        )
        for index, layer_codes in zip(coded, encoded, strict=True):
            layers[index] = layer_codes
        for index, (code, _) in patches.items():
            hidden = self.record.hidden[:, :, self.patch_candidates.index(index)]
            layers[index] = encode_patch_layer(hidden, tokens.coded, code, kv_shape)
        return SCDPayload(
            artifacts_id=self.artifacts.artifacts_id,
            model_fingerprint=self.artifacts.model_fingerprint,
            operating_point=point,
            input_ids=self.record.input_ids.cpu(),
            position_ids=self.record.position_ids.cpu(),
            attention_mask=self.record.attention_mask.cpu(),
            layers=layers,
        )

    @classmethod
    def from_payload(cls, payload: SCDPayload, artifacts: SCDArtifacts, model: torch.nn.Module) -> SCDCache:
        """Rebuild a cache on the consumer, ready for `model.generate(..., cache=cache)`."""
        if payload.artifacts_id != artifacts.artifacts_id:
            raise ArtifactMismatchError(
                f"payload was made with artifacts {payload.artifacts_id}, these are {artifacts.artifacts_id}: "
                "load the same artifacts on both sides"
            )
        if len(payload.layers) != artifacts.shape.num_layers:
            raise ArtifactMismatchError(
                f"payload has {len(payload.layers)} layers, the artifacts' model {artifacts.shape.num_layers}"
            )
        cache = cls(artifacts, model, point=payload.operating_point)
        if artifacts.is_pair and cache.role != "consumer":
            raise ArtifactMismatchError(
                f"this model is the producer of the pair {artifacts.describe()}; rebuild the payload on the "
                f"consumer of a pair, {artifacts.config['consumer']['name']}"
            )
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        position_ids = payload.position_ids.to(device)
        cos, sin = cache.handle.rotary_cos_sin(position_ids, dtype)
        batch, seq = position_ids.shape
        no_inputs = torch.empty(batch, seq, 0, 0, dtype=dtype, device=device)
        cache.record = TokenRecord(
            payload.input_ids.to(device), position_ids, cos, sin, payload.attention_mask.to(device), no_inputs
        )
        codes = artifacts.layer_codes(payload.operating_point, device)
        patches = artifacts.patch_codes(payload.operating_point, device)
        tokens = cache.record.layout(artifacts.exact_tokens)
        kv_shape = (artifacts.shape.num_kv_heads, artifacts.shape.head_dim)
        for index, (layer_codes, coders) in enumerate(zip(payload.layers, codes, strict=True)):
            hidden_bytes = patches[index][0].layout.bytes_per_token if index in patches else 0
            expected = (coders[0].layout.bytes_per_token, coders[1].layout.bytes_per_token, hidden_bytes)
            widths = tuple(getattr(layer_codes, f"{kind}_codes").shape[-1] for kind in ("key", "value", "hidden"))
            if widths != expected:
                raise ArtifactMismatchError(f"layer {index} codes do not match the artifacts' bit allocation")
            if layer_codes.key_codes.shape[0] != tokens.coded.numel() or layer_codes.exact_keys.shape[1:] != kv_shape:
                raise ArtifactMismatchError(f"layer {index} of the payload does not match the artifacts' layout")
        layer_codes = payload.layers_on(device)
        coded = [index for index in range(len(layer_codes)) if index not in patches]
        decoded = decode_layers(
            [layer_codes[index] for index in coded],
            tokens.cos,
            tokens.sin,
            tokens.coded,
            tokens.exact,
            [codes[index] for index in coded],
            tokens.shape,
            dtype,
        )
        for index, (keys, values) in zip(coded, decoded, strict=True):
            cache.layers[index] = SCDLayer.holding(keys, values)
        for index, patch in patches.items():
            attention = cache.handle.attention(index)
            cache.layers[index] = SCDLayer.from_patch(layer_codes[index], tokens, patch, attention, kv_shape, dtype)
        if artifacts.recomputed_tokens:
            rows = cache.record.layout(artifacts.recomputed_tokens).exact
            if rows.numel() != batch * artifacts.recomputed_tokens:
                raise CacheStateError(f"every row needs at least {artifacts.recomputed_tokens} real tokens")
            own = cache.handle.prefix_cache(cache.record.input_ids.reshape(-1)[rows].reshape(batch, -1))
            for layer, (keys, values) in zip(cache.layers, own, strict=True):
                layer.overwrite(rows, keys, values)
        return cache

    @property
    def input_ids(self) -> torch.Tensor:
        """The cached prefix token ids: pass them, plus new tokens, to `generate()`."""
        if self.record is None:
            raise CacheStateError("the cache is empty")
        return self.record.input_ids

    @property
    def attention_mask(self) -> torch.Tensor:
        """The cached prefix's attention mask (0 at left padding): extend it with ones for new tokens."""
        if self.record is None:
            raise CacheStateError("the cache is empty")
        return self.record.attention_mask.long()

    # ---- keeping the record in step with the layers ------------------------------------------------------------

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.record is not None:
            self.record = self.record.select(beam_idx.to(self.record.input_ids.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.record is not None:
            rows = torch.arange(self.record.input_ids.shape[0], device=self.record.input_ids.device)
            self.record = self.record.select(rows.repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.record is not None:
            self.record = self.record.select(indices)

    def crop(self, max_length: int) -> None:
        """Drop cached tokens as `Cache.crop` does (a negative value removes that many), and their records."""
        super().crop(max_length)
        if self.record is not None:
            self.record = self.record.select((slice(None), slice(0, self.layers[0].get_seq_length())))

    def reset(self) -> None:
        super().reset()
        self.record = None
