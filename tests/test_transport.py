"""Moving a cache between real processes: a prefill process (tests/peers/producer.py) streams SmolLM2's cache over
TCP (and over torch.distributed/gloo) to this process, which continues greedy generation. Every way a transfer can
fail ends in a completed request through local prefill, or in the typed error under `fallback="raise"`."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hf_scd import PayloadLimitError, SCDCache
from hf_scd.compat import with_cache
from hf_scd.errors import (
    ArtifactMismatchError,
    AuthenticationError,
    ConnectionLostError,
    CorruptPayloadError,
    ProducerAbortedError,
    TransferTimeoutError,
)
from hf_scd.eval.corpus import evaluation_texts
from hf_scd.transport import (
    ChunkLink,
    Frame,
    Kind,
    LinkPolicy,
    TCPLink,
    TCPListener,
    TransferReport,
    receive_cache,
    send_request,
)
from hf_scd.transport.frames import FrameCodec

REPO = Path(__file__).resolve().parents[1]
KEY = b"test-shared-key"


# ---- frames, without a model ------------------------------------------------------------------------------------


def test_frames_round_trip_and_are_authenticated():
    sender, receiver = FrameCodec(KEY), FrameCodec(KEY)
    header, body = sender.seal(Frame(Kind.LAYER, b"codes", layer=3, tokens=7))
    frame = receiver.open(header, receiver.read_header(header), body)
    assert (frame.kind, frame.body, frame.layer, frame.tokens) == (Kind.LAYER, b"codes", 3, 7)
    header, body = FrameCodec(b"another key").seal(Frame(Kind.LAYER, b"codes"))
    with pytest.raises(AuthenticationError):
        FrameCodec(KEY).open(header, FrameCodec(KEY).read_header(header), body)
    header, body = FrameCodec().seal(Frame(Kind.LAYER, b"codes"))
    with pytest.raises(CorruptPayloadError, match="checksum"):
        FrameCodec().open(header, FrameCodec().read_header(header), b"codez")
    with pytest.raises(CorruptPayloadError, match="frame 0 arrived where frame 1"):
        late = FrameCodec()
        late.received = 1
        late.read_header(header)


def _pair(key=None, peer_key=None):
    listener = TCPListener(key=key)
    client = TCPLink.connect(*listener.address, key=peer_key)
    return listener.accept(timeout=5), client, listener


def test_a_peer_without_the_key_is_refused_before_anything_is_decoded():
    server, client, listener = _pair(key=KEY, peer_key=b"wrong")
    with listener, server, client:
        client.send(Frame(Kind.OPEN, b"\x00" * 1000))
        with pytest.raises(AuthenticationError):
            server.receive(time.monotonic() + 5, {Kind.OPEN: 4096})


def test_declared_sizes_are_capped_before_allocating_and_junk_is_refused():
    server, client, listener = _pair()
    with listener, server, client:
        client.send(Frame(Kind.OPEN, b"\x00" * 5000))
        with pytest.raises(PayloadLimitError, match="at most 4096"):
            server.receive(time.monotonic() + 5, {Kind.OPEN: 4096})
    server, client, listener = _pair()
    with listener, server, client:
        client.sock.sendall(os.urandom(64))
        with pytest.raises(CorruptPayloadError, match="magic"):
            server.receive(time.monotonic() + 5, {Kind.OPEN: 4096})
    server, client, listener = _pair()
    with listener, server, client:
        client.send(Frame(Kind.END, b"{}"))
        with pytest.raises(CorruptPayloadError, match="END frame arrived where OPEN"):
            server.receive(time.monotonic() + 5, {Kind.OPEN: 4096})


def test_deadline_and_a_vanished_peer_are_typed_errors():
    server, client, listener = _pair()
    with listener, server:
        with pytest.raises(TransferTimeoutError):
            server.receive(time.monotonic() + 0.2, {Kind.OPEN: 4096})
        client.sock.sendall(b"SCDF")
        client.close()
        with pytest.raises(ConnectionLostError):
            server.receive(time.monotonic() + 5, {Kind.OPEN: 4096})


def test_listeners_bind_to_localhost_by_default():
    with TCPListener() as listener:
        assert listener.address[0] == "127.0.0.1"


def test_link_policy_follows_cachegen_rule():
    policy = LinkPolicy(wire_bytes_per_token=6000, link_bytes_per_s=1.25e8, decode_tokens_per_s=4000,
                        prefill_tokens_per_s=200)  # fmt: skip
    assert policy.choose(2048) == "transfer"  # 2K tokens: ~0.6 s to transfer, ~10 s to prefill
    policy.link_bytes_per_s = 1e4  # a 10 kB/s link: prefilling wins
    assert policy.choose(2048) == "prefill"
    policy.enabled = False
    assert policy.choose(2048) == "transfer"
    policy = LinkPolicy(6000, 1e4, 4000, 200)
    policy.observe(TransferReport(tokens=1000, wire_bytes=6_000_000, wire_ms=48.0, decode_ms=250.0))
    assert policy.link_bytes_per_s > 1e4 and policy.choose(2048) == "transfer"
    # What every transfer costs, whatever its length: a few tokens prefill sooner than they arrive.
    policy = LinkPolicy(6000, 1.25e8, 4000, 2000, fixed_ms=50.0)
    assert policy.choose(4) == "prefill" and policy.choose(2048) == "transfer"


# ---- real processes ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def producer(tmp_path_factory):
    """A prefill process, and a way to connect to it asking for a behaviour (tests/peers/producer.py)."""
    port_file = tmp_path_factory.mktemp("producer") / "port"
    process = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "peers" / "producer.py"), str(port_file), KEY.decode()],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    deadline = time.monotonic() + 180
    while not (port_file.exists() and port_file.read_text()):
        assert process.poll() is None and time.monotonic() < deadline, "the producer process did not start"
        time.sleep(0.2)
    port = int(port_file.read_text())

    def connect(mode: str) -> TCPLink:
        link = TCPLink.connect("127.0.0.1", port, key=None if mode.endswith("unkeyed") else KEY)
        link.sock.sendall(mode.encode().ljust(16))  # the test preamble: which behaviour to show
        return link

    yield connect, process
    process.kill()
    process.wait()


@pytest.fixture(scope="module")
def prompt(smollm2):
    """A real prompt: 400 tokens of held-out text, and its oracle continuation on SmolLM2. Its greedy continuation
    has no near tie (a margin of at least 0.2 nats between the two best tokens at every step, checked here): where
    two tokens are within a few hundredths, any lossy code of the cache may flip it, which would say nothing of the
    transport."""
    model, tokenizer = smollm2
    ids = tokenizer(evaluation_texts()[5], return_tensors="pt")["input_ids"][:, :400]
    with torch.inference_mode():
        oracle = model.generate(ids, max_new_tokens=12, do_sample=False)
        best = model(oracle[:, :-1]).logits[0, ids.shape[1] - 1 :].log_softmax(-1).topk(2).values
    assert ids.shape[1] == 400 and float((best[:, 0] - best[:, 1]).min()) >= 0.2
    return ids, oracle


def _request(producer, mode, smollm2, artifacts, prompt, **kwargs):
    connect, _ = producer
    model, _ = smollm2
    ids, oracle = prompt
    with connect(mode) as link:
        send_request(link, ids[:, :-1])
        received = receive_cache(link, artifacts, model, input_ids=ids[:, :-1], **kwargs)
    with torch.inference_mode():
        out = model.generate(ids, **with_cache(model, received.cache), max_new_tokens=12, do_sample=False)
    return received, out, oracle


def test_streamed_one_shot_and_stored_transfers_continue_like_the_oracle(producer, smollm2, artifacts, prompt):
    caches, wire = {}, {}
    for mode in ("stream", "oneshot", "stored", "stream-zstd", "oneshot-zstd"):
        received, out, oracle = _request(producer, mode, smollm2, artifacts, prompt, fallback="raise")
        report = received.report
        assert isinstance(received.cache, SCDCache) and report.outcome == "transferred", report
        assert report.streaming == (not mode.startswith("oneshot")) and report.fallback_reason is None
        assert report.entropy == mode.endswith("zstd")
        assert report.wire_bytes < report.raw_bytes / 6  # the default 8x point, frames and the exact sink included
        assert len(report.layer_arrival_ms) == 30 and report.decode_ms > 0
        assert out[0, -12:].tolist() == oracle[0, -12:].tolist(), mode
        caches[mode], wire[mode] = received.cache, report.wire_bytes
    for mode in caches:  # streamed == one-shot == through the entropy stage, bit for bit
        for a, b in zip(caches["stream"].layers, caches[mode].layers, strict=True):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values), mode
    assert wire["oneshot-zstd"] < 0.95 * wire["oneshot"] and wire["stream-zstd"] < 0.95 * wire["stream"]


def test_a_wrong_key_is_refused_and_the_request_completes(producer, smollm2, artifacts, prompt):
    received, out, oracle = _request(producer, "wrong-key", smollm2, artifacts, prompt)
    assert received.report.outcome == "prefilled"
    assert received.report.fallback_reason.startswith("AuthenticationError")
    assert out.tolist() == oracle.tolist()


@pytest.mark.parametrize(
    "mode, error",
    [
        ("corrupt", AuthenticationError),  # with a key, an altered frame fails its HMAC first
        ("corrupt-unkeyed", CorruptPayloadError),  # without one, its CRC
        ("other-artifacts", ArtifactMismatchError),
        ("oversize", PayloadLimitError),
        ("junk", CorruptPayloadError),
        ("abort", ProducerAbortedError),
        ("slow", TransferTimeoutError),
        ("die", ConnectionLostError),
    ],
)
def test_every_failure_ends_in_local_prefill(producer, smollm2, artifacts, prompt, mode, error):
    kwargs = {"timeout": 3.0} if mode == "slow" else {}
    received, out, oracle = _request(producer, mode, smollm2, artifacts, prompt, **kwargs)
    report = received.report
    assert report.outcome == "prefilled" and report.fallback_reason.startswith(error.__name__), report
    assert not isinstance(received.cache, SCDCache) and report.prefill_ms > 0
    assert out.tolist() == oracle.tolist()
    if mode == "die":
        assert producer[1].wait(timeout=30) == 3  # the producer really died mid-stream


def test_fallback_raise_gives_the_typed_error(smollm2, artifacts, prompt):
    model, _ = smollm2
    ids, _ = prompt
    server, client, listener = _pair()
    with listener, server, client:
        client.sock.sendall(os.urandom(128))
        with pytest.raises(CorruptPayloadError):
            receive_cache(server, artifacts, model, input_ids=ids, fallback="raise")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_transfer_over_torch_distributed_gloo(smollm2, artifacts, prompt):
    import torch.distributed as dist

    from hf_scd.transport import DistLink

    model, _ = smollm2
    ids, oracle = prompt
    address = f"tcp://127.0.0.1:{_free_port()}"
    process = subprocess.Popen(
        [sys.executable, str(REPO / "examples" / "two_process_dist.py"), "--role", "producer", "--init", address],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        dist.init_process_group("gloo", init_method=address, rank=1, world_size=2)
        link = DistLink(peer=0)
        send_request(link, ids[:, :-1])
        received = receive_cache(link, artifacts, model, input_ids=ids[:, :-1], fallback="raise", timeout=120)
        with torch.inference_mode():
            out = model.generate(ids, **with_cache(model, received.cache), max_new_tokens=12, do_sample=False)
        assert received.report.outcome == "transferred" and received.report.streaming
        assert out[0, -12:].tolist() == oracle[0, -12:].tolist()
        assert process.wait(timeout=60) == 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        process.kill()


# ---- links for serving engines: whole chunks, and a connection the producer has yet to make ---------------------


def test_chunk_link_carries_frames_in_any_split_and_reports_the_engines_failure():
    carried: list[bytes | None] = []
    producer = ChunkLink(carried.append, key=KEY)
    producer.send(Frame(Kind.OPEN, b"head", tokens=3))
    producer.send(Frame(Kind.LAYER, b"x" * 1000, layer=0, tokens=3))
    producer.close()
    assert carried[-1] is None
    stream = b"".join(carried[:-1])
    consumer = ChunkLink(key=KEY)
    for start in range(0, len(stream), 37):  # the engine may cut the bytes anywhere
        consumer.feed(stream[start : start + 37])
    consumer.feed(None)
    caps = {Kind.OPEN: 64, Kind.LAYER: 4096}
    assert consumer.receive(time.monotonic() + 5, caps).body == b"head"
    assert consumer.receive(time.monotonic() + 5, caps).body == b"x" * 1000
    with pytest.raises(ConnectionLostError, match="stream ended"):
        consumer.receive(time.monotonic() + 5, caps)

    broken = ChunkLink(key=KEY)
    broken.feed(stream[:10])
    broken.feed(RuntimeError("the actor died"))
    with pytest.raises(ConnectionLostError, match="the actor died"):
        broken.receive(time.monotonic() + 5, caps)
    with pytest.raises(TransferTimeoutError):
        ChunkLink(key=KEY).receive(time.monotonic() + 0.2, caps)
    with pytest.raises(ConnectionLostError, match="cannot send"):
        ChunkLink(key=KEY).send(Frame(Kind.OPEN, b"head"))


def test_incoming_link_accepts_on_first_read_and_stops_waiting_when_told():
    listener = TCPListener(key=KEY)
    address, incoming = listener.address, listener.incoming()
    with TCPLink.connect(*address, key=KEY) as producer:
        producer.send(Frame(Kind.OPEN, b"head"))
        assert incoming.receive(time.monotonic() + 5, {Kind.OPEN: 64}).body == b"head"
    incoming.close()
    with pytest.raises(ConnectionLostError, match="refused"):  # closing the link closed its listener
        TCPLink.connect(*address, timeout=0.5)

    listener = TCPListener()
    waiting = listener.incoming()
    with pytest.raises(TransferTimeoutError):
        waiting.receive(time.monotonic() + 0.3, {Kind.OPEN: 64})
    waiting.abort("RayActorError: the prefill replica died")
    start = time.monotonic()
    with pytest.raises(ConnectionLostError, match="replica died"):
        waiting.receive(time.monotonic() + 30, {Kind.OPEN: 64})
    assert time.monotonic() - start < 1
    waiting.close()
