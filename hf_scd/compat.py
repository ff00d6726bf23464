"""The one place that knows how the installed transformers hands a cache to a model.

transformers renames things between minor releases: 5.24 took the forward keyword `past_key_values` to `cache`
(the old name is deprecated until 5.40). Everything hf-scd passes to a model, and every message that blames the
installed version, goes through here, so the next rename is one edit and one failing test, not a silent empty cache.
"""

from __future__ import annotations

import inspect

import transformers
from torch import nn

from .errors import CacheStateError, UnsupportedModelError

# The oldest release CI tests and the newest one it was last green on; pyproject.toml allows >=5.4,<6.
OLDEST_TESTED = "5.4.0"
NEWEST_TESTED = "5.25.0"
CACHE_KEYWORDS = ("cache", "past_key_values")  # newest spelling first


def cache_keyword(model: nn.Module) -> str:
    """The keyword this model's forward takes its cache by: `cache` on transformers 5.24+, `past_key_values` before.

    Read off the forward's signature rather than the version number, so a backport or a model class that moves
    early or late is still called the way it expects."""
    parameters = inspect.signature(model.forward).parameters
    for keyword in CACHE_KEYWORDS:
        if keyword in parameters:
            return keyword
    raise UnsupportedModelError(
        f"{type(model).__name__}.forward takes none of {CACHE_KEYWORDS}, so it cannot be handed a cache. "
        + supported_versions()
    )


def with_cache(model: nn.Module, cache) -> dict:
    """`{keyword: cache}` for `model(**inputs, **with_cache(model, cache))` or `model.generate(...)`."""
    return {cache_keyword(model): cache}


def supported_versions() -> str:
    return (
        f"hf-scd is tested on transformers {OLDEST_TESTED} to {NEWEST_TESTED}; this is transformers "
        f"{transformers.__version__}."
    )


def integration_error(what: str) -> CacheStateError:
    """A loud error for transformers calling the cache in a way hf-scd does not recognise."""
    return CacheStateError(f"{what} {supported_versions()}")
