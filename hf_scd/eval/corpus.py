"""Real English text that every Python install ships, split so calibration never sees evaluation text.

No dataset hub is reachable on our machines, and fitted bases must be judged on text they were not
fitted on. Both splits come from the Python distribution itself (PSF license): calibration uses the
docstrings of pure-Python standard-library modules, evaluation the language-reference sections in
``pydoc_data.topics``. The two sources quote each other now and then, so evaluation paragraphs that
share any 12-word shingle with calibration text are dropped.
"""

from __future__ import annotations

import importlib
import inspect
import re
import warnings
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pydoc_data.topics import topics

SHINGLE_WORDS = 12
MIN_CALIBRATION_CHARS = 400
MIN_EVALUATION_CHARS = 1500

# Pure-Python modules present in every CPython from 3.10 to 3.13 (none deprecated for removal).
CALIBRATION_MODULES: tuple[str, ...] = (
    "abc", "argparse", "base64", "bisect", "calendar", "collections", "configparser", "contextlib",
    "copy", "csv", "dataclasses", "difflib", "email.message", "enum", "fractions", "ftplib",
    "functools", "gettext", "glob", "gzip", "heapq", "hmac", "html.parser", "http.client",
    "http.cookiejar", "ipaddress", "json", "logging", "mailbox", "optparse", "pathlib", "pickle",
    "pprint", "queue", "random", "shlex", "shutil", "smtplib", "statistics", "string", "subprocess",
    "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "traceback", "typing",
    "unittest", "urllib.parse", "uuid", "warnings", "zipfile",
)  # fmt: skip


def _public_objects(module) -> list[object]:
    """The module, its public members defined in it, and those classes' own public methods."""
    objects: list[object] = [module]
    for name, member in inspect.getmembers(module):
        if name.startswith("_") or getattr(member, "__module__", None) != module.__name__:
            continue
        objects.append(member)
        if inspect.isclass(member):
            for method_name, method in inspect.getmembers(member, inspect.isfunction):
                if not method_name.startswith("_") and method.__qualname__.startswith(member.__qualname__ + "."):
                    objects.append(method)
    return objects


def _dedupe(texts: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(texts))


def shingles(text: str, n: int = SHINGLE_WORDS) -> set[str]:
    """Lower-cased n-word windows: a cheap fingerprint of passages that two texts share."""
    words = re.findall(r"\w+", text.lower())
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


@lru_cache(maxsize=1)
def _calibration() -> tuple[str, ...]:
    docs = []
    with warnings.catch_warnings():  # walking modules touches deprecated aliases such as typing.io
        warnings.simplefilter("ignore", DeprecationWarning)
        for module_name in CALIBRATION_MODULES:
            for obj in _public_objects(importlib.import_module(module_name)):
                doc = inspect.getdoc(obj)
                if doc and len(doc) >= MIN_CALIBRATION_CHARS:
                    docs.append(doc)
    return tuple(_dedupe(docs))


@lru_cache(maxsize=1)
def _evaluation() -> tuple[str, ...]:
    seen: set[str] = set()
    for doc in _calibration():
        seen |= shingles(doc)
    docs = []
    for key in sorted(topics):
        paragraphs = [p for p in topics[key].split("\n\n") if not shingles(p) & seen]
        doc = "\n\n".join(paragraphs).strip()
        # Joining kept paragraphs makes new windows across the seams; re-check the whole section.
        if len(doc) >= MIN_EVALUATION_CHARS and not shingles(doc) & seen:
            docs.append(doc)
    return tuple(_dedupe(docs))


def calibration_texts() -> list[str]:
    """Standard-library docstrings (≥ 400 chars, deduplicated, fixed order) to fit bases on."""
    return list(_calibration())


def evaluation_texts() -> list[str]:
    """Language-reference sections (≥ 1500 chars, sorted by topic) sharing no 12-word shingle with calibration."""
    return list(_evaluation())


def token_documents(tokenizer, texts: Sequence[str], min_tokens: int) -> list[list[int]]:
    """Token ids of each text (no special tokens), keeping only texts at least ``min_tokens`` long."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [list(doc) for doc in ids if len(doc) >= min_tokens]


def calibration_documents(tokenizer, texts: Sequence[str], tokens: int, doc_tokens: int) -> list[list[int]]:
    """Token ids of the texts of at least 128 tokens, each cut to ``doc_tokens``, in order until ``tokens`` in all
    (the last one cut to fit): what a fit runs the model over."""
    budget, documents = tokens, []
    for doc in token_documents(tokenizer, texts, 128):
        if budget <= 0:
            break
        documents.append(doc[: min(doc_tokens, budget)])
        budget -= len(documents[-1])
    return documents


def validation_documents(tokenizer, prefix: int, count: int) -> list[list[int]]:
    """What calibration validates on: the *last* `count` evaluation documents with `prefix` + 256 tokens, cut to
    that length (`hf-scd eval` reads from the first ones)."""
    length = prefix + 256
    return [doc[:length] for doc in token_documents(tokenizer, evaluation_texts(), length)][-count:]
