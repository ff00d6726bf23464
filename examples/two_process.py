"""A prefill process and a decode process on one machine, over TCP: the decode process asks for a prompt's cache,
the prefill process streams it layer by layer while it prefills, and the decode process continues generation.
Printed beside the decode process prefilling the same prompt itself.

    python examples/two_process.py [--key SECRET] [--no-streaming]

The prefill process is this script with `--role producer`; across machines, run it there with `--host 0.0.0.0`
(and a `--key`), and point the decode side's `--host` at it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

from hf_scd import SCDArtifacts, SCDCache
from hf_scd.compat import with_cache
from hf_scd.models import load_model
from hf_scd.prefill import prefill
from hf_scd.transport import CacheSender, TCPLink, TCPListener, read_request, receive_cache, send_request

ARTIFACTS = Path(__file__).resolve().parents[1] / "hub_artifacts" / "smollm2-135m-instruct"
QUESTION = "Summarise the text above in one sentence."


@torch.inference_mode()
def produce(args, model, artifacts) -> None:
    """The prefill process: answer requests until killed, streaming each cache while it is computed."""
    with TCPListener(args.host, args.port, key=args.key) as listener:
        print(f"prefill process listening on {listener.address}", flush=True)
        while True:
            with listener.accept() as link:
                input_ids, attention_mask = read_request(link, timeout=30, max_tokens=8192)
                cache = SCDCache(artifacts, model, point=args.point)
                if args.no_streaming:
                    model(input_ids, attention_mask=attention_mask, **with_cache(model, cache))
                    CacheSender(link, cache).send(streaming=False)
                else:
                    with CacheSender(link, cache):
                        model(input_ids, attention_mask=attention_mask, **with_cache(model, cache))
                cache.close()


@torch.inference_mode()
def consume(args, model, tokenizer, artifacts) -> None:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()[:6000]
    messages = [{"role": "user", "content": f"{text}\n\n{QUESTION}"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    prompt = prompt[:, -args.tokens :]
    prefix = prompt[:, :-1]

    start = time.perf_counter()
    with TCPLink.connect(args.host, args.port, key=args.key, timeout=120) as link:
        send_request(link, prefix)
        received = receive_cache(link, artifacts, model, input_ids=prefix, timeout=120)
    model.generate(prompt, **with_cache(model, received.cache), max_new_tokens=1, do_sample=False)
    ttft_transfer = time.perf_counter() - start

    start = time.perf_counter()
    local = prefill(model, prefix, None)
    model.generate(prompt, **with_cache(model, local), max_new_tokens=1, do_sample=False)
    ttft_local = time.perf_counter() - start

    report = received.report
    # Back to the shipped prefix (a negative crop drops that many tokens), to continue past the first token.
    received.cache.crop(prefix.shape[1] - received.cache.get_seq_length())
    shipped = model.generate(prompt, **with_cache(model, received.cache), max_new_tokens=32, do_sample=False)
    oracle = model.generate(prompt, max_new_tokens=32, do_sample=False)
    print(f"prompt: {prompt.shape[1]} tokens   outcome: {report.outcome}   streaming: {report.streaming}")
    if report.fallback_reason:
        print(f"fallback reason: {report.fallback_reason}")
    print(f"wire: {report.wire_bytes / 1e6:.2f} MB   raw bf16 K/V: {report.raw_bytes / 1e6:.2f} MB "
          f"({report.raw_bytes / max(report.wire_bytes, 1):.2f}x smaller)")  # fmt: skip
    print(f"producer prefill {report.producer_prefill_ms or 0:.0f} ms, encode {report.producer_encode_ms or 0:.0f} ms;"
          f" wire {report.wire_ms:.0f} ms; consumer decode {report.decode_ms:.0f} ms")  # fmt: skip
    print(f"time to first token: {ttft_transfer * 1e3:.0f} ms via transfer, {ttft_local * 1e3:.0f} ms prefilling here")
    print("greedy continuation (32 tokens) identical to the oracle:", shipped.tolist() == oracle.tolist())
    print("continuation:", repr(tokenizer.decode(shipped[0, prompt.shape[1] :], skip_special_tokens=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", choices=["both", "producer", "consumer"], default="both")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=47710)
    parser.add_argument("--key", type=lambda s: s.encode(), default=None, help="shared key: frames carry an HMAC")
    parser.add_argument("--point", default=None, help="operating point (default: the artifacts' default)")
    parser.add_argument("--tokens", type=int, default=1024, help="prompt length (its last tokens)")
    parser.add_argument("--no-streaming", action="store_true", help="send one payload after prefill instead")
    args = parser.parse_args()
    if args.role == "both":
        command = [sys.executable, __file__, "--role", "producer", "--host", args.host, "--port", str(args.port)]
        command += ["--key", args.key.decode()] if args.key else []
        command += ["--no-streaming"] if args.no_streaming else []
        command += ["--point", args.point] if args.point else []
        producer = subprocess.Popen(command)
        try:
            model, tokenizer = load_model("default")
            consume(args, model, tokenizer, SCDArtifacts.from_pretrained(ARTIFACTS))
        finally:
            producer.kill()
        return
    model, tokenizer = load_model("default")
    artifacts = SCDArtifacts.from_pretrained(ARTIFACTS)
    produce(args, model, artifacts) if args.role == "producer" else consume(args, model, tokenizer, artifacts)


if __name__ == "__main__":
    main()
