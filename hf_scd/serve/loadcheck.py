"""A bounded load check of the Serve app (a benchmark, not a test): 1, 4 and 8 concurrent request streams, a fixed
number of requests each, against SCD transfer over each channel and against decode-side prefill, on one cluster.

    python -m hf_scd.serve.loadcheck --concurrency 1 4 8 --requests 16 --prompt-tokens 1024 --max-tokens 16

It starts a local Ray cluster (or joins `--address`), deploys the app once per channel, and streams every request
(`stream: true`), so time to first token is when the first text arrives. Arms differ only in the request's
`kv_transfer`: "always" for SCD, "never" for the decode replica prefilling itself. Prompts are real held-out text.
Prints a table; `--json` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from ..eval.ttft import percentile
from .config import AppConfig


@dataclass
class Row:
    arm: str
    concurrency: int
    requests: int
    seconds: float
    requests_per_s: float
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p90_ms: float
    fallbacks: int
    wire_mb: float
    bf16_mb: float


def _stream_one(url: str, body: dict) -> tuple[float, dict]:
    """(time to first text in ms, the usage block) of one streamed request."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    start, first, usage = time.perf_counter(), None, None
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: ") :])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if first is None and event["choices"] and event["choices"][0].get("text"):
                first = time.perf_counter()
            usage = event.get("usage") or usage
    return ((first or time.perf_counter()) - start) * 1e3, usage


@dataclass(frozen=True)
class Load:
    """What every request of the check sends: to `url`, for `model`, one of `prompts`, `max_tokens` new tokens."""

    url: str
    model: str
    prompts: list[str]
    max_tokens: int


def run_arm(load: Load, arm: str, kv_transfer: str, concurrency: int, count: int) -> Row:
    """`count` requests of one arm, `concurrency` streams at a time."""
    bodies = [
        {
            "model": load.model,
            "prompt": load.prompts[i % len(load.prompts)],
            "max_tokens": load.max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "kv_transfer": kv_transfer,
        }
        for i in range(count)
    ]
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda body: _stream_one(load.url, body), bodies))
    seconds = time.perf_counter() - start
    ttfts = [ttft for ttft, _ in results]
    usages = [usage for _, usage in results]
    transfers = [usage["hf_scd"] for usage in usages]
    return Row(
        arm=arm,
        concurrency=concurrency,
        requests=count,
        seconds=seconds,
        requests_per_s=count / seconds,
        tokens_per_s=sum(usage["completion_tokens"] for usage in usages) / seconds,
        ttft_p50_ms=statistics.median(ttfts),
        ttft_p90_ms=percentile(ttfts, 0.9),
        fallbacks=sum(t["outcome"] != "transferred" for t in transfers) if kv_transfer != "never" else 0,
        wire_mb=sum(t["wire_bytes"] for t in transfers) / count / 1e6,
        bf16_mb=sum(t["bf16_bytes"] for t in transfers) / count / 1e6,
    )


def format_table(rows: list[Row]) -> str:
    head = "| arm | streams | requests | req/s | tok/s | TTFT p50 ms | TTFT p90 ms | fallbacks | wire MB | bf16 MB |"
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r.arm} | {r.concurrency} | {r.requests} | {r.requests_per_s:.2f} | {r.tokens_per_s:.1f} | "
            f"{r.ttft_p50_ms:.0f} | {r.ttft_p90_ms:.0f} | {r.fallbacks} | {r.wire_mb:.2f} | {r.bf16_mb:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hf_scd.serve.loadcheck", description=__doc__)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--requests", type=int, default=16, help="requests per arm and concurrency")
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--channels", nargs="+", default=["tcp", "object_store"], choices=["tcp", "object_store"])
    parser.add_argument("--point", help="operating point (default: the artifacts' default)")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch threads per replica")
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="leave replicas unpinned (default: prefill on CPU 0, decode on CPU 1, two one-core machines)",
    )
    parser.add_argument("--address", help="an existing Ray cluster; default: start one on this machine")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)

    os.environ.setdefault("RAY_enable_worker_prestart", "0")
    import ray
    from ray import serve

    from ..eval.corpus import evaluation_texts
    from ..models import load_model
    from .deployments import build_app

    tokenizer = load_model("default")[1]
    texts = [text for text in evaluation_texts() if len(tokenizer(text)["input_ids"]) >= args.prompt_tokens]
    if not texts:
        raise SystemExit(f"no held-out text has {args.prompt_tokens} tokens")
    prompts = [tokenizer.decode(tokenizer(text)["input_ids"][: args.prompt_tokens]) for text in texts]

    ray.init(address=args.address, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    url = f"http://127.0.0.1:{args.port}/v1/completions"
    replica = {"num_cpus": 0, "torch_threads": args.torch_threads, "max_ongoing_requests": max(args.concurrency)}
    # Two one-core machines: the prefill replica on the first CPU, the decode replica on the second.
    pinned = args.pin and len(os.sched_getaffinity(0)) >= 2
    prefill_cpus, decode_cpus = ([0], [1]) if pinned else (None, None)
    rows: list[Row] = []
    try:
        for index, channel in enumerate(args.channels):
            decode = replica | {"cpu_affinity": decode_cpus}
            route = AppConfig().routes[0].model_dump() | {"decode": decode, "point": args.point}
            config = AppConfig.model_validate(
                {
                    "routes": [route],
                    "prefill": replica | {"cpu_affinity": prefill_cpus},
                    "ingress": {"num_cpus": 0, "max_ongoing_requests": 4 * max(args.concurrency)},
                    "transport": {"channel": channel, "timeout_s": 120},
                    "max_prompt_tokens": args.prompt_tokens + 64,
                    "max_new_tokens": args.max_tokens,
                }
            )
            serve.run(build_app(config), name="loadcheck", route_prefix="/")
            load = Load(url, route["name"], prompts, args.max_tokens)
            arms = [(f"scd-{channel}", "always")] + ([("decode-prefill", "never")] if index == 0 else [])
            for arm, kv_transfer in arms:
                run_arm(load, arm, kv_transfer, 1, 2)  # warm-up
                for concurrency in args.concurrency:
                    row = run_arm(load, arm, kv_transfer, concurrency, args.requests)
                    rows.append(row)
                    print(format_table([row]).splitlines()[-1], flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    print()
    placement = ", prefill on CPU 0, decode on CPU 1" if pinned else ", unpinned"
    threads = f"{args.torch_threads} torch thread(s) a replica{placement}"
    print(f"{args.prompt_tokens}-token prompts, {args.max_tokens} new tokens, {threads}")
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps([asdict(row) for row in rows], indent=2) + "\n")


if __name__ == "__main__":
    main()
