"""Links: existing transports that carry frames, each with explicit timeouts. `TCPLink` is a plain TCP stream, for a
producer and a consumer that only know an address; `DistLink` is torch.distributed point-to-point between two ranks
of one process group (gloo on CPU, NCCL on GPU), where frames travel as uint8 tensors: the fixed-size header, then a
body of the length it declares, every `isend` waited on; `ChunkLink` hands whole frames to an engine that moves
objects rather than streams (Ray's object store, through a streaming call: `hf_scd.serve`).

GPU data planes (NIXL, Mooncake) would be further `Link`s: `_send` hands a frame's body to the engine's registered
memory, `_recv` reads it there; framing, checks, authentication and fallback above them stay as they are.
"""

from __future__ import annotations

import queue
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from datetime import timedelta

import torch

from ..errors import ConnectionLostError, CorruptPayloadError, PayloadLimitError, TransferTimeoutError, describe
from .frames import HEADER_BYTES, Frame, FrameCodec, Kind

DEFAULT_SEND_TIMEOUT_S = 60.0


class Link(ABC):
    """One end of a link between a producer and a consumer. Frames go out whole; a frame comes in as a header, whose
    declared length is checked against the caps for its kind before the body is allocated, then the body."""

    def __init__(self, key: bytes | None = None, send_timeout: float = DEFAULT_SEND_TIMEOUT_S):
        self.frames = FrameCodec(key)
        self.send_timeout = send_timeout
        self.bytes_sent = 0
        self.bytes_received = 0

    def send(self, frame: Frame) -> None:
        header, body = self.frames.seal(frame)
        self._send(header, body, time.monotonic() + self.send_timeout)
        self.bytes_sent += len(header) + len(body)

    def receive(self, deadline: float, caps: Mapping[Kind, int]) -> Frame:
        """The next frame, which must be of a kind in `caps` and at most that many body bytes, by `deadline`
        (`time.monotonic()`)."""
        raw = self._recv(HEADER_BYTES, deadline)
        header = self.frames.read_header(raw)
        if header.kind not in caps:
            expected = " or ".join(kind.name for kind in caps)
            raise CorruptPayloadError(f"a {header.kind.name} frame arrived where {expected} was due")
        if header.length > caps[header.kind]:
            raise PayloadLimitError(
                f"a {header.kind.name} frame declares {header.length} bytes; this receiver accepts at most "
                f"{caps[header.kind]} here"
            )
        body = self._recv(header.length, deadline) if header.length else b""
        self.bytes_received += len(raw) + len(body)
        return self.frames.open(raw, header, body)

    @abstractmethod
    def _send(self, header: bytes, body: bytes, deadline: float) -> None: ...

    @abstractmethod
    def _recv(self, size: int, deadline: float) -> bytes: ...

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Link:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TransferTimeoutError("the transfer's deadline passed")
    return left


class TCPLink(Link):
    """Frames over a connected TCP socket."""

    def __init__(self, sock: socket.socket, key: bytes | None = None, send_timeout: float = DEFAULT_SEND_TIMEOUT_S):
        super().__init__(key, send_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock

    @classmethod
    def connect(cls, host: str, port: int, *, key: bytes | None = None, timeout: float = 10.0, **kwargs) -> TCPLink:
        """Connect within `timeout` seconds, retrying while the peer refuses (a producer still starting up)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                sock = socket.create_connection((host, port), timeout=_remaining(deadline))
                return cls(sock, key, **kwargs)
            except ConnectionRefusedError as exc:
                if time.monotonic() + 0.2 >= deadline:
                    raise ConnectionLostError(f"{host}:{port} refused the connection for {timeout} s") from exc
                time.sleep(0.2)
            except TimeoutError as exc:
                raise TransferTimeoutError(f"no connection to {host}:{port} within {timeout} s") from exc
            except OSError as exc:
                raise ConnectionLostError(f"cannot connect to {host}:{port}: {exc}") from exc

    def _send(self, header: bytes, body: bytes, deadline: float) -> None:
        try:
            self.sock.settimeout(_remaining(deadline))
            self.sock.sendall(header)
            if body:
                self.sock.sendall(body)
        except TimeoutError as exc:
            raise TransferTimeoutError("the peer did not take the frame within the send timeout") from exc
        except OSError as exc:
            raise ConnectionLostError(f"the link broke while sending: {exc}") from exc

    def _recv(self, size: int, deadline: float) -> bytes:
        buffer = bytearray(size)
        view, got = memoryview(buffer), 0
        try:
            while got < size:
                self.sock.settimeout(_remaining(deadline))
                count = self.sock.recv_into(view[got:])
                if count == 0:
                    raise ConnectionLostError(f"the peer closed the link {got} bytes into a {size}-byte read")
                got += count
        except TimeoutError as exc:
            raise TransferTimeoutError(f"the deadline passed {got} bytes into a {size}-byte read") from exc
        except OSError as exc:
            raise ConnectionLostError(f"the link broke while receiving: {exc}") from exc
        return bytes(buffer)

    def close(self) -> None:
        self.sock.close()


class TCPListener:
    """Accepts `TCPLink`s. Binds to localhost unless `host` says otherwise: nobody gets in uninvited."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, key: bytes | None = None, backlog: int = 16):
        self.key = key
        self.sock = socket.create_server((host, port), backlog=backlog)

    @property
    def address(self) -> tuple[str, int]:
        return self.sock.getsockname()[:2]

    def accept(self, timeout: float | None = None, **kwargs) -> TCPLink:
        self.sock.settimeout(timeout)
        try:
            sock, _ = self.sock.accept()
        except TimeoutError as exc:
            raise TransferTimeoutError(f"no peer connected within {timeout} s") from exc
        return TCPLink(sock, self.key, **kwargs)

    def incoming(self, **kwargs) -> IncomingTCPLink:
        """The link to the next peer that connects, accepted by the first read, under that read's deadline."""
        return IncomingTCPLink(self, **kwargs)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> TCPListener:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()


class IncomingTCPLink(TCPLink):
    """The consumer's end of a connection the producer has yet to make, for a consumer that hands its address to
    the producer (a ticket through a serving engine): the first read accepts the connection under the transfer's
    deadline, so one deadline covers the producer's start too. `abort(reason)`, from any thread, ends the wait at
    once (the engine reported that the producer failed). The link owns its listener: closing it closes both."""

    POLL_S = 0.05

    def __init__(self, listener: TCPListener, send_timeout: float = DEFAULT_SEND_TIMEOUT_S):
        Link.__init__(self, listener.key, send_timeout)
        self.listener, self.sock = listener, None
        self._aborted: str | None = None

    def abort(self, reason: str) -> None:
        self._aborted = reason

    def _connected(self, deadline: float) -> socket.socket:
        while self.sock is None:
            if self._aborted is not None:
                raise ConnectionLostError(f"the producer failed before connecting: {self._aborted}")
            self.listener.sock.settimeout(min(self.POLL_S, _remaining(deadline)))
            try:
                sock, _ = self.listener.sock.accept()
            except TimeoutError:
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock = sock
        return self.sock

    def _send(self, header: bytes, body: bytes, deadline: float) -> None:
        self._connected(deadline)
        super()._send(header, body, deadline)

    def _recv(self, size: int, deadline: float) -> bytes:
        self._connected(deadline)
        return super()._recv(size, deadline)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.listener.close()


class ChunkLink(Link):
    """Frames as whole byte chunks, for an engine that carries objects rather than a byte stream. The producer's end
    hands each frame to `deliver` (and `None` once it is closed) for the engine to carry; the consumer's end is fed
    what the engine delivers: a chunk, `None` when the stream ended, or the engine's exception when it broke (a
    producer process that died). Reads wait at most until their deadline."""

    def __init__(
        self,
        deliver: Callable[[bytes | None], None] | None = None,
        *,
        key: bytes | None = None,
        send_timeout: float = DEFAULT_SEND_TIMEOUT_S,
    ):
        super().__init__(key, send_timeout)
        self._deliver = deliver
        self._inbox: queue.Queue[bytes | BaseException | None] = queue.Queue()
        self._buffer = bytearray()
        self._ended: BaseException | None = None
        self._closed = False

    def feed(self, chunk: bytes | BaseException | None) -> None:
        """What the engine delivered (thread-safe)."""
        self._inbox.put(chunk)

    def _send(self, header: bytes, body: bytes, deadline: float) -> None:
        if self._deliver is None or self._closed:
            raise ConnectionLostError("this end of the link cannot send: it is closed, or it is a consumer's")
        self._deliver(header + body)

    def _recv(self, size: int, deadline: float) -> bytes:
        while len(self._buffer) < size:
            if self._ended is not None:
                raise self._ended
            try:
                item = self._inbox.get(timeout=_remaining(deadline))
            except queue.Empty as exc:
                got = len(self._buffer)
                raise TransferTimeoutError(f"the deadline passed {got} bytes into a {size}-byte read") from exc
            if item is None:
                self._ended = ConnectionLostError(f"the stream ended {len(self._buffer)} bytes into a {size}-byte read")
            elif isinstance(item, BaseException):
                self._ended = ConnectionLostError(f"the engine lost the producer: {describe(item)}")
                self._ended.__cause__ = item
            else:
                self._buffer += item
        out = bytes(self._buffer[:size])
        del self._buffer[:size]
        return out

    def close(self) -> None:
        """The producer's end tells the engine that the stream is over."""
        if not self._closed:
            self._closed = True
            if self._deliver is not None:
                self._deliver(None)


class DistLink(Link):
    """Frames to and from `peer`, a rank of the default (or given) torch.distributed process group. Tensors live on
    `device`: the CPU for gloo, the rank's GPU for NCCL."""

    def __init__(
        self,
        peer: int,
        *,
        key: bytes | None = None,
        group=None,
        device: torch.device | str = "cpu",
        send_timeout: float = DEFAULT_SEND_TIMEOUT_S,
    ):
        super().__init__(key, send_timeout)
        self.peer, self.group, self.device = peer, group, torch.device(device)

    def _send(self, header: bytes, body: bytes, deadline: float) -> None:
        import torch.distributed as dist

        parts = [header, body] if body else [header]
        tensors = [torch.frombuffer(bytearray(part), dtype=torch.uint8).to(self.device) for part in parts]
        works = [dist.isend(tensor, self.peer, group=self.group) for tensor in tensors]
        for work in works:
            self._wait(work, deadline, "sending")

    def _recv(self, size: int, deadline: float) -> bytes:
        import torch.distributed as dist

        tensor = torch.empty(size, dtype=torch.uint8, device=self.device)
        self._wait(dist.irecv(tensor, self.peer, group=self.group), deadline, "receiving")
        return tensor.cpu().numpy().tobytes()

    @staticmethod
    def _wait(work, deadline: float, doing: str) -> None:
        try:
            work.wait(timeout=timedelta(seconds=_remaining(deadline)))
        except RuntimeError as exc:
            if "timed out" in str(exc).lower() or "timeout" in str(exc).lower():
                raise TransferTimeoutError(f"the deadline passed while {doing}: {exc}") from exc
            raise ConnectionLostError(f"the process group failed while {doing}: {exc}") from exc

    def close(self) -> None:
        """The process group belongs to the caller: closing the link leaves it as it is."""
