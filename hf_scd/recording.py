"""What the model did for each cached token, recorded while it fills an `SCDCache`.

A cache ships post-RoPE K/V; to de-rotate them exactly, and to let the consumer continue, the producer must also know
each token's id, position, rotary (cos, sin) and padding, and at Patch layers of a cross-variant plan the layer's
normalized attention input. None of that reaches `Cache.update()`, so a `Recorder` puts forward pre-hooks on the model
that note it, and the cache's `update()` claims the note (see `Recorder` for why this split).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .arch import ModelHandle
from .compat import integration_error
from .errors import CacheStateError


@dataclass(frozen=True)
class TokenLayout:
    """Where a cache's tokens go on the wire, worked out once for all layers: flat (batch*seq) indices of the coded
    and of the sink tokens, and the rotary (cos, sin) as (batch*seq, head_dim)."""

    shape: tuple[int, int]  # (batch, seq)
    coded: torch.Tensor
    sink: torch.Tensor
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

    def layout(self, sink_tokens: int) -> TokenLayout:
        """Coded and sink tokens: the first `sink_tokens` real tokens of each row are the sink, padding is neither."""
        rank = self.attention_mask.long().cumsum(-1) - 1
        sink = self.attention_mask & (rank < sink_tokens)
        coded = self.attention_mask & ~sink
        return TokenLayout(
            shape=tuple(self.attention_mask.shape),
            coded=coded.reshape(-1).nonzero().squeeze(-1),
            sink=sink.reshape(-1).nonzero().squeeze(-1),
            cos=self.cos.reshape(-1, self.cos.shape[-1]),
            sin=self.sin.reshape(-1, self.sin.shape[-1]),
        )

    def extend(self, other: TokenRecord) -> TokenRecord:
        return TokenRecord(*(torch.cat([a, b], dim=1) for a, b in zip(self._fields(), other._fields(), strict=True)))

    def select(self, index) -> TokenRecord:
        """Apply an index along (batch, seq) to every field, e.g. `[rows]` or `[:, :length]`."""
        return TokenRecord(*(field[index] for field in self._fields()))

    def _fields(self) -> tuple[torch.Tensor, ...]:
        return (self.input_ids, self.position_ids, self.cos, self.sin, self.attention_mask, self.hidden)


@dataclass
class _ForwardNote:
    """What the model's hooks saw of the forward now running, until the cache's `update()` claims it."""

    input_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    hidden_states: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None
    patch_inputs: dict[int, torch.Tensor] = field(default_factory=dict)


class Recorder:
    """Records, for one cache, every forward of its model that runs with it.

    Pre-hooks note what each forward of the model passes: ids and mask to the decoder, positions and rotary (cos,
    sin) to the first attention module, the normalized input of the Patch candidates `patch_layers`. The cache's
    `update()` then claims the note (`claim`). Why `update()` decides, not the hooks: the hooks cannot tell whether a
    forward runs with *this* cache without knowing the keyword transformers passes it under, and that keyword changed
    (`past_key_values` became `cache` in 5.24; a keyword check then matched nothing and the cache shipped empty).
    `Cache.update(keys, values, layer_idx)` is the contract every attention layer of every release calls on the
    cache it was handed, so a note claimed there belongs to this cache whatever the keyword. A note missing when
    `update()` runs is a loud `CacheStateError`, never a silently empty record.

    Notes are kept per thread: forwards of one model may run at once on several threads, each with its own cache (a
    serving replica answering concurrent requests), and a forward's hooks and its cache's `update()` run on the
    forward's thread, so each cache claims the note of its own forward.

    The hooks hold the recorder weakly; `close()` removes them (so does garbage collection).
    """

    def __init__(self, handle: ModelHandle, patch_layers: Sequence[int] = ()):
        self.record: TokenRecord | None = None
        self._slots = {layer: slot for slot, layer in enumerate(patch_layers)}
        self._notes: dict[int, _ForwardNote] = {}  # by thread
        self._closed = False
        ref = weakref.ref(self)

        def on_decoder(_module, args, kwargs):
            recorder = ref()
            if recorder is not None:
                ids = kwargs.get("input_ids", args[0] if args else None)
                recorder._notes[threading.get_ident()] = _ForwardNote(ids, kwargs.get("attention_mask"))

        def after_decoder(_module, _args, _kwargs, _output):
            recorder = ref()
            if recorder is not None:
                recorder._notes.pop(threading.get_ident(), None)

        def on_attention(layer: int):
            def hook(_module, args, kwargs):
                recorder = ref()
                note = None if recorder is None else recorder._note
                if note is None:
                    return
                hidden = kwargs.get("hidden_states", args[0] if args else None)
                if layer == 0:
                    note.hidden_states = hidden
                    note.position_ids = kwargs.get("position_ids")
                    note.rotary = kwargs.get("position_embeddings")
                if layer in recorder._slots:
                    note.patch_inputs[layer] = hidden

            return hook

        hooks = [
            handle.decoder.register_forward_pre_hook(on_decoder, with_kwargs=True),
            handle.decoder.register_forward_hook(after_decoder, with_kwargs=True),
        ]
        for layer in sorted({0, *self._slots}):
            hooks.append(handle.attention(layer).register_forward_pre_hook(on_attention(layer), with_kwargs=True))
        self._finalizer = weakref.finalize(self, lambda: [hook.remove() for hook in hooks])

    @property
    def _note(self) -> _ForwardNote | None:
        """The note of the forward running on this thread."""
        return self._notes.get(threading.get_ident())

    def close(self) -> None:
        """Take the hooks off the model now; a forward that then runs with the cache is an error."""
        self._closed = True
        self._finalizer()

    def claim(self, layer_idx: int, new_tokens: int) -> None:
        """Called by the cache's `update()` for every layer of a forward that runs with it."""
        if self._closed:
            raise CacheStateError("this cache was closed: it no longer records, so a forward with it cannot ship")
        if layer_idx == 0:
            self._record_forward(new_tokens)
        if layer_idx in self._slots:
            hidden = self._note.patch_inputs.pop(layer_idx, None) if self._note is not None else None
            if hidden is None:
                raise integration_error(
                    f"the attention input of layer {layer_idx} never reached SCDCache's hook in this forward."
                )
            self.record.hidden[:, -hidden.shape[1] :, self._slots[layer_idx]] = hidden

    def select(self, index) -> None:
        """Keep the record in step with the cache's layers after a beam reorder, batch selection or crop."""
        if self.record is not None:
            if isinstance(index, torch.Tensor):
                index = index.to(self.record.input_ids.device)
            self.record = self.record.select(index)

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
        width = hidden.shape[-1] if self._slots else 0
        patch_inputs = hidden.new_zeros(batch, seq, len(self._slots), width)
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

    def patch_input(self, layer: int) -> torch.Tensor:
        """The producer's recorded normalized attention input (batch, seq, hidden) at Patch candidate `layer`."""
        return self.record.hidden[:, :, self._slots[layer]]
