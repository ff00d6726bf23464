"""Moving a cache between processes and machines, on existing transports: TCP, torch.distributed point-to-point.

`CacheSender` ships an `SCDCache` (streamed layer by layer while the prefill runs, or one-shot), `receive_cache`
rebuilds it on the consumer and falls back to local prefill when anything goes wrong, `LinkPolicy` decides whether
to transfer at all. Frames are versioned, checked and optionally authenticated (`key=`): see `frames`.
"""

from .frames import FRAME_VERSION, Frame, Kind
from .links import ChunkLink, DistLink, IncomingTCPLink, Link, TCPLink, TCPListener
from .policy import LinkPolicy
from .stream import CacheSender, Received, SendReport, TransferReport, read_request, receive_cache, send_request

__all__ = [
    "FRAME_VERSION",
    "CacheSender",
    "ChunkLink",
    "DistLink",
    "Frame",
    "IncomingTCPLink",
    "Kind",
    "Link",
    "LinkPolicy",
    "Received",
    "SendReport",
    "TCPLink",
    "TCPListener",
    "TransferReport",
    "read_request",
    "receive_cache",
    "send_request",
]
