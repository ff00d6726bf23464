"""Moving an `SCDCache` over a `Link`: the producer's `CacheSender`, the consumer's `receive_cache`.

Streamed, the producer sends the payload's head as soon as the model has written layer 0 (the record of the tokens is
complete then), and each layer as soon as the model has written it: one thread encodes, another sends, while the
forward goes on, so the wire and the codec hide behind the prefill (LMCache's layer-wise mode, vLLM's
`save_kv_layer`). The consumer checks the head, then checks and decodes each layer as it arrives, and holds a cache
only once every layer is in. One-shot, the whole `SCDPayload` travels in one frame, for comparison.

Nothing is lost: `receive_cache(..., fallback="prefill")` answers every failure (deadline, a producer that dies or
aborts, a corrupted, truncated, oversized or unauthenticated frame, other artifacts, another version) by prefilling
the prompt locally, and says why in its `TransferReport`.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from transformers import Cache

from ..cache import CacheRebuild, SCDCache
from ..entropy import MAGIC as ENTROPY_MAGIC
from ..entropy import compress_layer, compress_payload, decompress_layer, decompress_payload
from ..errors import CacheStateError, ProducerAbortedError, SCDError, TransferError, describe
from ..payload import PayloadHead, SCDPayload, layer_to_bytes
from ..plan import DEFAULT_MAX_KV_BYTES
from ..prefill import prefill
from .frames import Frame, Kind, json_frame
from .links import Link

# Body caps of the small frames: a peer cannot make a receiver allocate more for them.
MAX_JSON_FRAME_BYTES = 64 << 10
MAX_HEAD_BYTES = 64 << 20
# Safetensors header and metadata of a layer frame, on top of its tensors' bytes.
LAYER_FRAME_OVERHEAD = 4 << 10
DEFAULT_TIMEOUT_S = 30.0


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1e3


@dataclass
class SendReport:
    """The producer's side of one transfer."""

    streaming: bool
    layers: int = 0
    wire_bytes: int = 0
    encode_ms: float = 0.0
    prefill_ms: float = 0.0  # the forward the stream overlapped (streamed live), else 0


class CacheSender:
    """Sends one `SCDCache` over `link`, at the cache's operating point or `point`.

    Live (the producer prefills now): enter the sender before the forward, and every layer leaves as the model writes
    it; leaving the block sends the end of the stream, or, if the block raised, an ABORT frame with the reason::

        with CacheSender(link, cache) as sender:
            model(input_ids, **with_cache(model, cache))
        sender.report

    Stored (the cache is already filled): `CacheSender(link, cache).send(streaming=True)`; `streaming=False` sends
    one payload frame instead.

    `max_kl` has the producer check this request (`SCDCache.choose_point`) and send at the point it chooses, the
    prediction in the head. Stored sends only: the check measures the codes of every layer, so it cannot be made
    before a live stream's layer 0 leaves, and a live stream with `max_kl` is refused.

    `entropy=True` sends the codes through the entropy stage (`hf_scd.entropy`: about 11% fewer bytes at 8x, for
    up to about a fifth more of the codec's CPU time on each side), for slow links: each layer frame that ends a
    Reuse unit, or the one-shot payload. `receive_cache` knows a coded frame by its magic.
    """

    def __init__(
        self,
        link: Link,
        cache: SCDCache,
        *,
        point: str | None = None,
        max_kl: float | None = None,
        entropy: bool = False,
    ):
        if point is not None and max_kl is not None:
            raise CacheStateError("pass point or max_kl to CacheSender, not both")
        self.link, self.cache, self.max_kl, self.entropy = link, cache, max_kl, entropy
        self.point = point or cache.operating_point.name
        self.predicted_kl: float | None = None
        self.report = SendReport(streaming=True)
        self._encode: queue.Queue[int | None] = queue.Queue()
        self._send: queue.Queue[Frame | None] = queue.Queue()
        self._errors: list[BaseException] = []
        self._threads: list[threading.Thread] = []
        self._plan = self._tokens = self._head = None
        self._started = 0.0

    # ---- stored context ---------------------------------------------------------------------------------------

    def send(self, streaming: bool = True) -> SendReport:
        """Send a filled cache: layer by layer, encoding the next while the last is on the wire, or in one frame."""
        if not streaming:
            start = time.perf_counter()
            if self.max_kl is None:
                payload = self.cache.encode(self.point, packed=not self.entropy)
            else:
                payload = self.cache.encode(max_kl=self.max_kl)
            self.point, self.predicted_kl = payload.operating_point, payload.predicted_kl
            blob = compress_payload(payload, self.cache.artifacts) if self.entropy else payload.to_bytes()
            self.report = SendReport(streaming=False, layers=len(self.cache.layers), encode_ms=_ms(start))
            self._ship(Frame(Kind.PAYLOAD, blob, tokens=int(self.cache.record.attention_mask.sum())))
            return self.report
        if self.max_kl is not None:  # chosen before layer 0 leaves; the layers are then encoded as they go
            choice = self.cache.choose_point(self.max_kl)
            self.point, self.predicted_kl = choice.point, choice.predicted_kl
        self._start()
        for index in range(len(self.cache.layers)):
            self._encode.put(index)
        self._finish(None)
        return self.report

    # ---- live -------------------------------------------------------------------------------------------------

    def __enter__(self) -> CacheSender:
        if self.cache.get_seq_length():
            raise CacheStateError("a live stream covers one prefill forward: start it on an empty cache")
        if self.max_kl is not None:
            raise CacheStateError(
                "max_kl is checked on the whole cache, but a live stream sends layer 0 before the next is computed: "
                "prefill first, then CacheSender(link, cache, max_kl=...).send()"
            )
        self._start()
        self._started = time.perf_counter()
        self.cache.layer_listeners.append(self._encode.put)
        return self

    def __exit__(self, exc_type, exc, _tb) -> None:
        self.cache.layer_listeners.remove(self._encode.put)
        self.report.prefill_ms = _ms(self._started)
        self._finish(exc)

    # ---- the two workers --------------------------------------------------------------------------------------

    def _start(self) -> None:
        self._threads = [
            threading.Thread(target=self._encoder, name="hf-scd-encode", daemon=True),
            threading.Thread(target=self._sender, name="hf-scd-send", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _finish(self, exc: BaseException | None) -> None:
        self._encode.put(None)
        self._threads[0].join()
        if exc is None and not self._errors:
            if self.report.layers != len(self.cache.layers):
                exc = CacheStateError(f"the forward wrote {self.report.layers} of {len(self.cache.layers)} layers")
            else:
                timings = {"encode_ms": self.report.encode_ms, "prefill_ms": self.report.prefill_ms}
                self._send.put(json_frame(Kind.END, {"layers": self.report.layers, **timings}))
        if exc is not None or self._errors:
            self._send.put(json_frame(Kind.ABORT, {"reason": describe(exc or self._errors[0])}))
        self._send.put(None)
        self._threads[1].join()
        if self._errors and exc is None:
            raise self._errors[0]

    def _encoder(self) -> None:
        with torch.inference_mode():
            while (index := self._encode.get()) is not None:
                if self._errors:
                    continue
                try:
                    self._send.put(self._encode_layer(index))
                except BaseException as error:  # handed to the producer's thread by _finish
                    self._errors.append(error)

    def _encode_layer(self, index: int) -> Frame:
        start = time.perf_counter()
        record = self.cache.record
        if self._plan is None:  # layer 0 was written: the record of this forward's tokens is complete
            if index != 0:
                raise CacheStateError(f"layer {index} was written before layer 0")
            self._plan = self.cache.artifacts.plan(self.point, self.cache.layers[0].keys.device)
            self._tokens = self._plan.layout(record)
            self._head = self.cache.payload_head(self.point, self.predicted_kl)
            self._send.put(Frame(Kind.OPEN, self._head.to_bytes(), tokens=self._head.num_tokens))
        if index != self.report.layers:
            raise CacheStateError(f"layer {index} was written where layer {self.report.layers} was due")
        written = [(layer.keys, layer.values) for layer in self.cache.layers[: index + 1]]
        patch_input = self.cache.recorder.patch_input(index) if index in self._plan.patch_layers else None
        codes = self._plan.encode_layer(index, written, self._tokens, patch_input, packed=not self.entropy)
        body = compress_layer(codes, self._plan, index) if self.entropy else layer_to_bytes(codes)
        self.report.layers += 1
        self.report.encode_ms += _ms(start)
        return Frame(Kind.LAYER, body, layer=index, tokens=self._head.num_tokens)

    def _sender(self) -> None:
        while (frame := self._send.get()) is not None:
            if self._errors and frame.kind is not Kind.ABORT:
                continue
            try:
                self._ship(frame)
            except BaseException as error:
                self._errors.append(error)

    def _ship(self, frame: Frame) -> None:
        before = self.link.bytes_sent
        self.link.send(frame)
        self.report.wire_bytes += self.link.bytes_sent - before


@dataclass
class TransferReport:
    """What one transfer did, for logs and metrics: bytes, time of each stage, when each layer arrived, and why the
    consumer prefilled instead, if it did."""

    outcome: Literal["transferred", "prefilled"] = "transferred"
    fallback_reason: str | None = None
    streaming: bool | None = None
    entropy: bool = False  # the codes came through the entropy stage
    operating_point: str | None = None
    predicted_kl: float | None = None  # the producer's fidelity check, if it made one
    tokens: int = 0
    raw_bytes: int = 0  # the prefix's K/V in bf16: what shipping the cache raw would cost
    wire_bytes: int = 0  # every frame byte received, headers included
    producer_encode_ms: float | None = None
    producer_prefill_ms: float | None = None
    wire_ms: float = 0.0  # from the first read to the last frame's arrival
    decode_ms: float = 0.0
    prefill_ms: float = 0.0  # the consumer's own prefill, on fallback
    total_ms: float = 0.0
    layer_arrival_ms: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Received:
    """A consumer's cache for `input_ids`, from the producer or its own prefill, and how it came to be."""

    cache: Cache
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    report: TransferReport


def receive_cache(
    link: Link,
    artifacts,
    model: torch.nn.Module,
    *,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    fallback: Literal["prefill", "raise"] = "prefill",
    strict: bool = False,
    max_positions: int | None = None,
    max_kv_bytes: int = DEFAULT_MAX_KV_BYTES,
) -> Received:
    """Receive a cache over `link` (streamed or one-shot, whichever the producer sends) within `timeout` seconds.

    `input_ids` (and `attention_mask`) are the prefix this consumer expects; a payload for another prefix is refused.
    With `fallback="prefill"` (which needs `input_ids`) any failure ends in the consumer prefilling them itself, the
    reason in the report; with `fallback="raise"` the typed error is raised. A failed transfer closes the link.
    `strict`, `max_positions` and `max_kv_bytes` are as for `SCDCache.from_payload`.
    """
    if fallback not in ("prefill", "raise"):
        raise ValueError(f"fallback must be 'prefill' or 'raise', got {fallback!r}")
    if fallback == "prefill" and input_ids is None:
        raise ValueError("fallback='prefill' needs the prefix the consumer expects: pass input_ids")
    report, start = TransferReport(), time.perf_counter()
    caps = _Caps.for_prefix(artifacts.shape, input_ids, max_kv_bytes)
    deadline = time.monotonic() + timeout
    try:
        cache, head = _receive(link, artifacts, model, report, deadline, caps, strict, max_positions)
        if input_ids is not None:
            _check_prefix(head, input_ids, attention_mask)
    except BaseException as error:
        link.close()
        if fallback == "raise" or not isinstance(error, Exception):
            raise
        if not isinstance(error, SCDError | OSError):
            warnings.warn(f"hf-scd transfer failed unexpectedly ({error!r}); prefilling locally", stacklevel=2)
        cache, head = prefill_instead(report, model, input_ids, attention_mask, describe(error)), None
    report.total_ms = _ms(start)
    ids = head.input_ids if head is not None else input_ids
    mask = cache.attention_mask if isinstance(cache, SCDCache) else attention_mask
    return Received(cache, ids, mask, report)


def prefill_instead(
    report: TransferReport,
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    reason: str,
) -> Cache:
    """The consumer's own cache of the prefix, `report` saying so and why: a failed transfer's fallback, or a
    transfer not made at all."""
    report.outcome, report.fallback_reason = "prefilled", reason
    start = time.perf_counter()
    with torch.inference_mode():
        cache = prefill(model, input_ids, attention_mask)
    report.prefill_ms = _ms(start)
    report.tokens = int(input_ids.numel() if attention_mask is None else attention_mask.sum())
    return cache


def _check_prefix(head: PayloadHead, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    same = head.input_ids.shape == input_ids.shape and torch.equal(head.attention_mask, mask.cpu())
    if not same or not torch.equal(head.input_ids[mask.cpu()], input_ids.cpu()[mask.cpu()]):
        raise CacheStateError("the producer sent the cache of another prefix than this request's")


@dataclass(frozen=True)
class _Caps:
    """The most body bytes the first frame may declare, before the head says how large each layer is."""

    head: int
    payload: int
    max_kv_bytes: int

    @classmethod
    def for_prefix(cls, shape, input_ids: torch.Tensor | None, max_kv_bytes: int) -> _Caps:
        if input_ids is None:  # unknown prefix: the consumer's K/V budget bounds it
            return cls(min(max_kv_bytes, MAX_HEAD_BYTES), max_kv_bytes, max_kv_bytes)
        # A known prefix: 9 bytes of ids, positions and mask per token; a payload never exceeds the raw bf16 K/V.
        raw = input_ids.numel() * shape.bf16_bytes_per_token()
        return cls(9 * input_ids.numel() + MAX_JSON_FRAME_BYTES, min(max_kv_bytes, raw + (1 << 20)), max_kv_bytes)


@torch.inference_mode()
def _receive(
    link, artifacts, model, report, deadline, caps: _Caps, strict, max_positions
) -> tuple[SCDCache, PayloadHead]:
    wire_start, received_before = time.perf_counter(), link.bytes_received
    max_kv_bytes = caps.max_kv_bytes
    first = link.receive(deadline, {Kind.OPEN: caps.head, Kind.PAYLOAD: caps.payload, **_ABORT})
    _raise_if_aborted(first)
    shape = artifacts.shape
    if first.kind is Kind.PAYLOAD:
        report.streaming, report.entropy = False, first.body.startswith(ENTROPY_MAGIC)
        report.wire_ms, report.layer_arrival_ms = _ms(wire_start), [_ms(wire_start)] * shape.num_layers
        decode_start = time.perf_counter()
        if report.entropy:
            payload = decompress_payload(first.body, artifacts, max_bytes=caps.payload)
        else:
            payload = SCDPayload.from_bytes(first.body)
        cache = SCDCache.from_payload(payload, artifacts, model, max_positions=max_positions, max_kv_bytes=max_kv_bytes)
        report.decode_ms = _ms(decode_start)
        head = payload.head
    else:
        report.streaming = True
        head = PayloadHead.from_bytes(first.body)
        with CacheRebuild(head, artifacts, model, max_positions=max_positions, max_kv_bytes=max_kv_bytes) as rebuild:
            for index in range(head.num_layers):
                cap = rebuild.layer_bytes(index) + LAYER_FRAME_OVERHEAD
                frame = link.receive(deadline, {Kind.LAYER: cap, **_ABORT})
                _raise_if_aborted(frame)
                report.layer_arrival_ms.append(_ms(wire_start))
                if frame.layer != index or frame.tokens != head.num_tokens:
                    raise TransferError(f"frame for layer {frame.layer} arrived where layer {index} was due")
                decode_start = time.perf_counter()
                # A coded frame may expand past its cap: a code takes at most 1.6x its packed bits in the stage
                codes = decompress_layer(frame.body, rebuild.plan, index, head.num_tokens, max_bytes=2 * cap)
                report.entropy |= frame.body.startswith(ENTROPY_MAGIC)
                rebuild.add_layer(index, codes)
                report.decode_ms += _ms(decode_start)
            end = link.receive(deadline, {Kind.END: MAX_JSON_FRAME_BYTES, **_ABORT})
            _raise_if_aborted(end)
            report.wire_ms = _ms(wire_start)
            timings = end.json()
            report.producer_encode_ms = float(timings.get("encode_ms", 0.0))
            report.producer_prefill_ms = float(timings.get("prefill_ms", 0.0))
            decode_start = time.perf_counter()
            cache = rebuild.finish()
            report.decode_ms += _ms(decode_start)
    report.operating_point, report.predicted_kl = head.operating_point, head.predicted_kl
    report.tokens = head.num_tokens
    report.raw_bytes = head.num_tokens * shape.bf16_bytes_per_token()
    report.wire_bytes = link.bytes_received - received_before
    return cache, head


_ABORT = {Kind.ABORT: MAX_JSON_FRAME_BYTES}


def _raise_if_aborted(frame: Frame) -> None:
    if frame.kind is Kind.ABORT:
        raise ProducerAbortedError(f"the producer gave up: {frame.json().get('reason', 'no reason given')}")


def send_request(link: Link, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
    """Ask the producer at the other end of `link` for the cache of a prefix (what a decode worker sends a prefill
    worker)."""
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    body = {"input_ids": input_ids.tolist(), "attention_mask": mask.tolist()}
    link.send(Frame(Kind.REQUEST, json.dumps(body).encode(), tokens=int(mask.sum())))


def read_request(link: Link, timeout: float, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prefix a consumer asked for: (input_ids, attention_mask), at most `max_tokens` tokens."""
    frame = link.receive(time.monotonic() + timeout, {Kind.REQUEST: 16 * max_tokens + 1024})
    body = frame.json()
    try:
        ids = torch.tensor(body["input_ids"], dtype=torch.long)
        mask = torch.tensor(body["attention_mask"], dtype=torch.long)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise TransferError(f"malformed request: {exc}") from exc
    if ids.ndim != 2 or ids.shape != mask.shape or ids.numel() > max_tokens or bool((ids < 0).any()):
        raise TransferError(f"a request must be (batch, seq) non-negative ids of at most {max_tokens} tokens")
    return ids, mask
