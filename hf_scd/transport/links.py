"""Links: existing transports that carry frames, each with explicit timeouts. `TCPLink` is a plain TCP stream, for a
producer and a consumer that only know an address; `DistLink` is torch.distributed point-to-point between two ranks
of one process group (gloo on CPU, NCCL on GPU), where frames travel as uint8 tensors: the fixed-size header, then a
body of the length it declares, every `isend` waited on.

GPU data planes (NIXL, Mooncake) would be further `Link`s: `_send` hands a frame's body to the engine's registered
memory, `_recv` reads it there; framing, checks, authentication and fallback above them stay as they are.
"""

from __future__ import annotations

import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from datetime import timedelta

import torch

from ..errors import ConnectionLostError, CorruptPayloadError, PayloadLimitError, TransferTimeoutError
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

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> TCPListener:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()


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
