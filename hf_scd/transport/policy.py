"""When to transfer at all: CacheGen's rule. Shipping a cache pays only if it arrives, decoded, sooner than this
machine would prefill the prompt itself, which depends on the link's rate and the prefill's speed."""

from __future__ import annotations

from dataclasses import dataclass

from .stream import TransferReport


@dataclass
class LinkPolicy:
    """Chooses transfer or local prefill for a prompt, from measured rates, kept up to date by `observe`.

    `wire_bytes_per_token` is what the operating point ships per token (all layers, headers included);
    `link_bytes_per_s` the link's measured rate; `decode_tokens_per_s` and `prefill_tokens_per_s` this machine's
    rebuild and prefill speeds. `fixed_ms` is what any transfer costs whatever its length (asking the producer,
    its forward's start, the head frame): without it a prompt of a few tokens looks cheap to transfer, and is not.
    `enabled=False` always transfers. `smoothing` is the weight of a new observation.
    """

    wire_bytes_per_token: float
    link_bytes_per_s: float
    decode_tokens_per_s: float
    prefill_tokens_per_s: float
    enabled: bool = True
    smoothing: float = 0.3
    fixed_ms: float = 0.0

    def predicted_transfer_ms(self, tokens: int) -> float:
        per_token_s = self.wire_bytes_per_token / self.link_bytes_per_s + 1 / self.decode_tokens_per_s
        return self.fixed_ms + 1e3 * tokens * per_token_s

    def predicted_prefill_ms(self, tokens: int) -> float:
        return 1e3 * tokens / self.prefill_tokens_per_s

    def choose(self, tokens: int) -> str:
        """ "transfer" or "prefill", whichever is predicted to give the cache sooner."""
        if not self.enabled or self.predicted_transfer_ms(tokens) <= self.predicted_prefill_ms(tokens):
            return "transfer"
        return "prefill"

    def observe(self, report: TransferReport) -> None:
        """Fold a finished transfer's measured rates into the policy's."""
        if not report.tokens:
            return
        if report.outcome == "prefilled":
            if report.prefill_ms > 0:
                self.prefill_tokens_per_s = self._blend(self.prefill_tokens_per_s, report.tokens / report.prefill_ms)
            return
        if report.wire_ms > 0:
            self.link_bytes_per_s = self._blend(self.link_bytes_per_s, report.wire_bytes / report.wire_ms)
        if report.decode_ms > 0:
            self.decode_tokens_per_s = self._blend(self.decode_tokens_per_s, report.tokens / report.decode_ms)
        new_per_token = report.wire_bytes / report.tokens
        self.wire_bytes_per_token += self.smoothing * (new_per_token - self.wire_bytes_per_token)

    def _blend(self, old_per_s: float, new_per_ms: float) -> float:
        return (1 - self.smoothing) * old_per_s + self.smoothing * new_per_ms * 1e3
