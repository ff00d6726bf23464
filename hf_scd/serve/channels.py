"""How a payload moves from a prefill replica to a decode replica. Each channel is one small class with one job: give
the decode replica a `Link` on which this request's frames arrive, and start the prefill call that sends them. The
frames, their checks, the rebuild and the fallback are the transport's (`hf_scd.transport.receive_cache`), the same
for every channel; a channel only carries bytes.

- `ObjectStoreChannel`: a Serve streaming call. The prefill replica yields each frame as its forward writes the layer,
  and Ray's object store carries it; the decode replica checks and decodes layer by layer as they come.
- `TCPChannel`: the decode replica listens on an ephemeral port and hands the prefill replica a ticket (its address)
  through Serve; the frames then stream over that TCP connection, outside Ray.

Either way the channel watches the prefill call: when it fails (the replica died, or raised), the link is told at
once, so the decode replica falls back to its own prefill without waiting out the deadline.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from dataclasses import dataclass

from ..errors import describe
from ..transport import ChunkLink, Link, TCPListener
from .config import Transport


@dataclass(frozen=True)
class PrefillJob:
    """What a decode replica asks of a prefill replica: the cache of `input_ids`, encoded with the route's artifacts
    at `point`."""

    route: str
    input_ids: list[int]
    point: str | None


@dataclass(frozen=True)
class Ticket:
    """Where a prefill replica connects to stream a job's frames over TCP."""

    host: str
    port: int


class Channel(ABC):
    """The decode replica's side of one way to carry frames from `prefill` (a handle to the prefill deployment)."""

    name: str

    def __init__(self, prefill, transport: Transport):
        self.prefill, self.transport = prefill, transport
        self.key = transport.key()

    @abstractmethod
    def open(self, job: PrefillJob) -> tuple[Link, asyncio.Task]:
        """The link on which `job`'s frames arrive, and the task that runs the prefill call and reports its failure
        to the link. Cancel the task to give up on the producer."""


class ObjectStoreChannel(Channel):
    name = "object_store"

    def open(self, job: PrefillJob) -> tuple[Link, asyncio.Task]:
        link = ChunkLink(key=self.key)
        stream = self.prefill.options(stream=True, method_name="stream").remote(job)

        async def pump() -> None:
            try:
                async for chunk in stream:
                    link.feed(chunk)
                link.feed(None)
            except asyncio.CancelledError:
                stream.cancel()
                raise
            except Exception as error:  # the engine's report that the producer is gone: the link raises it, typed
                link.feed(error)

        return link, asyncio.create_task(pump())


class TCPChannel(Channel):
    name = "tcp"

    def open(self, job: PrefillJob) -> tuple[Link, asyncio.Task]:
        listener = TCPListener(self.transport.host, 0, key=self.key)
        link = listener.incoming(send_timeout=self.transport.timeout_s)
        call = self.prefill.options(method_name="send_to").remote(job, Ticket(self._advertised(), listener.address[1]))

        async def watch() -> None:
            try:
                await call
            except asyncio.CancelledError:
                call.cancel()
                raise
            except Exception as error:
                link.abort(describe(error))

        return link, asyncio.create_task(watch())

    def _advertised(self) -> str:
        """The address a prefill replica on another node can reach: this node's IP when listening on all
        interfaces."""
        if self.transport.host in ("0.0.0.0", "::"):
            import ray

            return ray.util.get_node_ip_address()
        return self.transport.host


CHANNELS: dict[str, type[Channel]] = {channel.name: channel for channel in (ObjectStoreChannel, TCPChannel)}
