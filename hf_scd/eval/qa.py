"""Synthetic extractive QA: "In which city does X live?" over short passages about 4–6 people.

Why synthetic: no QA dataset is reachable offline, and the answer must sit in the shipped prefix,
so a compressed cache that loses it shows up as a wrong city. Each passage also states jobs and
hobbies so the model has to pick the right fact about the right person.
"""

from __future__ import annotations

import random
import re
import string
from collections import Counter
from dataclasses import dataclass

FIRST_NAMES = (
    "Alice", "Bruno", "Chloe", "Daniel", "Elena", "Farid", "Grace", "Hugo", "Ingrid", "Jonas",
    "Keiko", "Liam", "Maya", "Nikolai", "Olivia", "Pablo", "Quinn", "Rosa", "Samuel", "Tara",
    "Umar", "Vera", "Walter", "Ximena", "Yusuf", "Zoe", "Amara", "Boris", "Carmen", "Dmitri",
)  # fmt: skip
CITIES = (
    "Lisbon", "Oslo", "Nairobi", "Toronto", "Madrid", "Prague", "Dublin", "Cairo", "Lima", "Seoul",
    "Vienna", "Athens", "Warsaw", "Helsinki", "Mumbai", "Sydney", "Chicago", "Bogota", "Manila", "Zurich",
    "Berlin", "Tokyo", "Havana", "Denver", "Budapest", "Marseille", "Osaka", "Montreal", "Santiago", "Edinburgh",
)  # fmt: skip
JOBS = (
    "a nurse", "an architect", "a baker", "a pilot", "a teacher", "a plumber", "an accountant", "a chemist",
    "a journalist", "a carpenter", "a librarian", "an electrician", "a dentist", "a translator", "a gardener",
)  # fmt: skip
HOBBIES = (
    "painting", "chess", "rock climbing", "baking bread", "playing the cello", "birdwatching", "sailing",
    "knitting", "photography", "running marathons", "pottery", "gardening", "playing tennis", "astronomy",
)  # fmt: skip

INSTRUCTION = "Read the passage and answer with the city name only."


@dataclass(frozen=True)
class QAItem:
    """One question; ``answer`` is the gold city and always appears verbatim in ``passage``."""

    passage: str
    question: str
    answer: str


def _person_sentences(rng: random.Random, name: str, city: str) -> list[str]:
    distractors = [f"{name} works as {rng.choice(JOBS)}.", f"{name} enjoys {rng.choice(HOBBIES)} in the evenings."]
    sentences = [f"{name} lives in {city}.", *rng.sample(distractors, rng.randint(1, 2))]
    rng.shuffle(sentences)
    return sentences


def qa_items(n: int = 200, seed: int = 0) -> list[QAItem]:
    """``n`` deterministic items; names and cities are distinct within each passage."""
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        count = rng.randint(4, 6)
        names = rng.sample(FIRST_NAMES, count)
        cities = rng.sample(CITIES, count)
        sentences = [s for name, city in zip(names, cities, strict=True) for s in _person_sentences(rng, name, city)]
        passage = " ".join(sentences)
        target = rng.randrange(count)
        items.append(QAItem(passage, f"In which city does {names[target]} live?", cities[target]))
    return items


def _chat_text(tokenizer, item: QAItem) -> str:
    content = f"{INSTRUCTION}\n\n{item.passage}\n\nQuestion: {item.question}"
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )


def qa_prompt_split(tokenizer, item: QAItem) -> tuple[list[int], list[int]]:
    """(prefix_ids, suffix_ids) of the chat prompt; the prefix ends with the passage and is what gets shipped.

    The whole prompt is tokenized once, so ``prefix + suffix`` is exactly that tokenization. Where the
    tokenizer merges across the passage end, the split moves earlier to the last shared token boundary.
    """
    text = _chat_text(tokenizer, item)
    cut = text.index(item.passage) + len(item.passage)
    full = tokenizer(text, add_special_tokens=False)["input_ids"]
    head = tokenizer(text[:cut], add_special_tokens=False)["input_ids"]
    split = 0
    while split < min(len(head), len(full)) and head[split] == full[split]:
        split += 1
    return list(full[:split]), list(full[split:])


def _normalize(text: str) -> list[str]:
    """SQuAD normalization: lowercase, drop punctuation and articles, split on whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style token F1; two empty answers agree (1.0), one empty answer scores 0."""
    pred, ref = _normalize(prediction), _normalize(reference)
    if not pred or not ref:
        return float(pred == ref)
    overlap = sum((Counter(pred) & Counter(ref)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)
