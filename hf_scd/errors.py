"""Typed errors: every way a payload, an artifact or a model can be wrong has its own class; and the one warning."""


def describe(error: BaseException) -> str:
    """ "Type: message": how a report's fallback reason and a producer's ABORT frame name a failure."""
    return f"{type(error).__name__}: {error}"


class SCDError(Exception):
    """Base class of every error hf-scd raises on purpose."""


class UnsupportedModelError(SCDError):
    """The model's architecture is not one SCD knows how to de-rotate and rebuild."""


class ArtifactError(SCDError):
    """An artifact folder is missing, malformed or of an unknown format version."""


class ArtifactMismatchError(SCDError):
    """Artifacts used with a model (or a payload) they were not fitted for."""


class PayloadError(SCDError):
    """A payload cannot be read."""


class TruncatedPayloadError(PayloadError):
    """The payload is shorter than its header says: it was cut in transit or on disk."""


class CorruptPayloadError(PayloadError):
    """The payload's checksum or structure does not hold: its bytes were altered."""


class PayloadLimitError(PayloadError):
    """The payload is well-formed but asks for more than the consumer allows: positions past the model's range, or
    more K/V memory than its budget."""


class PayloadVersionError(PayloadError):
    """The payload was written in a wire-format version this library cannot read."""


class OperatingPointError(SCDError):
    """No operating point in the artifacts satisfies the requested target."""


class CacheStateError(SCDError):
    """The cache was used in a way that would silently give wrong results."""


class TransferError(SCDError):
    """A cache could not be moved over a link."""


class TransferTimeoutError(TransferError):
    """The deadline passed before the transfer completed."""


class ConnectionLostError(TransferError):
    """The peer closed the link, or died, before the transfer completed."""


class AuthenticationError(TransferError):
    """A frame's HMAC tag did not verify: the peer does not hold the link's shared key."""


class ProducerAbortedError(TransferError):
    """The producer reported that it could not finish (its reason is in the message)."""


class RequestError(SCDError, ValueError):
    """A serving request that cannot be answered as asked (an unknown model, a prompt over the limit, an option not
    supported): the HTTP API answers it with a 4xx and this message."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_request"):
        super().__init__(message)
        self.status, self.code = status, code

    def __reduce__(self):  # crosses Ray's process boundary whole, status and code included
        return type(self), (str(self), self.status, self.code)


class ArtifactFitWarning(UserWarning):
    """Same-model artifacts were accepted for weights they were not fitted on, because the fit probe found that their
    codes fit those weights within tolerance (e.g. the model in another precision or requantized)."""
