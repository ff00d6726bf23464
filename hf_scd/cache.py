"""SCDCache: a `transformers.Cache` whose contents can leave the machine as compact codes.

On the producer it behaves like a `DynamicCache` whose `Recorder` also notes, per cached token, the id, position,
rotary (cos, sin) and padding the model really used; `encode()` hands the layers and that record to the operating
point's `Plan`. On the consumer `from_payload()` has the plan decode the payload, keys re-rotated with the consumer's
own rotary embedding, and holds the result; generation then continues as with any cache. This file holds no math and
no plan logic: it is the container `generate()` talks to.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .artifacts import SCDArtifacts
from .compat import integration_error
from .errors import ArtifactMismatchError, CacheStateError
from .fidelity import PointChoice, check_point, choose_point
from .payload import LayerCodes, PayloadHead, SCDPayload
from .plan import DEFAULT_MAX_KV_BYTES
from .recording import Recorder, TokenRecord


class SCDLayer(DynamicLayer):
    """One layer's cache: post-RoPE keys and values, as attention reads them."""

    @classmethod
    def holding(cls, keys: torch.Tensor, values: torch.Tensor) -> SCDLayer:
        """A layer that starts from the given post-RoPE keys and values (batch, H, seq, d), held as they are: no
        copy of a freshly decoded cache (`update` would concatenate them onto an empty tensor)."""
        layer = cls()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        return layer


class SCDCache(Cache):
    """A KV cache bound to a model and to its SCD artifacts.

    Args:
        artifacts: calibration artifacts fitted on `model` (`SCDArtifacts.from_pretrained(...)`).
        model: the model this cache serves; its decoder and attention modules are observed to record positions.
        ratio: compress at least this many times below BF16 (most faithful point that does).
        max_kl: or: the smallest point whose validation KL is within this bound (chosen once, from calibration
            text; `encode(max_kl=...)` checks the bound against this request's own codes instead).
        point: or: an operating point by name. With none of these, the artifacts' default point.
        strict: accept only the weights the artifacts were fitted on; by default same-model artifacts also accept
            weights their codes fit (`SCDArtifacts.identify`), with an `ArtifactFitWarning`.

    `close()` (or leaving a `with` block) takes the recording hooks off the model; garbage collection does too.
    """

    def __init__(
        self,
        artifacts: SCDArtifacts,
        model: torch.nn.Module,
        *,
        ratio: float | None = None,
        max_kl: float | None = None,
        point: str | None = None,
        strict: bool = False,
    ):
        handle, self.role = artifacts.identify(model, strict=strict)
        super().__init__(layers=[SCDLayer() for _ in range(handle.shape.num_layers)])
        self.artifacts = artifacts
        self.handle = handle
        self.operating_point = artifacts.point(point) if point else artifacts.select_point(ratio, max_kl)
        # The producer records the attention input of every Patch candidate, so any operating point can patch them.
        patch_candidates = artifacts.patch_candidates if self.role == "producer" else []
        self.recorder = Recorder(handle, patch_candidates)
        # Called with a layer's index once `update()` has stored it: a stream ships the layer while the next computes.
        self.layer_listeners: list[Callable[[int], None]] = []

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a layer's new K/V (as `Cache.update`), once the recorder has claimed what it noted of the forward."""
        self.recorder.claim(layer_idx, key_states.shape[2])
        stored = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        for listener in self.layer_listeners:
            listener(layer_idx)
        return stored

    def close(self) -> None:
        """Stop recording: take the hooks off the model. The cache's contents stay usable for encode()."""
        self.recorder.close()

    def __enter__(self) -> SCDCache:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    @property
    def record(self) -> TokenRecord | None:
        """What the model used for each cached token (ids, positions, rotary, mask), or None before any forward."""
        return self.recorder.record

    # ---- shipping -----------------------------------------------------------------------------------------------

    def encode(self, point: str | None = None, *, max_kl: float | None = None, packed: bool = True) -> SCDPayload:
        """The cache as compact codes, with everything the consumer needs to continue.

        `point` names another operating point of the artifacts to encode at, instead of the cache's own. `max_kl`
        instead checks this request: the cheapest point whose predicted KL is within it, or exact bf16 K/V when
        none is (`choose_point`); the payload records the prediction. `packed=False` keeps the codes as the rows the
        decoder reads where the CPU codec makes them, for `hf_scd.entropy.compress_payload`, which then neither packs
        nor unpacks them (the codes a `max_kl` check chose are held so anyway: it decoded them); the payload writes
        out as the same bytes either way.
        """
        if max_kl is not None:
            if point is not None:
                raise CacheStateError("pass point or max_kl to encode(), not both")
            choice = self.choose_point(max_kl)
            return SCDPayload.of(self.payload_head(choice.point, choice.predicted_kl), choice.layers)
        self._check_encodable()
        plan = self.artifacts.plan(point or self.operating_point.name, self.layers[0].keys.device)
        return SCDPayload.of(
            self.payload_head(plan.point), plan.encode(self._kv(), self.record, self.recorder.patch_input, packed)
        )

    def choose_point(self, max_kl: float) -> PointChoice:
        """Which point this cache should ship at for a next-token KL of at most `max_kl`: the cheapest whose KL,
        predicted from the real distortion of its codes on this request, is within it, else the exact point (bf16
        K/V). Needs artifacts with a fidelity map (same-model)."""
        self._check_encodable()
        return choose_point(self.artifacts, self.handle, self._kv(), self.record, self.recorder.patch_input, max_kl)

    def check_point(self, point: str) -> PointChoice:
        """The KL this cache's codes at `point` are predicted to cost, from their real distortion (and the codes)."""
        self._check_encodable()
        return check_point(self.artifacts, self.handle, self._kv(), self.record, self.recorder.patch_input, point)

    def _kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(layer.keys, layer.values) for layer in self.layers]

    def _check_encodable(self) -> None:
        """Refuse to encode a cache that cannot ship: empty, unrecorded, filled from embeddings, or a consumer's."""
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
                f"this cache runs on {self.artifacts.config.consumer.name}, the consumer of these pair "
                "artifacts; only their producer can encode with them"
            )

    def payload_head(self, point: str, predicted_kl: float | None = None) -> PayloadHead:
        """What precedes the codes of this cache at `point`: the artifacts, the producer's own weights (the consumer
        checks them), the recorded tokens, and the KL a fidelity check predicted, if one chose the point."""
        return PayloadHead(
            artifacts_id=self.artifacts.artifacts_id,
            model_fingerprint=self.handle.fingerprint,
            operating_point=point,
            input_ids=self.record.input_ids.cpu(),
            position_ids=self.record.position_ids.cpu(),
            attention_mask=self.record.attention_mask.cpu(),
            num_layers=len(self.layers),
            predicted_kl=predicted_kl,
        )

    @classmethod
    def from_payload(
        cls,
        payload: SCDPayload,
        artifacts: SCDArtifacts,
        model: torch.nn.Module,
        *,
        strict: bool = False,
        max_positions: int | None = None,
        max_kv_bytes: int = DEFAULT_MAX_KV_BYTES,
    ) -> SCDCache:
        """Rebuild a cache on the consumer, ready for `model.generate(..., cache=cache)`.

        A payload comes from a peer: before anything is decoded its token ids must lie in the model's vocabulary,
        its positions below `max_positions` (default: the model's `max_position_embeddings`), and the K/V it would
        rebuild within `max_kv_bytes`; otherwise `CorruptPayloadError` / `PayloadLimitError`. The model must be the
        one the payload's producer requires (`SCDArtifacts.check_producer`): with same-model artifacts, the very
        weights that made it; `strict` as for `SCDCache`.
        """
        with CacheRebuild(
            payload.head, artifacts, model, strict=strict, max_positions=max_positions, max_kv_bytes=max_kv_bytes
        ) as rebuild:
            rebuild.add_all(payload)
            return rebuild.finish()

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
        self.recorder.select(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.record is not None:
            rows = torch.arange(self.record.input_ids.shape[0], device=self.record.input_ids.device)
            self.recorder.select(rows.repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.recorder.select(indices)

    def crop(self, max_length: int) -> None:
        """Drop cached tokens as `Cache.crop` does (a negative value removes that many), and their records."""
        super().crop(max_length)
        self.recorder.select((slice(None), slice(0, self.layers[0].get_seq_length())))

    def reset(self) -> None:
        super().reset()
        self.recorder.record = None


class CacheRebuild:
    """A consumer's `SCDCache`, rebuilt from a payload's head and its layers: all at once (`add_all`) or layer by
    layer as a stream delivers them (`add_layer`). The head is checked against the artifacts and the consumer's
    limits before anything is decoded; the cache exists only once every layer is in (`finish`), so a transfer that
    fails half way leaves no half-built cache, and leaving the `with` block without `finish` takes the hooks off."""

    def __init__(
        self,
        head: PayloadHead,
        artifacts: SCDArtifacts,
        model: torch.nn.Module,
        *,
        strict: bool = False,
        max_positions: int | None = None,
        max_kv_bytes: int = DEFAULT_MAX_KV_BYTES,
    ):
        if head.artifacts_id != artifacts.artifacts_id:
            raise ArtifactMismatchError(
                f"payload was made with artifacts {head.artifacts_id}, these are {artifacts.artifacts_id}: "
                "load the same artifacts on both sides"
            )
        artifacts.check_producer(head.model_fingerprint, model)  # before the fit probe could run, or warn
        self.cache = SCDCache(artifacts, model, point=head.operating_point, strict=strict)
        self.finished = False
        try:
            if artifacts.is_pair and self.cache.role != "consumer":
                raise ArtifactMismatchError(
                    f"this model is the producer of the pair {artifacts.describe()}; rebuild the payload on the "
                    f"consumer of a pair, {artifacts.config.consumer.name}"
                )
            handle = self.cache.handle
            param = next(handle.model.parameters())
            self.device, self.dtype = param.device, param.dtype
            position_ids = head.position_ids.to(self.device)
            cos, sin = handle.rotary_cos_sin(position_ids, self.dtype)
            no_inputs = torch.empty(*position_ids.shape, 0, 0, dtype=self.dtype, device=self.device)
            mask = head.attention_mask.to(self.device)
            self.record = TokenRecord(head.input_ids.to(self.device), position_ids, cos, sin, mask, no_inputs)
            self.plan = artifacts.plan(head.operating_point, self.device)
            if head.num_layers != len(self.plan.layers):
                raise ArtifactMismatchError(
                    f"payload has {head.num_layers} layers, the artifacts' model {len(self.plan.layers)}"
                )
            self.plan.check_tokens(self.record, handle, max_positions, max_kv_bytes)
            self.tokens = self.plan.layout(self.record)
            self.kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.plan.layers)
            self.waiting: dict[int, LayerCodes] = {}  # layers of a Reuse unit whose last layer has not arrived
        except BaseException:
            self.cache.close()
            raise

    def layer_bytes(self, index: int) -> int:
        """The size of layer `index`'s codes for this head: a stream refuses a frame that declares more."""
        return self.plan.layer_bytes(index, self.tokens.coded.numel(), self.tokens.sink.numel())

    def add_layer(self, index: int, codes: LayerCodes) -> None:
        """Check one layer as it arrives and decode what it completes: itself, or its whole Reuse unit once the
        unit's last layer is in (the same values `add_all` gives them)."""
        self.plan.check_layer(index, codes, self.tokens.coded.numel())
        on_device = codes.to(self.device)
        done = self.plan.decode_layer(index, on_device, self.tokens, self.cache.handle, self.dtype, self.waiting)
        for layer, kv in done.items():
            self.kv[layer] = kv

    def add_all(self, payload: SCDPayload) -> None:
        """Check and decode every layer of a payload together (one kernel launch per kind on CUDA)."""
        self.plan.check(payload.layers, self.record)
        self.kv = self.plan.decode_layers(payload.layers_on(self.device), self.record, self.cache.handle, self.dtype)

    def finish(self) -> SCDCache:
        """The rebuilt cache, once every layer is in."""
        missing = [index for index, kv in enumerate(self.kv) if kv is None]
        if missing:
            raise CacheStateError(f"layers {missing} never arrived: the cache cannot be used")
        kv = self.plan.finish(self.kv, self.record, self.cache.handle)
        self.cache.layers = [SCDLayer.holding(keys, values) for keys, values in kv]
        self.cache.recorder.record = self.record
        self.finished = True
        return self.cache

    def __enter__(self) -> CacheRebuild:
        return self

    def __exit__(self, *_exc) -> None:
        if not self.finished:
            self.cache.close()  # a failed rebuild leaves no hooks behind
