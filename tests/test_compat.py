"""How transformers hands SCDCache its forwards: both cache keywords, a loud error when recording sees nothing, and a
weight fingerprint computed once per model. Runs on the newest transformers and on the oldest supported (5.4.0)."""

import copy
import warnings

import pytest
import torch
import transformers

from hf_scd import ArtifactMismatchError, CacheStateError, SCDCache, SCDPayload, arch
from hf_scd.compat import CACHE_KEYWORDS, OLDEST_TESTED, cache_keyword

NEAR_LOSSLESS = "2.5x"


def _call(fn, keyword: str, cache, *args, **kwargs):
    """Call with the cache under `keyword`; an older spelling than the model's own warns (deprecated), and is
    checked to still work."""
    if keyword == cache_keyword(getattr(fn, "__self__", fn)):
        return fn(*args, **{keyword: cache}, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return fn(*args, **{keyword: cache}, **kwargs)


@pytest.mark.parametrize("keyword", CACHE_KEYWORDS)
@torch.inference_mode()
def test_either_keyword_records_ships_and_continues_like_the_oracle(smollm2, artifacts, chat_ids, keyword):
    """`model(..., cache=c)` / `generate(cache=c)` (5.24+) and `past_key_values=c` (all releases) both record the
    prompt, and the shipped cache continues greedy generation exactly as the oracle does."""
    model, tokenizer = smollm2
    if keyword == "cache" and cache_keyword(model) != "cache":
        pytest.skip(f"transformers {transformers.__version__} takes the cache as past_key_values only")
    prefix = chat_ids[:, :-1]
    producer = SCDCache(artifacts, model, point=NEAR_LOSSLESS)
    _call(model, keyword, producer, prefix)
    assert producer.record is not None and producer.input_ids.tolist() == prefix.tolist()
    consumer = SCDCache.from_payload(SCDPayload.from_bytes(producer.encode().to_bytes()), artifacts, model)
    out = _call(model.generate, keyword, consumer, chat_ids, max_new_tokens=16, do_sample=False)
    oracle = model.generate(chat_ids, max_new_tokens=16, do_sample=False)
    assert tokenizer.decode(out[0]) == tokenizer.decode(oracle[0])
    # generate() kept recording: the rebuilt cache now holds the prompt and the generated tokens but the last.
    assert consumer.input_ids.tolist() == out[:, :-1].tolist()


def _names_the_versions(error: pytest.ExceptionInfo) -> None:
    message = str(error.value)
    assert transformers.__version__ in message and OLDEST_TESTED in message


@torch.inference_mode()
def test_a_forward_the_hooks_did_not_see_is_a_loud_error(smollm2, artifacts, chat_ids):
    """If transformers runs the attention layers in a way SCDCache's hooks do not see (here: the cache goes to a copy
    of its model with every hook taken off), the first `update()` raises instead of recording nothing."""
    model, _ = smollm2
    cache = SCDCache(artifacts, model)
    unobserved = copy.deepcopy(model)
    for module in unobserved.modules():
        module._forward_pre_hooks.clear()
        module._forward_hooks.clear()
    with pytest.raises(CacheStateError, match="saw no rotary positions") as error:
        unobserved(chat_ids, **{cache_keyword(model): cache})
    _names_the_versions(error)


@torch.inference_mode()
def test_layers_filled_without_update_are_a_loud_error(smollm2, artifacts):
    """A cache whose layers were written without `Cache.update()` has tokens nothing recorded: encode() says so."""
    model, _ = smollm2
    cache = SCDCache(artifacts, model)
    for layer in cache.layers:
        layer.update(torch.zeros(1, 3, 5, 64), torch.zeros(1, 3, 5, 64))
    with pytest.raises(CacheStateError, match="never saw") as error:
        cache.encode()
    _names_the_versions(error)


@torch.no_grad()
def test_weight_fingerprint_is_computed_once_per_model_until_the_weights_change(smollm2, artifacts, monkeypatch):
    model, _ = smollm2
    model = copy.deepcopy(model)  # a model object no other test has fingerprinted
    calls = []
    real = arch.model_fingerprint
    monkeypatch.setattr(arch, "model_fingerprint", lambda m: calls.append(m) or real(m))
    for _ in range(3):
        SCDCache(artifacts, model)
    assert len(calls) == 1
    weight = model.model.layers[5].mlp.down_proj.weight
    fitted = weight.clone()
    weight.mul_(1.5)  # an in-place change of the weights is seen: the fingerprint is recomputed, and refused
    with pytest.raises(ArtifactMismatchError, match="weights differ"):
        SCDCache(artifacts, model, strict=True)  # (the codes fit them: the fit probe would accept them)
    assert len(calls) == 2
    weight.copy_(fitted)
    SCDCache(artifacts, model)
    assert len(calls) == 3
