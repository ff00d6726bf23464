"""The same transfer over torch.distributed point-to-point: two ranks of one gloo process group (NCCL on GPUs), the
prefill rank streaming its cache to the decode rank as uint8 tensors.

    python examples/two_process_dist.py            # starts both ranks on this machine
    python examples/two_process_dist.py --role producer --init tcp://HOST:PORT   # rank 0, elsewhere
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from hf_scd import SCDArtifacts, SCDCache
from hf_scd.compat import with_cache
from hf_scd.models import load_model
from hf_scd.transport import CacheSender, DistLink, read_request, receive_cache, send_request

ARTIFACTS = Path(__file__).resolve().parents[1] / "hub_artifacts" / "smollm2-135m-instruct"


@torch.inference_mode()
def produce(model, artifacts) -> None:
    """Rank 0: answer one request, streaming the cache while it prefills."""
    link = DistLink(peer=1)
    input_ids, attention_mask = read_request(link, timeout=300, max_tokens=8192)
    cache = SCDCache(artifacts, model)
    with CacheSender(link, cache):
        model(input_ids, attention_mask=attention_mask, **with_cache(model, cache))


@torch.inference_mode()
def consume(model, tokenizer, artifacts) -> None:
    """Rank 1: ask for a prompt's cache, rebuild it, continue."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()[:3000]
    prompt = tokenizer(text, return_tensors="pt")["input_ids"][:, :512]
    link = DistLink(peer=0)
    send_request(link, prompt[:, :-1])
    received = receive_cache(link, artifacts, model, input_ids=prompt[:, :-1], timeout=300)
    out = model.generate(prompt, **with_cache(model, received.cache), max_new_tokens=24, do_sample=False)
    oracle = model.generate(prompt, max_new_tokens=24, do_sample=False)
    report = received.report
    print(f"outcome {report.outcome}, {report.wire_bytes / 1e6:.2f} MB on the wire vs {report.raw_bytes / 1e6:.2f} MB "
          f"raw; greedy continuation identical to the oracle: {out.tolist() == oracle.tolist()}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", choices=["both", "producer", "consumer"], default="both")
    parser.add_argument("--init", default=None, help="the process group's init_method, tcp://HOST:PORT")
    args = parser.parse_args()
    if args.init is None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            args.init = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
    producer = None
    if args.role == "both":
        producer = subprocess.Popen([sys.executable, __file__, "--role", "producer", "--init", args.init])
        args.role = "consumer"
    rank = 0 if args.role == "producer" else 1
    model, tokenizer = load_model("default")
    artifacts = SCDArtifacts.from_pretrained(ARTIFACTS)
    dist.init_process_group("gloo", init_method=args.init, rank=rank, world_size=2)
    try:
        produce(model, artifacts) if rank == 0 else consume(model, tokenizer, artifacts)
    finally:
        dist.destroy_process_group()
        if producer is not None:
            producer.wait(timeout=60)


if __name__ == "__main__":
    main()
