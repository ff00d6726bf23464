"""A prefill process for the transport tests. Each connection starts with a 16-byte test preamble naming a mode
(outside the library's frames), then the consumer's REQUEST; the producer answers as the mode says: a well-behaved
producer, or one that fails in a chosen way. It serves until killed.

    python tests/peers/producer.py PORT_FILE KEY
"""

import os
import struct
import sys
import time
from pathlib import Path

import torch

from hf_scd import SCDArtifacts, SCDCache, SCDError
from hf_scd.compat import with_cache
from hf_scd.models import load_model
from hf_scd.transport import CacheSender, Kind, TCPLink, TCPListener, read_request
from hf_scd.transport.frames import FRAME_VERSION, MAGIC

REPO = Path(__file__).resolve().parents[2]


class CorruptingLink(TCPLink):
    """Flips one byte of the fourth frame's body after it was sealed: what a bad wire or memory would do."""

    def _send(self, header, body, deadline):
        if self.frames.sent == 4 and body:
            body = bytearray(body)
            body[len(body) // 2] ^= 0x10
        super()._send(header, bytes(body), deadline)


def fail_on_layer_10(index: int) -> None:
    if index == 10:
        raise RuntimeError("CUDA out of memory (simulated)")


def warm_up(model, artifacts) -> None:
    """One recorded forward before serving (a serving process should make one too). On this CPU torch build the first
    forward of a process with the recording hooks on sometimes computes the rotary (cos, sin) less accurately (cos off
    by 1.5e-4 instead of 2.3e-5 at position 398), so its K differs from every later forward's: the tests compare
    caches of separate requests bit for bit, which says something of the codec only if the forwards agree."""
    with torch.inference_mode(), SCDCache(artifacts, model) as cache:
        model(input_ids=torch.arange(1, 401).unsqueeze(0), **with_cache(model, cache))


def serve(port_file: str, key: bytes) -> None:
    model, _ = load_model("default")
    same = SCDArtifacts.from_pretrained(REPO / "hub_artifacts" / "smollm2-135m-instruct")
    pair = SCDArtifacts.from_pretrained(REPO / "hub_artifacts" / "smollm2-135m-instruct-stdlib-pair")
    warm_up(model, same)
    with TCPListener(key=key) as listener:
        Path(port_file).write_text(str(listener.address[1]))
        while True:
            link = listener.accept()
            mode = link._recv(16, time.monotonic() + 60).decode().strip()
            if mode.startswith("corrupt"):  # "corrupt-unkeyed": a link without a key, so the CRC is what catches it
                link = CorruptingLink(link.sock, None if mode == "corrupt-unkeyed" else key)
            try:
                answer(link, mode, model, pair if mode == "other-artifacts" else same)
            except SCDError as error:
                print(f"producer: {mode}: {type(error).__name__}: {error}", flush=True)
            finally:
                link.close()


@torch.inference_mode()
def answer(link: TCPLink, mode: str, model, artifacts) -> None:
    input_ids, attention_mask = read_request(link, timeout=60, max_tokens=8192)
    if mode == "wrong-key":  # frames sealed with another key than the consumer's
        link.frames.key = b"not the shared key"
    if mode == "junk":
        link.sock.sendall(os.urandom(4096))
        return
    if mode == "oversize":  # a header that declares a 1 TiB payload, correctly numbered and checksummed
        fields = struct.pack("<4sHBBIIIQI", MAGIC, FRAME_VERSION, Kind.PAYLOAD, 0, 0, 0, 1, 1 << 40, 0)
        link.sock.sendall(fields + bytes(32))
        time.sleep(2)
        return
    if mode == "slow":
        time.sleep(6)
        return
    cache = SCDCache(artifacts, model)
    forward = {"input_ids": input_ids, "attention_mask": attention_mask, **with_cache(model, cache)}
    if mode in ("oneshot", "stored", "oneshot-zstd"):
        model(**forward)
        CacheSender(link, cache, entropy=mode.endswith("zstd")).send(streaming=mode == "stored")
        return
    if mode == "die":  # the process dies while layer 10 is being written
        cache.layer_listeners.append(lambda index: index == 10 and os._exit(3))
    if mode == "abort":  # the forward fails on layer 10: the stream ends with ABORT
        cache.layer_listeners.append(fail_on_layer_10)
    try:
        with CacheSender(link, cache, entropy=mode == "stream-zstd"):
            model(**forward)
    except RuntimeError:
        pass


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2].encode())
