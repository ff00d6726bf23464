"""Time to first token across a real link: a prefill process and a decode process, over real sockets, on shaped links.

    hf-scd bench-ttft [--tokens 512,2048] [--links 0.1,1,10,0] [--repeats 5] [--scenarios stored,live]

Two scenarios. **Stored context**: the producer already holds the prefix's cache, encoded (a shared document, a
system prompt, an earlier turn); TTFT is wire + rebuild + first step. **Live disaggregation**: the producer
prefills now and streams; TTFT includes its prefill. Arms: the consumer's own prefill; raw bf16 K/V; KIVI-style int4;
SCD at two operating points; each transferring arm streamed layer by layer and one-shot. The same prompts (real
held-out text) for every arm, in one run.

The producer runs in one network namespace pinned to CPU 0, the consumer in another pinned to CPU 1, one torch thread
each: two one-core machines joined by a veth pair whose ends are shaped with `tbf` (MTU 1500, burst above it).
Every link's rate is measured first with a raw blob. Without namespaces the links are shaped in the application
(token bucket plus RTT) and the output says so. Rows are JSON; a table and a plot are printed and written.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from ..artifacts import SCDArtifacts
from ..cache import SCDCache
from ..compat import with_cache
from ..models import load_model
from ..prefill import prefill
from ..transport import CacheSender, Frame, Kind, Link, TCPLink, TCPListener, receive_cache
from ..transport.frames import json_frame
from .corpus import evaluation_texts
from .netshape import PRODUCER_IP, NamespaceShaper, TokenBucketLink
from .transfer import rebuild_cache

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "hub_artifacts" / "smollm2-135m-instruct"
PORT = 47731
BLOB_BYTES = 4 << 20
BIG = 1 << 34
AGREE_TOKENS = 16
JSON_CAP = {Kind.END: 1 << 16}


# ---- baseline wire formats (what shipping the producer's own K/V costs) -------------------------------------------


def _pack_bf16(x: torch.Tensor) -> bytes:
    return x.to(torch.bfloat16).contiguous().view(torch.uint8).numpy().tobytes()


def _unpack_bf16(blob: memoryview, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.frombuffer(bytearray(blob), dtype=torch.bfloat16).reshape(shape)


def _kivi_pack(x: torch.Tensor, per_channel: bool, group: int = 32) -> bytes:
    """KIVI int4 (keys per channel over 32-token groups, values per token over 32-channel groups): packed nibbles and
    an fp16 scale and minimum per group. x is (heads, seq, dim); seq is padded to the group by repeating the last."""
    x = x.float()
    if per_channel:
        pad = -x.shape[1] % group
        x = torch.cat([x, x[:, -1:].expand(-1, pad, -1)], 1) if pad else x
        grouped = x.reshape(x.shape[0], -1, group, x.shape[2])
        low, high = grouped.amin(2, keepdim=True), grouped.amax(2, keepdim=True)
    else:
        grouped = x.reshape(*x.shape[:2], -1, group)
        low, high = grouped.amin(-1, keepdim=True), grouped.amax(-1, keepdim=True)
    low, scale = low.half(), ((high - low) / 15).half()
    codes = ((grouped - low.float()) / scale.float().clamp(min=1e-8)).round().clamp(0, 15).to(torch.uint8).flatten()
    packed = codes[0::2] | (codes[1::2] << 4)
    return b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in (packed, scale, low))


def _kivi_unpack(blob: memoryview, shape: tuple[int, int, int], per_channel: bool, group: int = 32) -> torch.Tensor:
    heads, seq, dim = shape
    padded = seq + (-seq % group if per_channel else 0)
    count = heads * padded * dim
    groups = count // group
    raw = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    packed, scale, low = raw[: count // 2], raw[count // 2 : count // 2 + 2 * groups], raw[count // 2 + 2 * groups :]
    codes = torch.stack([packed & 15, packed >> 4], -1).flatten().float()
    scale, low = scale.view(torch.float16).float(), low.view(torch.float16).float()
    if per_channel:
        grouped = codes.reshape(heads, padded // group, group, dim)
        out = grouped * scale.reshape(heads, -1, 1, dim) + low.reshape(heads, -1, 1, dim)
        return out.reshape(heads, padded, dim)[:, :seq]
    grouped = codes.reshape(heads, seq, dim // group, group)
    return (grouped * scale.reshape(heads, seq, -1, 1) + low.reshape(heads, seq, -1, 1)).reshape(heads, seq, dim)


def encode_baseline(method: str, keys: torch.Tensor, values: torch.Tensor) -> bytes:
    """One layer's K/V (1, heads, seq, dim) in a baseline's wire format."""
    if method == "bf16":
        return _pack_bf16(keys) + _pack_bf16(values)
    key_blob = _kivi_pack(keys[0], per_channel=True)
    return len(key_blob).to_bytes(8, "little") + key_blob + _kivi_pack(values[0], per_channel=False)


def decode_baseline(method: str, body: bytes, shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    view = memoryview(body)
    if method == "bf16":
        half = len(body) // 2
        return _unpack_bf16(view[:half], (1, *shape)), _unpack_bf16(view[half:], (1, *shape))
    split = int.from_bytes(view[:8], "little") + 8
    keys = _kivi_unpack(view[8:split], shape, per_channel=True)
    values = _kivi_unpack(view[split:], shape, per_channel=False)
    return keys[None].to(torch.bfloat16), values[None].to(torch.bfloat16)


class ListenedCache(DynamicCache):
    """A DynamicCache that says when a layer is written, so a baseline can stream during prefill too."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.layer_listeners = []

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        stored = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        for listener in self.layer_listeners:
            listener(layer_idx)
        return stored


# ---- the producer process ---------------------------------------------------------------------------------------


class FrameTape(Link):
    """Records the frames a sender would send: a stored context keeps its encoded frames, ready to replay."""

    def __init__(self):
        super().__init__()
        self.tape: list[Frame] = []

    def send(self, frame: Frame) -> None:
        self.tape.append(frame)

    def _send(self, header, body, deadline):  # pragma: no cover - send() records instead
        raise NotImplementedError

    def _recv(self, size, deadline):  # pragma: no cover
        raise NotImplementedError

    def close(self) -> None:
        pass


class Producer:
    def __init__(self, model, artifacts: SCDArtifacts):
        self.model, self.artifacts = model, artifacts
        self.stored: dict[tuple, list[Frame]] = {}

    @torch.inference_mode()
    def answer(self, link: Link, request: dict) -> None:
        ids = torch.tensor(request["input_ids"])
        method, streaming, scenario = request["method"], request["streaming"], request["scenario"]
        if method == "blob":
            link.send(Frame(Kind.PAYLOAD, bytes(request["bytes"])))
            return
        timings = {"prefill_ms": 0.0, "encode_ms": 0.0}
        if scenario == "stored":
            key = (tuple(request["input_ids"][0]), method, request.get("point"), streaming, request.get("entropy"))
            if key not in self.stored:
                tape = FrameTape()
                self._produce(tape, ids, request, {})
                self.stored[key] = tape.tape
            for frame in self.stored[key]:
                link.send(frame)
        else:
            self._produce(link, ids, request, timings)
        link.send(json_frame(Kind.END, timings))

    def _produce(self, link: Link, ids, request: dict, timings: dict) -> None:
        method, point, streaming = request["method"], request.get("point"), request["streaming"]
        start = time.perf_counter()
        if method == "scd":
            cache = SCDCache(self.artifacts, self.model, point=point)
            if streaming:
                with CacheSender(link, cache, entropy=request.get("entropy", False)) as sender:
                    self.model(ids, **with_cache(self.model, cache))
                timings.update(prefill_ms=sender.report.prefill_ms, encode_ms=sender.report.encode_ms)
            else:
                self.model(ids, **with_cache(self.model, cache))
                timings["prefill_ms"] = (time.perf_counter() - start) * 1e3
                sender = CacheSender(link, cache, entropy=request.get("entropy", False))
                sender.send(streaming=False)
                timings["encode_ms"] = sender.report.encode_ms
            cache.close()
            return
        cache = ListenedCache(config=self.model.config)
        frames: queue.Queue[Frame | None] = queue.Queue()
        encode_ms = [0.0]

        def encode(index: int) -> None:
            layer_start = time.perf_counter()
            layer = cache.layers[index]
            frames.put(Frame(Kind.LAYER, encode_baseline(method, layer.keys, layer.values), layer=index))
            encode_ms[0] += (time.perf_counter() - layer_start) * 1e3

        sender = threading.Thread(target=lambda: [link.send(f) for f in iter(frames.get, None)], daemon=True)
        sender.start()
        shape = {"method": method, "layers": len(self.model.model.layers), "seq": ids.shape[1]}
        frames.put(json_frame(Kind.OPEN, shape))
        if streaming:
            cache.layer_listeners.append(encode)
        self.model(ids, **with_cache(self.model, cache))
        timings["prefill_ms"] = (time.perf_counter() - start) * 1e3
        if not streaming:
            for index in range(len(cache.layers)):
                encode(index)
        frames.put(None)
        sender.join()
        timings["encode_ms"] = encode_ms[0]


def serve(args) -> None:
    torch.set_num_threads(args.threads)
    model, _ = load_model("default")
    producer = Producer(model, SCDArtifacts.from_pretrained(ARTIFACTS))
    with TCPListener(args.host, args.port) as listener:
        print(f"producer listening on {listener.address}", flush=True)
        while True:
            link = listener.accept()
            try:
                request = link.receive(time.monotonic() + 60, {Kind.REQUEST: 1 << 22}).json()
                if request.get("gbps_app") is not None:  # the application-level shaper paces this link's sends
                    link = TokenBucketLink(link.sock, gbps=request["gbps_app"])
                    link.frames.received = 1
                producer.answer(link, request)
            finally:
                link.close()


# ---- the consumer process, which drives the benchmark -----------------------------------------------------------


def _request(args, body: dict, gbps_app: float | None) -> TCPLink:
    link = TCPLink.connect(args.host, args.port, timeout=120)
    link.send(Frame(Kind.REQUEST, json.dumps({**body, "gbps_app": gbps_app}).encode()))
    return link


def measure_link(args, gbps_app: float | None) -> float:
    """The link's rate in Gbit/s, from the time a raw blob takes to arrive."""
    rates = []
    for _ in range(3):
        start = time.perf_counter()
        with _request(args, {"method": "blob", "bytes": BLOB_BYTES, "scenario": "", "streaming": False,
                             "input_ids": [[0]]}, gbps_app) as link:  # fmt: skip
            link.receive(time.monotonic() + 600, {Kind.PAYLOAD: BLOB_BYTES})
        rates.append(BLOB_BYTES * 8 / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


@torch.inference_mode()
def receive_baseline(link: Link, model) -> tuple[DynamicCache, float]:
    deadline = time.monotonic() + 600
    head = link.receive(deadline, {Kind.OPEN: 1 << 16}).json()
    config = model.config
    shape = (config.num_key_value_heads, head["seq"], config.hidden_size // config.num_attention_heads)
    layers, decode_ms = [], 0.0
    for _ in range(head["layers"]):
        frame = link.receive(deadline, {Kind.LAYER: BIG})
        start = time.perf_counter()
        layers.append(decode_baseline(head["method"], frame.body, shape))
        decode_ms += (time.perf_counter() - start) * 1e3
    return rebuild_cache(model, layers), decode_ms


@torch.inference_mode()
def run_arm(args, model, artifacts, prompt, arm: dict, gbps_app: float | None, oracle) -> dict:
    prefix = prompt[:, :-1]
    start = time.perf_counter()
    parts = {"prefill_ms": 0.0, "encode_ms": 0.0, "wire_ms": 0.0, "decode_ms": 0.0}
    wire_bytes = 0
    if arm["method"] == "prefill":
        cache = prefill(model, prefix, None)
        parts["prefill_ms"] = (time.perf_counter() - start) * 1e3
        link = None
    else:
        body = {**arm, "input_ids": prefix.tolist()}
        link = _request(args, body, gbps_app)
        if arm["method"] == "scd":
            received = receive_cache(link, artifacts, model, input_ids=prefix, fallback="raise", timeout=600)
            cache, report = received.cache, received.report
            parts["decode_ms"], parts["wire_ms"] = report.decode_ms, report.wire_ms
        else:
            cache, parts["decode_ms"] = receive_baseline(link, model)
            parts["wire_ms"] = (time.perf_counter() - start) * 1e3 - parts["decode_ms"]
    step_start = time.perf_counter()
    first = model.generate(prompt, **with_cache(model, cache), max_new_tokens=1, do_sample=False)
    ttft_ms = (time.perf_counter() - start) * 1e3
    parts["first_step_ms"] = (time.perf_counter() - step_start) * 1e3
    if link is not None:
        wire_bytes = link.bytes_received
        timings = link.receive(time.monotonic() + 60, JSON_CAP).json()
        parts["prefill_ms"], parts["encode_ms"] = timings["prefill_ms"], timings["encode_ms"]
        link.close()
    cache.crop(prefix.shape[1] - cache.get_seq_length())
    more = model.generate(prompt, **with_cache(model, cache), max_new_tokens=AGREE_TOKENS, do_sample=False)
    new, expected = more[0, prompt.shape[1] :], oracle[0, prompt.shape[1] :]
    return {
        "ttft_ms": ttft_ms,
        "wire_bytes": wire_bytes,
        **parts,
        "first_token_match": bool(first[0, -1] == oracle[0, prompt.shape[1]]),
        "agree16": float((new == expected).float().mean()),
    }


def arms(points: list[str], methods: list[str] | None = None) -> list[dict]:
    """Every arm, or those whose names (`arm_name`) are in `methods`; SCD also through the entropy stage."""
    out = [{"method": "prefill", "streaming": False}]
    for streaming in (True, False):
        out += [{"method": "bf16", "streaming": streaming}, {"method": "kivi-int4", "streaming": streaming}]
        out += [{"method": "scd", "point": point, "streaming": streaming} for point in points]
        out += [{"method": "scd", "point": point, "streaming": streaming, "entropy": True} for point in points]
    return [arm for arm in out if methods is None or arm_name(arm) in methods]


def arm_name(arm: dict) -> str:
    if arm["method"] != "scd":
        return arm["method"]
    return f"scd-{arm['point']}" + ("+zstd" if arm.get("entropy") else "")


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank `q` quantile of a few timings (no interpolation: a reported p90 is a run that happened)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def drive(args) -> None:
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("default")
    artifacts = SCDArtifacts.from_pretrained(ARTIFACTS)
    text = "\n\n".join(evaluation_texts())
    all_ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    shaper = NamespaceShaper() if args.shaper == "tbf" else None
    rows = json.loads(Path(args.out).read_text()) if args.append and Path(args.out).exists() else []
    for tokens in args.tokens:
        prompt = all_ids[:, :tokens]  # the evaluation text from its start: the same prompt for every arm
        with torch.inference_mode():
            oracle = model.generate(prompt, max_new_tokens=AGREE_TOKENS, do_sample=False)
        for links_index, gbps in enumerate(args.links):
            if shaper is not None:
                shaper.set_rate(gbps or None)
            gbps_app = (gbps or None) if shaper is None else None
            measured = measure_link(args, gbps_app)
            print(f"# {tokens} tokens, link {gbps or 'unshaped'} Gbit/s: measured {measured:.3f} Gbit/s", flush=True)
            for scenario in args.scenarios:
                if scenario == "live" and tokens not in (args.live_tokens or args.tokens):
                    continue
                for arm in arms(args.points, args.methods):
                    if arm["method"] == "prefill" and (links_index or scenario != args.scenarios[0]):
                        continue  # the consumer's own prefill uses no link: measured once per prompt
                    request = {**arm, "scenario": scenario}
                    if scenario == "stored" or links_index == 0:  # warm-up (and, stored, encode once)
                        run_arm(args, model, artifacts, prompt, request, gbps_app, oracle)
                    runs = [run_arm(args, model, artifacts, prompt, request, gbps_app, oracle)
                            for _ in range(args.repeats)]  # fmt: skip
                    ttfts = [run["ttft_ms"] for run in runs]
                    row = {
                        "scenario": scenario if arm["method"] != "prefill" else "any",
                        "method": arm_name(arm),
                        "streaming": arm["streaming"],
                        "link_gbps": gbps if arm["method"] != "prefill" else None,
                        "measured_gbps": measured if arm["method"] != "prefill" else None,
                        "tokens": tokens,
                        "ttft_ms": statistics.median(ttfts),
                        "ttft_p90_ms": percentile(ttfts, 0.9),
                        **{k: statistics.median(run[k] for run in runs)
                           for k in ("wire_bytes", "prefill_ms", "encode_ms", "wire_ms", "decode_ms", "first_step_ms")},
                        "first_token_match": all(run["first_token_match"] for run in runs),
                        "agree16": min(run["agree16"] for run in runs),
                        "repeats": args.repeats,
                        "shaper": "tbf" if shaper is not None else "application token bucket",
                    }  # fmt: skip
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    Path(args.out).write_text(json.dumps(rows, indent=1))
    if shaper is not None:
        shaper.set_rate(None)


# ---- the driver: namespaces, the two processes, the report ------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", choices=["run", "producer", "consumer"], default="run")
    parser.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")], default=[512, 2048])
    parser.add_argument("--links", type=lambda s: [float(x) for x in s.split(",")], default=[0.1, 1.0, 10.0, 0.0],
                        help="Gbit/s; 0 is the unshaped link")  # fmt: skip
    parser.add_argument("--points", type=lambda s: s.split(","), default=["4x", "8x"])
    parser.add_argument("--scenarios", type=lambda s: s.split(","), default=["stored", "live"])
    parser.add_argument(
        "--methods",
        type=lambda s: s.split(","),
        default=None,
        help="only these arms, by name (prefill, bf16, kivi-int4, scd-8x, scd-8x+zstd, ...)",
    )
    parser.add_argument("--live-tokens", type=lambda s: [int(x) for x in s.split(",")], default=None,
                        help="prompt lengths for the live scenario (default: --tokens)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--shaper", choices=["tbf", "app"], default=None, help="default: tbf where namespaces work")
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int, default=PORT)
    parser.add_argument("--out", default="benchmarks/ttft_smollm2-135m-instruct.json")
    parser.add_argument("--project", action="store_true", help="print only the 8B/H100 projection")
    parser.add_argument("--append", action="store_true", help="add this run's rows to those already in --out")
    parser.add_argument("--report", action="store_true", help="only print the table and plot of the rows in --out")
    args = parser.parse_args(argv)
    if args.project:
        return print(projection())
    if args.report:
        return report(Path(args.out))
    if args.role == "producer":
        return serve(args)
    if args.role == "consumer":
        return drive(args)
    if importlib.util.find_spec("matplotlib") is None:  # the report plots; say so now, not after an hour's run
        raise SystemExit('hf-scd bench-ttft plots its results with matplotlib: pip install -e ".[pair]"')
    if args.shaper is None:
        args.shaper = "tbf" if NamespaceShaper.available() else "app"
    shapers = {"tbf": "tbf qdisc on a veth pair between namespaces", "app": "application token bucket, 0.2 ms RTT"}
    print(f"shaper: {shapers[args.shaper]}", flush=True)
    if args.shaper == "tbf":
        NamespaceShaper.create()
        host, listen = PRODUCER_IP, PRODUCER_IP
        producer_prefix, consumer_prefix = NamespaceShaper.prefix("producer"), NamespaceShaper.prefix("consumer")
    else:
        host, listen, producer_prefix, consumer_prefix = "127.0.0.1", "127.0.0.1", [], []
    common = [sys.executable, "-m", "hf_scd.eval.ttft", "--port", str(args.port), "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    cpus = os.sched_getaffinity(0)
    pin = (["taskset", "-c", str(min(cpus))], ["taskset", "-c", str(max(cpus))]) if len(cpus) > 1 else ([], [])
    producer = subprocess.Popen(producer_prefix + pin[0] + common + ["--role", "producer", "--host", listen], env=env)
    try:
        forwarded = [f"--{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in
                     (("tokens", args.tokens), ("live-tokens", args.live_tokens or args.tokens),
                      ("links", args.links), ("points", args.points),
                      ("scenarios", args.scenarios), ("repeats", args.repeats), ("shaper", args.shaper),
                      ("out", str(Path(args.out).resolve())))]  # fmt: skip
        forwarded += ["--append"] if args.append else []
        forwarded += [f"--methods={','.join(args.methods)}"] if args.methods else []
        subprocess.run(consumer_prefix + pin[1] + common + ["--role", "consumer", "--host", host] + forwarded,
                       env=env, check=True)  # fmt: skip
    finally:
        producer.kill()
        producer.wait()
        if args.shaper == "tbf":
            NamespaceShaper.remove()
    report(Path(args.out))


def summary(rows: list[dict]) -> str:
    """Median TTFT (ms) per scenario, prompt and link: the consumer's prefill, then each arm's better of streamed (s)
    and one-shot (o)."""
    methods = ["bf16", "kivi-int4", *sorted({r["method"] for r in rows if r["method"].startswith("scd-")})]
    prefill = {r["tokens"]: r["ttft_ms"] for r in rows if r["method"] == "prefill"}
    lines = [
        "| scenario | tokens | link Gbit/s | consumer prefill | " + " | ".join(methods) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(methods),
    ]
    keys = sorted({(r["scenario"], r["tokens"], r["link_gbps"]) for r in rows if r["method"] != "prefill"},
                  key=lambda k: (k[0] != "stored", k[1], k[2] or 1e9))  # fmt: skip
    for scenario, tokens, link in keys:
        cells = []
        for method in methods:
            arm = [r for r in rows if (r["scenario"], r["tokens"], r["link_gbps"], r["method"]) ==
                   (scenario, tokens, link, method)]  # fmt: skip
            best = min(arm, key=lambda r: r["ttft_ms"]) if arm else None
            cells.append(f"{best['ttft_ms']:.0f} ({'s' if best['streaming'] else 'o'})" if best else "-")
        first = f"{prefill[tokens]:.0f}" if tokens in prefill else "-"  # a run with --methods may leave it out
        lines.append(f"| {scenario} | {tokens} | {link or 'unshaped'} | {first} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(path: Path) -> None:
    rows = json.loads(path.read_text())
    text = "\n\n".join([summary(rows), table(rows), projection()])
    path.with_suffix(".md").write_text(f"# TTFT benchmark (`hf-scd bench-ttft`)\n\n{text}\n")
    print(text)
    from .plot import ttft_plot

    ttft_plot(rows, path.with_suffix(".png"))


# The projection's inputs: hf_scd/kernels/RESULTS.md (one H100, Llama-3-8B shape, 8K tokens) and stated assumptions.
PROJECTION = {
    "tokens": 8192,
    "layers": 32,
    "raw_bytes_per_token": 2 * 32 * 8 * 128 * 2,  # Llama-3-8B: 32 layers, 8 KV heads of 128, K and V, bf16
    "prefill_ms": 260.0,  # RESULTS.md: prefill of 8K tokens, same run as the kernel timings
    "scd_encode_ms": 8.96,  # RESULTS.md: encode kernel, all layers, 8K tokens (a ~4x point)
    "scd_decode_ms": 8.22,  # RESULTS.md: decode kernel, all layers, 8K tokens
    "first_step_ms": 8.0,  # assumed: one decode step of an 8B model at batch 1 (weights read once, ~3 TB/s)
    "link_efficiency": 0.9,  # assumed: share of the nominal rate TCP achieves
}
PROJECTED_ARMS = {  # ratio vs bf16, encode ms, decode ms at 8K tokens
    "bf16": (1.0, 0.0, 0.0),
    "kivi-int4": (3.2, 8.96, 8.22),  # assumed: KIVI kernels as fast as SCD's (none measured here)
    "scd-4x": (4.0, 8.96, 8.22),
    "scd-8x": (8.0, 8.96, 8.22),  # assumed: the 8x point codes as fast as the ~4x point measured
}


def pipelined_ms(stages: list[float], layers: int) -> float:
    """Layer-wise streaming as a pipeline of per-layer stages: one layer through all of them, then the slowest
    stage for each further layer."""
    per_layer = [stage / layers for stage in stages]
    return sum(per_layer) + (layers - 1) * max(per_layer)


def projection() -> str:
    """A labelled model, not a measurement: the same arms on an 8B-shaped cache at 25 and 200 Gbit/s."""
    p = PROJECTION
    raw = p["tokens"] * p["raw_bytes_per_token"]
    lines = [
        f"Projection (a model, not a measurement): {p['tokens']} tokens of a Llama-3-8B-shaped cache ({raw / 1e9:.2f} "
        "GB in bf16) on H100-class GPUs. Inputs: " + ", ".join(f"{k}={v}" for k, v in p.items()),
        "",
        "| scenario | link Gbit/s | method | one-shot TTFT ms | streamed TTFT ms |",
        "|---|---:|---|---:|---:|",
    ]
    for scenario in ("stored", "live"):
        lines.append(f"| {scenario} | - | prefill | {p['prefill_ms'] + p['first_step_ms']:.0f} | - |")
        for gbps in (25, 200):
            rate = gbps * 1e9 / 8 * p["link_efficiency"]
            for method, (ratio, encode_ms, decode_ms) in PROJECTED_ARMS.items():
                wire_ms = raw / ratio / rate * 1e3
                stages = [wire_ms, decode_ms]
                if scenario == "live":
                    stages = [p["prefill_ms"], encode_ms, *stages]
                one_shot = sum(stages) + p["first_step_ms"]
                streamed = pipelined_ms(stages, p["layers"]) + p["first_step_ms"]
                lines.append(f"| {scenario} | {gbps} | {method} | {one_shot:.0f} | {streamed:.0f} |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    lines = [
        "| scenario | tokens | link Gbit/s (measured) | method | streamed | TTFT ms (p90) | wire MB | prefill | encode"
        " | wire | decode | first step | 1st token | agree16 |",
        "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        link = "-" if r["link_gbps"] is None else f"{r['link_gbps'] or 'unshaped'} ({r['measured_gbps']:.2f})"
        lines.append(
            f"| {r['scenario']} | {r['tokens']} | {link} | {r['method']} | {'yes' if r['streaming'] else 'no'} | "
            f"{r['ttft_ms']:.0f} ({r['ttft_p90_ms']:.0f}) | {r['wire_bytes'] / 1e6:.2f} | {r['prefill_ms']:.0f} | "
            f"{r['encode_ms']:.0f} | {r['wire_ms']:.0f} | {r['decode_ms']:.0f} | {r['first_step_ms']:.0f} | "
            f"{'yes' if r['first_token_match'] else 'no'} | {r['agree16']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
