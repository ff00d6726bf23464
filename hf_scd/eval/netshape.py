"""Shaped links for the TTFT benchmark: two network namespaces joined by a veth pair, each end's egress limited by a
`tbf` qdisc (netem, for added delay, is not on these machines). Where namespaces cannot be made (no root, no
iproute2), links are shaped in the application instead: a token bucket in the sending link plus an added RTT.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass

from ..transport import TCPLink

PRODUCER_NS, CONSUMER_NS = "hfscd-prefill", "hfscd-decode"
PRODUCER_DEV, CONSUMER_DEV = "hfscd-p", "hfscd-c"
PRODUCER_IP, CONSUMER_IP = "10.231.0.1", "10.231.0.2"
MTU = 1500


def _run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True)


def tbf_burst_bytes(gbps: float) -> int:
    """A bucket of 4 ms at the rate, and never less than 64 KiB: above the MTU, and enough for the kernel's timer
    granularity at 10 Gbit/s."""
    return max(64 << 10, int(gbps * 1e9 / 8 * 0.004))


@dataclass
class NamespaceShaper:
    """Producer and consumer namespaces over one veth pair, shaped with tbf on both ends."""

    name: str = "tbf on veth between network namespaces"

    @staticmethod
    def available() -> bool:
        if shutil.which("ip") is None or shutil.which("tc") is None:
            return False
        try:
            NamespaceShaper.create()
        except (subprocess.CalledProcessError, OSError):
            NamespaceShaper.remove()
            return False
        return True

    @staticmethod
    def create() -> None:
        NamespaceShaper.remove()
        _run("ip", "netns", "add", PRODUCER_NS)
        _run("ip", "netns", "add", CONSUMER_NS)
        _run("ip", "link", "add", PRODUCER_DEV, "type", "veth", "peer", "name", CONSUMER_DEV)
        ends = ((PRODUCER_NS, PRODUCER_DEV, PRODUCER_IP), (CONSUMER_NS, CONSUMER_DEV, CONSUMER_IP))
        for namespace, device, address in ends:
            _run("ip", "link", "set", device, "netns", namespace)
            _run("ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", device)
            _run("ip", "-n", namespace, "link", "set", device, "mtu", str(MTU), "up")
            _run("ip", "-n", namespace, "link", "set", "lo", "up")

    @staticmethod
    def remove() -> None:
        for namespace in (PRODUCER_NS, CONSUMER_NS):
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)

    @staticmethod
    def set_rate(gbps: float | None) -> None:
        """Shape both directions to `gbps` (None: unshaped veth)."""
        for namespace, device in ((PRODUCER_NS, PRODUCER_DEV), (CONSUMER_NS, CONSUMER_DEV)):
            subprocess.run(["tc", "-n", namespace, "qdisc", "del", "dev", device, "root"], capture_output=True)
            if gbps is not None:
                rate, burst = f"{int(gbps * 1e9)}bit", str(tbf_burst_bytes(gbps))
                _run("tc", "-n", namespace, "qdisc", "add", "dev", device, "root", "tbf", "rate", rate, "burst", burst,
                     "latency", "200ms")  # fmt: skip

    @staticmethod
    def prefix(role: str) -> list[str]:
        """The command prefix that runs a process on the `role` ("producer" / "consumer") end."""
        return ["ip", "netns", "exec", PRODUCER_NS if role == "producer" else CONSUMER_NS]


class TokenBucketLink(TCPLink):
    """A `TCPLink` whose sends are paced to `gbps` in the application, with `rtt_ms` added before each frame: the
    fallback shaper where namespaces cannot be made."""

    def __init__(self, sock, key=None, *, gbps: float | None = None, rtt_ms: float = 0.2, **kwargs):
        super().__init__(sock, key, **kwargs)
        self.rate = None if gbps is None else gbps * 1e9 / 8
        self.rtt_ms = rtt_ms
        self._free_at = time.perf_counter()

    def _send(self, header: bytes, body: bytes, deadline: float) -> None:
        if self.rate is not None:
            now = time.perf_counter()
            self._free_at = max(self._free_at, now + self.rtt_ms / 2e3) + (len(header) + len(body)) / self.rate
            chunk = 1 << 16
            data = header + body
            for start in range(0, len(data), chunk):
                due = self._free_at - (len(data) - start) / self.rate
                if due > time.perf_counter():
                    time.sleep(due - time.perf_counter())
                super()._send(data[start : start + chunk], b"", deadline)
            return
        super()._send(header, body, deadline)
