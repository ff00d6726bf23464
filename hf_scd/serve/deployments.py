"""The three deployments: `Prefill` (the producer model: prompt -> cache -> frames), `Decode` (one per route: frames ->
cache -> tokens, or its own prefill when the transfer fails or does not pay) and `Ingress` (the HTTP API), joined by
`build_app`. Serve routes requests, scales replicas and restarts dead ones; hf-scd only moves the cache.
"""

import asyncio
import os
import threading
import time
from dataclasses import asdict

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve import metrics
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ..artifacts import SCDArtifacts
from ..cache import SCDCache
from ..compat import with_cache
from ..errors import ArtifactMismatchError, RequestError, describe
from ..models import load_model
from ..transport import CacheSender, ChunkLink, LinkPolicy, TCPLink, TransferReport, receive_cache
from ..transport.frames import Kind, json_frame
from ..transport.stream import prefill_instead
from .channels import CHANNELS, PrefillJob, Ticket
from .config import AppConfig, Resources
from .openai import ChatRequest, CompletionRequest, Generation, Reply, error_body, generation, sse, usage

TTFT_BUCKETS_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]


def _in_thread(fn, *args, **kwargs) -> asyncio.Future:
    """Blocking work (a forward, a transfer) on a thread of its own: on a shared pool, requests waiting for their
    cache could hold every thread while the work they wait on queues behind them."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result, error) -> None:
        if not future.cancelled():
            future.set_exception(error) if error is not None else future.set_result(result)

    def run() -> None:
        try:
            result = fn(*args, **kwargs)
        except BaseException as error:
            loop.call_soon_threadsafe(settle, None, error)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=run, name=f"hf-scd-{getattr(fn, '__name__', 'work')}", daemon=True).start()
    return future


def _pin(cpus: list[int]) -> None:
    """Pin every thread of this process, and so every thread it starts later, to `cpus`."""
    for thread in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(thread), cpus)


def _load(name: str, resources: Resources):
    """(model, tokenizer) on this replica's device, with torch's threads and the process's CPUs as configured."""
    if resources.cpu_affinity:
        _pin(resources.cpu_affinity)
    if resources.torch_threads:
        torch.set_num_threads(resources.torch_threads)
    model, tokenizer = load_model(name)
    if resources.num_gpus > 0 and torch.cuda.is_available():
        model.to("cuda")
    return model, tokenizer


@serve.deployment
class Prefill:
    """The producer: prefills a prompt and streams its cache, layer by layer as the forward writes it, on whichever
    channel the decode replica opened. Holds the artifacts of every route, since each route's consumer expects the
    codes of its own artifacts."""

    def __init__(self, config: AppConfig):
        self.config = config
        self.model, _ = _load(config.producer, config.prefill)
        self.artifacts = {route.name: SCDArtifacts.from_pretrained(route.artifacts) for route in config.routes}
        for name, artifacts in self.artifacts.items():
            if artifacts.identify(self.model)[1] != "producer":
                raise ArtifactMismatchError(
                    f"route {name!r}: {artifacts.describe()} do not encode on {config.producer}"
                )
        self.key = config.transport.key()
        self.active = self.layers_streamed = 0
        # One forward at a time: concurrent forwards on a replica only share its cores, so all of them finish late;
        # in turn, the first finishes first. More throughput comes from more replicas.
        self.forward_lock = threading.Lock()

    async def stream(self, job: PrefillJob):
        """The job's frames, yielded as they are made (the object-store channel)."""
        loop = asyncio.get_running_loop()
        frames: asyncio.Queue[bytes | None] = asyncio.Queue()
        link = ChunkLink(lambda frame: loop.call_soon_threadsafe(frames.put_nowait, frame), key=self.key)
        producing = _in_thread(self._produce, job, link)
        while (frame := await frames.get()) is not None:
            yield frame
        await producing

    async def send_to(self, job: PrefillJob, ticket: Ticket) -> dict:
        """Connect to the decode replica that issued `ticket` and stream the job's frames there (the TCP channel)."""
        timeout = self.config.transport.timeout_s
        link = await _in_thread(TCPLink.connect, ticket.host, ticket.port, key=self.key, timeout=timeout)
        return asdict(await _in_thread(self._produce, job, link))

    def stats(self) -> dict:
        """This replica's process and progress: requests in flight and layers streamed so far."""
        return {"pid": os.getpid(), "active": self.active, "layers_streamed": self.layers_streamed}

    def _count_layer(self, _index: int) -> None:
        self.layers_streamed += 1

    def _produce(self, job: PrefillJob, link):
        self.active += 1
        try:
            try:
                artifacts = self.artifacts[job.route]
                if not 1 <= len(job.input_ids) <= self.config.max_prompt_tokens:
                    raise RequestError(f"a prefill job holds 1 to {self.config.max_prompt_tokens} tokens")
                cache = SCDCache(artifacts, self.model, point=job.point)
            except Exception as error:  # before the stream began: say why, rather than only hang up
                link.send(json_frame(Kind.ABORT, {"reason": describe(error)}))
                raise
            cache.layer_listeners.append(self._count_layer)
            ids = torch.tensor([job.input_ids], device=self.model.device)
            try:
                entropy = self.config.transport.entropy
                with self.forward_lock, torch.inference_mode(), CacheSender(link, cache, entropy=entropy) as sender:
                    self.model(ids, **with_cache(self.model, cache))
            finally:
                cache.close()
            return sender.report
        finally:
            self.active -= 1
            link.close()


class _TokenQueue(BaseStreamer):
    """Hands each new token from `generate`'s thread to the replica's event loop; `None` marks the end."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tokens: asyncio.Queue):
        self.loop, self.tokens, self.prompt_seen = loop, tokens, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() hands the streamer the prompt first
            self.prompt_seen = True
            return
        self.loop.call_soon_threadsafe(self.tokens.put_nowait, value.reshape(-1).tolist())

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.tokens.put_nowait, None)


class _Stopped(StoppingCriteria):
    """Ends generation once the replica has seen a stop string in the text."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _Metrics:
    """The figures of every response's usage block, exported through Serve's metrics API (Prometheus)."""

    STAGES = ("encode", "producer_prefill", "transfer", "decode", "prefill", "ttft")

    def __init__(self, route: str):
        self.tags = {"route": route}
        self.requests = metrics.Counter(
            "hf_scd_requests", "Requests answered, by how their cache came to be.", tag_keys=("route", "outcome")
        )
        self.wire_bytes = metrics.Counter("hf_scd_wire_bytes", "Cache bytes received.", tag_keys=("route",))
        self.bf16_bytes = metrics.Counter(
            "hf_scd_bf16_bytes", "What the same caches would have cost in bf16.", tag_keys=("route",)
        )
        self.stage_ms = metrics.Histogram(
            "hf_scd_stage_ms", "Time of each stage of a request's cache.", TTFT_BUCKETS_MS, tag_keys=("route", "stage")
        )

    def record(self, transfer: dict) -> None:
        self.requests.inc(tags=self.tags | {"outcome": transfer["outcome"]})
        for counter, value in ((self.wire_bytes, transfer["wire_bytes"]), (self.bf16_bytes, transfer["bf16_bytes"])):
            if value:  # Ray's counters take only positive increments
                counter.inc(value, tags=self.tags)
        for stage in self.STAGES:
            if transfer.get(f"{stage}_ms"):
                self.stage_ms.observe(transfer[f"{stage}_ms"], tags=self.tags | {"stage": stage})


@serve.deployment
class Decode:
    """The consumer of one route: rebuilds each request's cache from the prefill replica's frames (or prefills
    itself, when the link policy says the transfer does not pay or the transfer fails) and generates from it,
    yielding text as it is decoded."""

    def __init__(self, config: AppConfig, route: str, prefill_handle):
        self.route = config.route(route)
        self.config = config
        self.model, self.tokenizer = _load(self.route.model, self.route.decode)
        self.artifacts = SCDArtifacts.from_pretrained(self.route.artifacts)
        self.artifacts.identify(self.model)  # the wrong consumer for these artifacts fails here, not per request
        self.point = self.artifacts.point(self.route.point or self.artifacts.config.default_point)
        self.channel = CHANNELS[config.transport.channel](prefill_handle, config.transport)
        policy = config.policy
        self.policy = LinkPolicy(
            wire_bytes_per_token=self.artifacts.shape.bf16_bytes_per_token() / self.point.ratio_vs_bf16,
            link_bytes_per_s=policy.link_gbit_s * 1e9 / 8,
            decode_tokens_per_s=policy.decode_tokens_per_s,
            prefill_tokens_per_s=policy.prefill_tokens_per_s,
            enabled=policy.enabled,
            fixed_ms=policy.fixed_ms,
        )
        self.metrics = _Metrics(self.route.name)
        eos = self.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    async def generate(self, request: Generation):
        """Events: {"prompt_tokens"} once the request is accepted, {"text"} as it is decoded, then {"finish_reason",
        "completion_tokens", "transfer"}."""
        start = time.perf_counter()
        ids = self._prompt_ids(request)
        yield {"prompt_tokens": ids.shape[1]}
        cache, report = await self._cache(ids, request.kv_transfer)
        transfer = self._transfer_usage(report, ids.shape[1] - 1)

        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue[list[int] | None] = asyncio.Queue()
        stopped = threading.Event()
        generating = _in_thread(self._generate, ids, cache, request, _TokenQueue(loop, tokens), stopped)
        generated: list[int] = []
        sent = ""
        hold = max((len(stop) for stop in request.stops), default=1) - 1  # text that may yet become a stop string
        while (new := await tokens.get()) is not None:
            if not generated:
                transfer["ttft_ms"] = (time.perf_counter() - start) * 1e3
            generated += new
            if stopped.is_set():
                continue
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            cut = min((i for i in (text.find(stop) for stop in request.stops) if i >= 0), default=-1)
            if cut >= 0:
                stopped.set()
                text = text[:cut]
            elif text.endswith("\ufffd"):  # a character split across tokens: wait for the rest of it
                continue
            else:
                text = text[: len(text) - hold] if hold else text
            if len(text) > len(sent):
                yield {"text": text[len(sent) :]}
                sent = text
        await generating
        if not stopped.is_set():
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            if len(text) > len(sent):
                yield {"text": text[len(sent) :]}
        finish = "stop" if stopped.is_set() or (generated and generated[-1] in self.eos) else "length"
        self.metrics.record(transfer)
        yield {"finish_reason": finish, "completion_tokens": len(generated), "transfer": transfer}

    def _prompt_ids(self, request: Generation) -> torch.Tensor:
        if request.messages is not None:
            if not self.tokenizer.chat_template:
                raise RequestError(f"{self.route.name} has no chat template: use /v1/completions")
            encoded = self.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=True)
            ids = encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded
        elif request.prompt is not None:
            ids = self.tokenizer(request.prompt)["input_ids"]
        else:
            ids = request.prompt_ids
            vocab = self.model.config.vocab_size
            if any(not 0 <= token < vocab for token in ids):
                raise RequestError(f"prompt token ids must lie in [0, {vocab})")
        if not ids:
            raise RequestError("the prompt is empty")
        if len(ids) > self.config.max_prompt_tokens:
            raise RequestError(
                f"the prompt has {len(ids)} tokens; this server takes at most {self.config.max_prompt_tokens}"
            )
        return torch.tensor([ids], device=self.model.device)

    async def _cache(self, ids: torch.Tensor, kv_transfer: str):
        """The cache of every prompt token but the last (generate() feeds that one), and how it came to be."""
        prefix = ids[:, :-1]
        tokens = prefix.shape[1]
        if tokens == 0:
            return None, TransferReport(outcome="prefilled", fallback_reason="the prompt is one token: no cache")
        choice = {"always": "transfer", "never": "prefill"}.get(kv_transfer) or self.policy.choose(tokens)
        if choice == "prefill":
            reason = "asked for no transfer" if kv_transfer == "never" else "the link policy predicts prefill sooner"
            report = TransferReport()
            cache = await _in_thread(prefill_instead, report, self.model, prefix, None, reason)
            report.total_ms = report.prefill_ms
            return cache, report
        job = PrefillJob(self.route.name, prefix[0].tolist(), self.point.name)
        link, call = self.channel.open(job)
        timeout = self.config.transport.timeout_s
        received = await _in_thread(receive_cache, link, self.artifacts, self.model, input_ids=prefix, timeout=timeout)
        if received.report.outcome != "transferred":
            call.cancel()
        self.policy.observe(received.report)
        return received.cache, received.report

    def _transfer_usage(self, report: TransferReport, tokens: int) -> dict:
        raw = tokens * self.artifacts.shape.bf16_bytes_per_token()
        return {
            "outcome": report.outcome,
            "fallback_reason": report.fallback_reason,
            "channel": self.channel.name,
            "entropy": report.entropy,
            "operating_point": report.operating_point if report.outcome == "transferred" else None,
            "tokens": tokens,
            "wire_bytes": report.wire_bytes,
            "bf16_bytes": raw,
            "ratio_vs_bf16": raw / report.wire_bytes if report.wire_bytes and report.outcome == "transferred" else None,
            "encode_ms": report.producer_encode_ms,
            "producer_prefill_ms": report.producer_prefill_ms,
            "transfer_ms": report.wire_ms,
            "decode_ms": report.decode_ms,
            "prefill_ms": report.prefill_ms,
            "cache_ms": report.total_ms,
        }

    @torch.inference_mode()
    def _generate(self, ids, cache, request: Generation, streamer: _TokenQueue, stopped: threading.Event) -> None:
        sampling = {"do_sample": True, "temperature": request.temperature, "top_p": request.top_p}
        options = sampling if request.temperature > 0 else {"do_sample": False, "temperature": None, "top_p": None}
        try:
            self.model.generate(
                ids,
                **(with_cache(self.model, cache) if cache is not None else {}),
                max_new_tokens=request.max_new_tokens,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([_Stopped(stopped)]),
                pad_token_id=self.tokenizer.pad_token_id or next(iter(self.eos), 0),
                **options,
            )
        except BaseException:
            streamer.end()
            raise


api = FastAPI(title="hf-scd", description="OpenAI-style completions over disaggregated prefill and decode.")


def _unwrap(error: BaseException) -> BaseException:
    """The error a replica raised, out of Ray's wrapper."""
    return getattr(error, "cause", None) or error


@api.exception_handler(RequestValidationError)
async def _invalid(_request: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0]
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    return JSONResponse(error_body(f"{where}: {message}" if where else message, "invalid_request"), 400)


@api.exception_handler(RequestError)
async def _refused(_request: Request, error: RequestError) -> JSONResponse:
    return JSONResponse(error_body(str(error), error.code), error.status)


@serve.deployment
@serve.ingress(api)
class Ingress:
    """The HTTP API: validates requests, sends each to the decode deployment of its `model`, and answers in
    OpenAI's shapes, whole or as server-sent events."""

    def __init__(self, config: AppConfig, decoders: dict):
        self.config, self.decoders = config, decoders

    @api.get("/v1/models")
    def models(self) -> dict:
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "owned_by": "hf-scd"} for name in self.decoders],
        }

    @api.get("/health")
    def health(self) -> dict:
        return {"status": "ok"}

    @api.post("/v1/completions")
    async def completions(self, request: CompletionRequest):
        return await self._answer(request, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: ChatRequest):
        return await self._answer(request, chat=True)

    async def _answer(self, request: CompletionRequest | ChatRequest, chat: bool):
        decoder = self.decoders.get(request.model)
        if decoder is None:
            known = ", ".join(self.decoders)
            raise RequestError(f"no model {request.model!r} here; this server has: {known}", 404, "model_not_found")
        events = decoder.options(stream=True, method_name="generate").remote(
            generation(request, self.config.max_new_tokens)
        )
        try:
            first = await events.__anext__()
        except Exception as error:
            cause = _unwrap(error)
            if isinstance(cause, RequestError):
                raise cause from None
            raise
        reply = Reply(request.model, chat)
        if request.stream:
            include_usage = request.stream_options is not None and request.stream_options.include_usage
            return StreamingResponse(self._stream(reply, first, events, include_usage), media_type="text/event-stream")
        text, end = [], {}
        async for event in events:
            text.append(event.get("text", ""))
            end = event
        return reply.whole("".join(text), end["finish_reason"], self._usage(first, end))

    async def _stream(self, reply: Reply, first: dict, events, include_usage: bool):
        try:
            if reply.chat:
                yield reply.chunk(first=True)
            async for event in events:
                if "text" in event:
                    yield reply.chunk(event["text"])
                else:
                    yield reply.chunk(finish_reason=event["finish_reason"])
                    if include_usage:
                        yield reply.usage_chunk(self._usage(first, event))
        except Exception as error:  # the status line is gone: say it in the stream
            yield sse(error_body(describe(_unwrap(error)), "generation_failed", "server_error"))
        yield sse("[DONE]")

    @staticmethod
    def _usage(first: dict, end: dict) -> dict:
        return usage(first["prompt_tokens"], end["completion_tokens"], end["transfer"])


def build_app(args: AppConfig):
    """The Serve application: `serve run hf_scd.serve:build_app`, or a config file whose `args` are an `AppConfig`."""
    config = args if isinstance(args, AppConfig) else AppConfig.model_validate(args)
    prefill_handle = Prefill.options(**config.prefill.deployment_options("Prefill")).bind(config)
    decoders = {
        route.name: Decode.options(**route.decode.deployment_options(f"Decode-{index}")).bind(
            config, route.name, prefill_handle
        )
        for index, route in enumerate(config.routes)
    }
    return Ingress.options(**config.ingress.deployment_options("Ingress")).bind(config, decoders)
