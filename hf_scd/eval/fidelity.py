"""The fidelity protocol (DESIGN.md §4), for any ``Transfer``: always measured against the oracle.

The oracle is the consumer model prefilling the whole prompt itself. A method prefills the prefix on
its producer (the consumer itself, or a model with other weights), ships it, and the consumer continues
from the shipped cache. Teacher-forced scores
compare next-token distributions on real held-out text; QA scores compare greedy answers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ..arch import ModelHandle
from ..compat import with_cache
from .corpus import evaluation_texts, token_documents
from .metrics import mean_nll, next_token_kl, top1_agreement
from .qa import QAItem, qa_items, qa_prompt_split, token_f1
from .transfer import Transfer


def teacher_forced_scores_many(
    model, methods: Sequence[Transfer], docs: list[list[int]], prefix_len: int, cont_len: int, batch_size: int = 4
) -> dict[str, dict[str, float]]:
    """Teacher-forced scores of several methods, sharing one oracle forward per batch of documents.

    Each doc contributes its first ``prefix_len`` tokens as the shipped prefix and the next ``cont_len``
    as the continuation. Scored positions are those predicting ``cont[1:]``: the logit for ``cont[0]``
    comes from the last prefix position, which the producer computes during prefill whatever is
    shipped, so it says nothing about the transfer. The oracle runs prefix+continuation in one forward;
    a method runs the continuation on the cache it returns. Returns per method: kl, top1, nll_oracle,
    nll_method, dnll and bytes_per_token (wire bytes / prefix tokens).
    """
    if any(len(doc) < prefix_len + cont_len for doc in docs):
        raise ValueError(f"every doc needs at least prefix_len + cont_len = {prefix_len + cont_len} tokens")
    sums = {m.name: dict.fromkeys(("kl", "top1", "nll_oracle", "nll_method", "bytes"), 0.0) for m in methods}
    positions = 0
    device = model.device
    with torch.inference_mode():
        for start in tqdm(range(0, len(docs), batch_size), desc="teacher-forced", unit="batch"):
            batch = [doc[: prefix_len + cont_len] for doc in docs[start : start + batch_size]]
            ids = torch.tensor(batch, device=device)
            prefix, cont = ids[:, :prefix_len], ids[:, prefix_len:]
            targets = cont[:, 1:]
            oracle = model(input_ids=ids, logits_to_keep=cont_len).logits[:, :-1].float()
            count = targets.numel()
            positions += count
            nll_oracle = mean_nll(oracle, targets)
            for method in methods:
                cache, nbytes = method.transfer(model, prefix, None)
                logits = (
                    model(input_ids=cont, **with_cache(model, cache), logits_to_keep=cont_len).logits[:, :-1].float()
                )
                acc = sums[method.name]
                acc["kl"] += next_token_kl(oracle, logits) * count
                acc["top1"] += top1_agreement(oracle, logits) * count
                acc["nll_oracle"] += nll_oracle * count
                acc["nll_method"] += mean_nll(logits, targets) * count
                acc["bytes"] += nbytes
    results = {}
    for name, acc in sums.items():
        scores = {key: acc[key] / positions for key in ("kl", "top1", "nll_oracle", "nll_method")}
        scores["dnll"] = scores["nll_method"] - scores["nll_oracle"]
        scores["bytes_per_token"] = acc["bytes"] / (len(docs) * prefix_len)
        results[name] = scores
    return results


def teacher_forced_scores(
    model, method: Transfer, docs: list[list[int]], prefix_len: int, cont_len: int, batch_size: int = 4
) -> dict[str, float]:
    """Teacher-forced scores of one method; see ``teacher_forced_scores_many``."""
    return teacher_forced_scores_many(model, [method], docs, prefix_len, cont_len, batch_size)[method.name]


def _qa_batches(tokenizer, items: Sequence[QAItem], batch_size: int) -> list[list[tuple[int, list[int], list[int]]]]:
    """Batches of (index, prefix, suffix) whose suffixes have equal length.

    Left-padding the prefixes then aligns every row's suffix, so the cache covers exactly the
    prefixes and no padding ends up between prefix and suffix.
    """
    split = [(i, *qa_prompt_split(tokenizer, item)) for i, item in enumerate(items)]
    split.sort(key=lambda row: (len(row[2]), len(row[1]), row[0]))
    batches: list[list[tuple[int, list[int], list[int]]]] = []
    for row in split:
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and len(last[0][2]) == len(row[2]):
            last.append(row)
        else:
            batches.append([row])
    return batches


def _generate_answers(
    model,
    tokenizer,
    items: Sequence[QAItem],
    method: Transfer | None,
    max_new_tokens: int,
    batch_size: int,
    desc: str,
) -> list[str]:
    """Greedy answers (first line) to each item, continuing from ``method``'s shipped prefix or, if None, the oracle."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = [""] * len(items)
    device = model.device
    with torch.inference_mode():
        for batch in tqdm(_qa_batches(tokenizer, items, batch_size), desc=desc, unit="batch"):
            width = max(len(prefix) for _, prefix, _ in batch)
            prefix_ids = torch.tensor([[pad] * (width - len(p)) + p for _, p, _ in batch], device=device)
            prefix_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for _, p, _ in batch], device=device)
            suffix_ids = torch.tensor([s for _, _, s in batch], device=device)
            input_ids = torch.cat([prefix_ids, suffix_ids], dim=1)
            attention_mask = torch.cat([prefix_mask, torch.ones_like(suffix_ids)], dim=1)
            kwargs = {}
            if method is not None:
                kwargs = with_cache(model, method.transfer(model, prefix_ids, prefix_mask)[0])
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
                **kwargs,
            )
            texts = tokenizer.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True)
            for (index, _, _), text in zip(batch, texts, strict=True):
                answers[index] = text.strip().split("\n")[0].strip()
    return answers


def oracle_answers(
    model, tokenizer, items: Sequence[QAItem], max_new_tokens: int = 12, batch_size: int = 8
) -> list[str]:
    """The consumer's own greedy answers on the full prompts: the reference for agreement F1."""
    return _generate_answers(model, tokenizer, items, None, max_new_tokens, batch_size, "qa oracle")


def qa_scores(
    model,
    tokenizer,
    method: Transfer,
    items: Sequence[QAItem],
    max_new_tokens: int = 12,
    batch_size: int = 8,
    oracle: Sequence[str] | None = None,
) -> dict[str, float]:
    """Mean token F1 of the method's answers vs gold (f1_gold) and vs the oracle's answers (f1_agree).

    Also returns the oracle's own gold F1 (oracle_f1_gold): gold F1 only means something if the model
    can do the task. Pass ``oracle`` (from ``oracle_answers``) to reuse it across methods.
    """
    if oracle is None:
        oracle = oracle_answers(model, tokenizer, items, max_new_tokens, batch_size)
    answers = _generate_answers(model, tokenizer, items, method, max_new_tokens, batch_size, f"qa {method.name}")
    n = len(items)
    return {
        "f1_gold": sum(token_f1(a, item.answer) for a, item in zip(answers, items, strict=True)) / n,
        "f1_agree": sum(token_f1(a, o) for a, o in zip(answers, oracle, strict=True)) / n,
        "oracle_f1_gold": sum(token_f1(o, item.answer) for o, item in zip(oracle, items, strict=True)) / n,
    }


@dataclass
class Row:
    """One line of the fidelity table; ``nan`` where a part of the protocol was not run."""

    method: str
    bytes_per_token: float
    ratio_vs_bf16: float
    kl: float
    top1: float
    dnll: float
    f1_gold: float
    f1_agree: float
    # Cross-variant: the consumer's work to get its cache, relative to prefilling the prefix itself.
    consumer_flops_vs_prefill: float = math.nan
    consumer_time_vs_prefill: float = math.nan

    def to_json(self) -> dict:
        """The row as a JSON object; parts of the protocol that were not run are null (JSON has no NaN)."""
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(self).items()}


def run_fidelity(
    model,
    tokenizer,
    methods: Sequence[Transfer],
    n_docs: int = 16,
    prefix_len: int = 512,
    cont_len: int = 256,
    n_questions: int = 200,
    batch_size: int = 4,
    qa_batch_size: int = 8,
    max_new_tokens: int = 12,
    seed: int = 0,
) -> list[Row]:
    """The whole protocol for each method, plus a first ``oracle`` row (re-prefill: nothing shipped).

    ``model`` is the consumer: the oracle, and the model every method's cache is rebuilt for. Oracle
    logits and answers are computed once and shared by all methods.
    """
    if len({m.name for m in methods}) != len(methods):
        raise ValueError("method names must be distinct: they key the results")
    nan = math.nan
    tf: dict[str, dict[str, float]] = {}
    if n_docs:
        docs = token_documents(tokenizer, evaluation_texts(), prefix_len + cont_len)
        if len(docs) < n_docs:
            raise ValueError(f"only {len(docs)} evaluation documents have {prefix_len + cont_len} tokens")
        tf = teacher_forced_scores_many(model, methods, docs[:n_docs], prefix_len, cont_len, batch_size)
    qa: dict[str, dict[str, float]] = {}
    oracle_f1 = nan
    if n_questions:
        items = qa_items(n_questions, seed)
        oracle = oracle_answers(model, tokenizer, items, max_new_tokens, qa_batch_size)
        for method in methods:
            qa[method.name] = qa_scores(model, tokenizer, method, items, max_new_tokens, qa_batch_size, oracle)
            oracle_f1 = qa[method.name]["oracle_f1_gold"]
    raw = ModelHandle(model).shape.bf16_bytes_per_token()
    exact = (0.0, 1.0, 0.0) if n_docs else (nan, nan, nan)
    rows = [Row("oracle", nan, nan, *exact, oracle_f1, 1.0 if n_questions else nan)]
    for method in methods:
        t = tf.get(method.name, {})
        q = qa.get(method.name, {})
        bpt = t.get("bytes_per_token", nan)
        rows.append(
            Row(
                method=method.name,
                bytes_per_token=bpt,
                ratio_vs_bf16=raw / bpt if bpt > 0 else nan,
                kl=t.get("kl", nan),
                top1=t.get("top1", nan),
                dnll=t.get("dnll", nan),
                f1_gold=q.get("f1_gold", nan),
                f1_agree=q.get("f1_agree", nan),
            )
        )
    return rows


def _cell(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if 0 < abs(value) < 1e-3:  # near-lossless methods: keep their KL/ΔNLL visible
            return f"{value:.1e}"
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.4f}"
    return str(value)


def format_table(rows: Sequence[Row]) -> str:
    """A markdown table of the rows, one column per ``Row`` field."""
    if not rows:
        return ""
    header = list(asdict(rows[0]))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in asdict(row).values()) + " |" for row in rows]
    return "\n".join(lines)
