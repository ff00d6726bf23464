"""Fast checks of the evaluation parts: corpus, QA set, metrics, baselines and the fidelity runner.

Real-model checks use short inputs on SmolLM2-135M; the batching and byte-count checks use a tiny
randomly initialised Llama (fp32), where exact agreement is expected and the shapes are known.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_scd.eval import (
    KIVI,
    Int8KV,
    ProducerKV,
    QAItem,
    RawKV,
    Recompute,
    calibration_texts,
    evaluation_texts,
    format_table,
    mean_nll,
    next_token_kl,
    qa_items,
    qa_prompt_split,
    run_fidelity,
    teacher_forced_scores,
    token_documents,
    token_f1,
    top1_agreement,
)
from hf_scd.eval.fidelity import oracle_answers, qa_scores
from hf_scd.models import load_model
from hf_scd.prefill import prefill


@pytest.fixture(scope="module")
def real():
    return load_model("default")


@pytest.fixture(scope="module")
def tiny(real):
    """A 2-layer random Llama sharing the real tokenizer: 2 KV heads of 64 dims."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(real[1]),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        pad_token_id=real[1].pad_token_id,
        initializer_range=0.3,
    )
    return LlamaForCausalLM(config).eval(), real[1]


def _shingles(text: str) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i : i + 12]) for i in range(len(words) - 11)}


# corpus


def test_corpus_sizes_deterministic_and_disjoint():
    calibration, evaluation = calibration_texts(), evaluation_texts()
    assert len(calibration) >= 150 and sum(map(len, calibration)) >= 150_000
    assert all(len(doc) >= 400 for doc in calibration)
    assert len(evaluation) >= 30 and all(len(doc) >= 1500 for doc in evaluation)
    assert len(set(calibration)) == len(calibration) and len(set(evaluation)) == len(evaluation)
    assert calibration == calibration_texts() and evaluation == evaluation_texts()
    seen = set().union(*map(_shingles, calibration))
    assert not any(_shingles(doc) & seen for doc in evaluation)


def test_token_documents_filters_by_length(real):
    tokenizer = real[1]
    docs = token_documents(tokenizer, ["short text", evaluation_texts()[0]], min_tokens=50)
    assert len(docs) == 1 and docs[0] == tokenizer(evaluation_texts()[0], add_special_tokens=False)["input_ids"]
    assert len(token_documents(tokenizer, evaluation_texts(), 768)) >= 16


# QA


def test_qa_items_are_deterministic_and_well_formed():
    items = qa_items(200, seed=0)
    assert len(items) == 200 and items == qa_items(200, seed=0) and items != qa_items(200, seed=1)
    for item in items:
        people = re.findall(r"(\w+) lives in (\w+)\.", item.passage)
        names, cities = zip(*people, strict=True)
        assert 4 <= len(people) <= 6 and len(set(names)) == len(names) and len(set(cities)) == len(cities)
        name = re.fullmatch(r"In which city does (\w+) live\?", item.question).group(1)
        assert dict(people)[name] == item.answer


def test_qa_prompt_split_matches_whole_prompt(real):
    tokenizer = real[1]
    for item in qa_items(40, seed=3):
        prefix, suffix = qa_prompt_split(tokenizer, item)
        messages = [
            {
                "role": "user",
                "content": f"Read the passage and answer with the city name only.\n\n{item.passage}\n\n"
                f"Question: {item.question}",
            }
        ]
        whole = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
        assert prefix + suffix == whole
        assert tokenizer.decode(prefix).endswith(item.passage[-10:]) and item.question in tokenizer.decode(suffix)


def test_qa_prompt_split_moves_before_a_merged_boundary(real):
    tokenizer = real[1]
    item = QAItem("Alice lives in Oslo. ", "Q?", "Oslo")  # the trailing space merges with the "\n" after it
    prefix, suffix = qa_prompt_split(tokenizer, item)
    content = f"Read the passage and answer with the city name only.\n\n{item.passage}\n\nQuestion: Q?"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    head = tokenizer(text[: text.index(item.passage) + len(item.passage)], add_special_tokens=False)["input_ids"]
    assert prefix + suffix == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert head[: len(prefix)] == prefix and len(prefix) == len(head) - 1
    assert tokenizer.decode(prefix).endswith("Oslo.") and tokenizer.decode(suffix).startswith(" \n")


def test_token_f1_squad_normalisation():
    assert token_f1("Lisbon", "Lisbon") == 1.0
    assert token_f1("The lisbon.", "Lisbon") == 1.0
    assert token_f1("New York City", "york") == pytest.approx(0.5)
    assert token_f1("Oslo", "Lisbon") == 0.0
    assert token_f1("", "Lisbon") == 0.0 and token_f1("", "") == 1.0


# metrics


def test_metrics_on_hand_made_logits():
    logits = torch.randn(5, 7)
    assert next_token_kl(logits, logits) == pytest.approx(0.0, abs=1e-12)
    assert next_token_kl(logits, logits + 3.0) == pytest.approx(0.0, abs=1e-12)  # shift-invariant
    assert top1_agreement(logits, logits) == 1.0
    p, q = torch.tensor([[0.9, 0.1]]), torch.tensor([[0.5, 0.5]])
    expected = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert next_token_kl(p.log(), q.log()) == pytest.approx(expected, rel=1e-6)
    assert next_token_kl(q.log(), p.log()) != pytest.approx(expected, rel=1e-3)  # direction matters
    assert top1_agreement(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])) == 0.5
    assert mean_nll(torch.zeros(3, 10), torch.tensor([1, 2, 3])) == pytest.approx(math.log(10))
    assert mean_nll(p.log(), torch.tensor([0])) == pytest.approx(-math.log(0.9), rel=1e-6)


# baselines


def test_baselines_are_named_after_their_coder_unless_told(tiny):
    model, _ = tiny
    coders = [RawKV(), Int8KV(), KIVI(bits=4, group_size=32), KIVI(bits=2, group_size=32)]
    assert [ProducerKV(model, c).name for c in coders] == ["bf16", "int8", "kivi-int4", "kivi-int2"]
    assert ProducerKV(model, RawKV(), "reuse-bf16").name == "reuse-bf16"


def test_exact_byte_counts_for_a_known_shape(tiny):
    model, _ = tiny
    # Row 0: 40 real tokens after 8 pads; row 1: 48 real tokens. 2 layers x 2 KV heads x 64 dims.
    ids = torch.randint(3, 1000, (2, 48))
    mask = torch.ones_like(ids)
    mask[0, :8] = 0
    tokens, elements = 88, 88 * 2 * 64  # per layer and per K or V
    expected = {
        "bf16": 2 * 2 * elements * 2,
        "int8": 2 * 2 * (elements + tokens * 2 * 2),
        # keys: per channel over token groups (row 0: 32+8, row 1: 32+16 -> 4 groups per channel);
        # values: per token over 2 groups of 32 channels; 4 bytes of fp16 scale+zero per group.
        "kivi-int4": 2 * ((elements // 2 + 4 * 2 * 64 * 4) + (elements // 2 + tokens * 2 * 2 * 4)),
        "kivi-int2": 2 * ((elements // 4 + 4 * 2 * 64 * 4) + (elements // 4 + tokens * 2 * 2 * 4)),
    }
    with torch.inference_mode():
        for method in (ProducerKV(model, coder) for coder in (RawKV(), Int8KV(), KIVI(4), KIVI(2))):
            cache, nbytes = method.transfer(model, ids, mask)
            assert nbytes == expected[method.name], method.name
            assert cache.get_seq_length() == 48
            assert torch.all(cache.layers[0].keys[0, :, :8] == 0)  # padding is not shipped


def test_reconstruction_error_orders_int8_kivi4_kivi2(real):
    model, tokenizer = real
    ids = torch.tensor([tokenizer(evaluation_texts()[1], add_special_tokens=False)["input_ids"][:48]])
    with torch.inference_mode():
        producer = prefill(model, ids, None)
        errors = {}
        for coder in (RawKV(), Int8KV(), KIVI(4), KIVI(2)):
            layers, _ = coder.roundtrip_layers(producer, None)
            num = den = 0.0
            for ref, (keys, values) in zip(producer.layers, layers, strict=True):
                for a, b in ((ref.keys, keys), (ref.values, values)):
                    num += (a.float() - b.float()).pow(2).sum().item()
                    den += a.float().pow(2).sum().item()
            errors[coder.name] = math.sqrt(num / den)
    # The model runs in fp32 on CPU, so shipping bf16 costs bf16 rounding (relative error <= 2**-8) and no more.
    assert 0 < errors["bf16"] < 2**-8 < errors["int8"] < errors["kivi-int4"] < errors["kivi-int2"] < 1.0


def test_teacher_forced_raw_bf16_is_near_exact(real):
    model, tokenizer = real
    docs = token_documents(tokenizer, evaluation_texts(), 48)[:2]
    raw = teacher_forced_scores(model, ProducerKV(model, RawKV()), docs, prefix_len=32, cont_len=16, batch_size=2)
    # fp32 model, bf16 on the wire: only rounding separates it from the oracle.
    assert raw["kl"] < 1e-4 and raw["top1"] >= 0.95
    assert raw["dnll"] == pytest.approx(0.0, abs=5e-3) and 1.0 < raw["nll_oracle"] < 8.0
    assert raw["bytes_per_token"] == 2 * 30 * 3 * 64 * 2


# runner (tiny model: fast, and exact agreement is expected in fp32)


def test_left_padded_qa_batches_match_unbatched(tiny):
    model, tokenizer = tiny
    items = qa_items(5, seed=5)
    single = oracle_answers(model, tokenizer, items, max_new_tokens=3, batch_size=1)
    batched = oracle_answers(model, tokenizer, items, max_new_tokens=3, batch_size=5)
    assert all(single) and batched == single
    # Re-prefilling the shipped prefix is lossless: any disagreement with the oracle is a bug in the plumbing.
    scores = qa_scores(model, tokenizer, Recompute(model), items, max_new_tokens=3, batch_size=5, oracle=single)
    assert scores["f1_agree"] == 1.0


def test_run_fidelity_rows_and_table(tiny):
    model, tokenizer = tiny
    methods = [ProducerKV(model, RawKV()), ProducerKV(model, Int8KV())]
    rows = run_fidelity(
        model, tokenizer, methods, n_docs=2, prefix_len=32, cont_len=16, n_questions=2, max_new_tokens=3
    )
    assert [row.method for row in rows] == ["oracle", "bf16", "int8"]
    assert rows[1].ratio_vs_bf16 == 1.0 and rows[2].ratio_vs_bf16 == pytest.approx(128 / 66)
    assert rows[0].f1_agree == 1.0 and 0.0 <= rows[2].f1_agree <= 1.0
    table = format_table(rows)
    assert table.count("\n") == 4 and "| int8 |" in table


def test_droidspeak_ranks_layers_by_the_pairs_calibration_report_per_layer_or_per_unit():
    """A unit of several layers shares its naive-reuse error among its layers; format-4 reports have a row per
    layer."""
    from types import SimpleNamespace

    from hf_scd.eval.droidspeak import critical_layers

    def artifacts(rows):
        return SimpleNamespace(config=SimpleNamespace(calibration={"layers": rows}))

    per_unit = [{"layers": [0, 1, 2], "naive": 0.9}, {"layers": [3, 4, 5], "naive": 1.2}, {"layers": [6], "naive": 0.5}]
    assert critical_layers(artifacts(per_unit), 4) == [3, 4, 5, 6]  # 0.5 alone, then 0.4 each, before 0.3
    per_layer = [{"layer": 0, "naive": 0.1}, {"layer": 1, "naive": 0.7}, {"layer": 2, "naive": 0.3}]
    assert critical_layers(artifacts(per_layer), 2) == [1, 2]
