"""The per-request fidelity check: the map in the artifacts' config, the choice of point for a `max_kl`, the exact
bf16 point it falls back to, the prediction a payload carries, and (on the real model) that predictions track the KL
the consumer really pays."""

import inspect
import json
import math
import sched
import struct
import zlib
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load, save
from transformers import MistralConfig, MistralForCausalLM

from hf_scd import ArtifactError, CacheStateError, CorruptPayloadError, OperatingPointError, SCDCache, SCDPayload
from hf_scd.calibrate import calibrate
from hf_scd.calibrate.fidelity import continuation_of, fit_log_line
from hf_scd.calibrate.plan import Measurement
from hf_scd.compat import with_cache
from hf_scd.eval.metrics import next_token_kl
from hf_scd.fidelity import TailProbe
from hf_scd.payload import _HEADER, FORMAT_VERSION, MAGIC, METADATA_KEY, PayloadHead
from hf_scd.schema import EXACT_POINT, LEGACY_MAP_CONTINUATION, ArtifactsConfig, FidelityMap, TailLine
from hf_scd.transport import receive_cache
from hf_scd.transport.links import ChunkLink
from hf_scd.transport.stream import CacheSender

# Three layers, so a point's choice weighs more than one layer's error.
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def tiny():
    """A tiny random model, its artifacts at 2x / 4x / 8x, and a hand-made map (predicted KL = D) to check with."""
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**TINY, vocab_size=200, max_position_embeddings=256)).eval()
    docs = torch.randint(0, 200, (6, 96), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.inference_mode():
        artifacts = calibrate(
            model, docs[:4], docs[4:], model_name="tiny", ratios=(2, 4, 8), validation_prefix=64,
            weigh_layers=False, progress=False,
        )  # fmt: skip
    identity = FidelityMap(
        query_energy=tuple(tuple((1.0,) * 16 for _ in range(2)) for _ in range(3)),
        layer_weights=((1.0, 1.0),) * 3,
        slope=1.0,
        intercept=0.0,
        residual=0.0,
        samples=2,
    )
    artifacts.config = replace(artifacts.config, fidelity=identity)
    return model, artifacts


def _filled(model, artifacts, tokens: int = 48) -> SCDCache:
    cache = SCDCache(artifacts, model)
    ids = torch.randint(0, 200, (1, tokens), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        model(ids, **with_cache(model, cache))
    return cache


# ---- the map in the config ------------------------------------------------------------------------------------


def test_fidelity_map_round_trips_through_the_config_and_is_optional(tiny):
    _, artifacts = tiny
    data = json.loads(json.dumps(artifacts.config.to_dict()))
    assert ArtifactsConfig.from_dict(data).fidelity == artifacts.config.fidelity
    del data["fidelity"]
    assert ArtifactsConfig.from_dict(data).fidelity is None


def test_the_tail_line_round_trips_and_maps_written_before_it_have_none(tiny):
    _, artifacts = tiny
    assert artifacts.config.fidelity.tail is None
    with_tail = replace(
        artifacts.config, fidelity=replace(artifacts.config.fidelity, tail=TailLine(16, 0.9, -0.5, 0.2, 8))
    )
    data = json.loads(json.dumps(with_tail.to_dict()))
    assert data["fidelity"]["tail"]["tokens"] == 16
    assert ArtifactsConfig.from_dict(data).fidelity == with_tail.fidelity


def test_a_map_says_which_continuation_its_predictions_are_for(tiny):
    """The map records the continuation its KLs were averaged over; maps written before it was recorded were all
    fitted on calibration's 256-token validation continuations, and one map is never fitted on mixed lengths."""
    _, artifacts = tiny
    data = json.loads(json.dumps(artifacts.config.to_dict()))
    assert data["fidelity"]["continuation"] == artifacts.config.fidelity.continuation
    del data["fidelity"]["continuation"]
    assert ArtifactsConfig.from_dict(data).fidelity.continuation == LEGACY_MAP_CONTINUATION == 256
    assert continuation_of([[1] * 20, [2] * 20], 12) == 8
    with pytest.raises(ValueError, match="one continuation length"):
        continuation_of([[1] * 20, [2] * 21], 12)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda f: f.update(slope=-1.0), "slope must be > 0"),
        (lambda f: f.update(intercept=float("nan")), "intercept must be a finite number"),
        (lambda f: f.update(residual="0.1"), "residual must be a finite number"),
        (lambda f: f.update(samples=1), "samples must be an integer >= 2"),
        (lambda f: f.update(continuation=True), "continuation must be an integer >= 2"),
        (lambda f: f["query_energy"].pop(), "query_energy must be"),
        (lambda f: f["query_energy"][0][0].__setitem__(3, float("inf")), "query_energy must be"),
        (lambda f: f["layer_weights"][1].__setitem__(0, 0.0), "layer_weights must list"),
        (lambda f: f.update(tail=[1, 2]), "fidelity.tail must be a JSON object"),
        (lambda f: f.update(tail=dict(tokens=0, slope=1.0, intercept=0.0, residual=0.1, samples=4)), "tail.tokens"),
        (lambda f: f.update(tail=dict(tokens=8, slope=0.0, intercept=0.0, residual=0.1, samples=4)), "tail.slope"),
        (lambda f: f.update(tail=dict(tokens=8, slope=1.0, residual=0.1, samples=4)), "tail.intercept must be"),
    ],
)
def test_a_malformed_fidelity_map_is_an_artifact_error(tiny, edit, match):
    _, artifacts = tiny
    data = json.loads(json.dumps(artifacts.config.to_dict()))
    edit(data["fidelity"])
    with pytest.raises(ArtifactError, match=match):
        ArtifactsConfig.from_dict(data)


def test_the_exact_point_name_is_reserved(tiny):
    _, artifacts = tiny
    data = artifacts.config.to_dict()
    data["operating_points"][0]["name"] = EXACT_POINT
    with pytest.raises(ArtifactError, match="reserved"):
        ArtifactsConfig.from_dict(data)


def test_the_map_is_the_least_squares_line_in_log_log():
    distortions = [1e-4, 1e-3, 1e-2, 1e-1]
    measured = {"a": [Measurement(3.0 * d**0.8, 1.0, d) for d in distortions], "b": [Measurement(0.0, 1.0, 1e-3)]}
    slope, intercept, residual, samples = fit_log_line(measured)
    assert slope == pytest.approx(0.8) and intercept == pytest.approx(math.log(3.0)) and residual < 1e-9
    assert samples == 4  # the zero KL (below rounding) is left out
    assert fit_log_line({"a": [Measurement(0.1, 1.0, 1e-3), Measurement(0.2, 1.0, 1e-3)]}) is None


# ---- the tail probe ------------------------------------------------------------------------------------------------


def _with_tail(artifacts, tokens: int, scale: float = 1.0):
    """The tiny artifacts with a tail line that predicts `scale` times the KL the probe measures (the map from D
    predicts D itself)."""
    fidelity = replace(artifacts.config.fidelity, tail=TailLine(tokens, 1.0, math.log(scale), 0.0, 2))
    return type(artifacts)(replace(artifacts.config, fidelity=fidelity), artifacts.tensors)


def test_the_tail_probe_measures_what_shipping_the_head_and_teacher_forcing_the_tail_costs(tiny):
    """Codes are per token, so the rebuilt cache cut before the tail is what a payload of the tokens before it
    rebuilds: the probe's KL is the KL a consumer pays on the tail, measured the long way round here."""
    model, artifacts = tiny
    tail, tokens = 12, 48
    cache = _filled(model, artifacts, tokens)
    ids = cache.record.input_ids
    with torch.inference_mode():
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        probe = TailProbe(cache.handle, layers, cache.record, tail)
        rebuilt = SCDCache.from_payload(cache.encode("8x"), artifacts, model)
        measured = probe.kl([(layer.keys, layer.values) for layer in rebuilt.layers])
        assert probe.usable and probe.kl(layers) == pytest.approx(0.0, abs=1e-6)
        head = SCDCache(artifacts, model)
        model(ids[:, : tokens - tail], **with_cache(model, head))
        consumer = SCDCache.from_payload(head.encode("8x"), artifacts, model)
        oracle = model(ids).logits[:, tokens - tail :]
        logits = model(ids[:, tokens - tail :], **with_cache(model, consumer)).logits
    assert measured > 1e-4
    assert measured == pytest.approx(next_token_kl(oracle, logits), rel=1e-3)


def test_the_tail_probe_of_a_left_padded_batch_judges_each_row_as_if_it_came_alone(tiny):
    """Rows of a batch are padded on the left; the probe's forward gets the rows' own positions and mask, so a
    padded row's tail KL is the one it has alone, and a batch is judged by its worst row."""
    model, artifacts = tiny
    ids = torch.randint(0, 200, (2, 48), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :10] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    rebuilt_kl = []
    with torch.inference_mode():
        batch = SCDCache(artifacts, model)
        model(ids, attention_mask=mask, position_ids=positions, **with_cache(model, batch))
        alone = SCDCache(artifacts, model)
        model(ids[1:, 10:], **with_cache(model, alone))
        for cache in (batch, alone):
            layers = [(layer.keys, layer.values) for layer in cache.layers]
            rebuilt = SCDCache.from_payload(cache.encode("8x"), artifacts, model)
            probe = TailProbe(cache.handle, layers, cache.record, 12)
            rebuilt_kl.append(probe.kl([(layer.keys, layer.values) for layer in rebuilt.layers]))
        first = SCDCache(artifacts, model)
        model(ids[:1], **with_cache(model, first))
        layers = [(layer.keys, layer.values) for layer in first.layers]
        rebuilt = SCDCache.from_payload(first.encode("8x"), artifacts, model)
        first_kl = TailProbe(first.handle, layers, first.record, 12).kl([(x.keys, x.values) for x in rebuilt.layers])
    assert rebuilt_kl[0] == pytest.approx(max(rebuilt_kl[1], first_kl), rel=1e-3)
    assert TailProbe(batch.handle, [], batch.record, 38).usable is False  # row 1 has 38 real tokens: no head left


@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_a_check_predicts_the_largest_of_the_tail_and_the_distortion_where_the_request_is_long_enough(tiny, scale):
    """The map from D, the tail's line, and the tail's own KL as a floor (out of distribution the continuation pays
    what the tail pays, above the line calibration fitted)."""
    model, artifacts = tiny
    probed = _with_tail(artifacts, 12, scale)
    cache = _filled(model, probed, 48)
    with torch.inference_mode():
        check = cache.check_point("8x")
        assert check.tail_kl is not None and check.tail_kl > 0
        assert check.distortion == pytest.approx(_filled(model, artifacts, 48).check_point("8x").predicted_kl)
        assert check.predicted_kl == pytest.approx(max(scale * check.tail_kl, check.distortion, check.tail_kl))
        assert check.predicted_kl != pytest.approx(min(scale * check.tail_kl, check.distortion))  # both lines tried
        short = _filled(model, probed, 12).check_point("8x")  # no token before the tail: the map from D alone
    assert short.tail_kl is None and short.predicted_kl == pytest.approx(short.distortion)


def test_choose_point_ships_the_cheapest_point_the_tail_probe_allows(tiny):
    model, artifacts = tiny
    cache = _filled(model, _with_tail(artifacts, 12, 1e3), 48)  # the tail's line decides
    with torch.inference_mode():
        every = {p.name: cache.check_point(p.name) for p in sorted(artifacts.points, key=lambda p: p.bytes_per_token)}
        max_kl = every[artifacts.config.default_point].predicted_kl
        choice = cache.choose_point(max_kl)
    assert choice.point == next(name for name, check in every.items() if check.predicted_kl <= max_kl)
    assert all(check.tail_kl is not None for check in every.values())
    assert choice.tail_kl == pytest.approx(every[choice.point].tail_kl)


# ---- the choice ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.0, 0.5, 1.0, 2.0, math.inf])
def test_the_choice_is_the_cheapest_point_predicted_within_max_kl(tiny, scale):
    model, artifacts = tiny
    cache = _filled(model, artifacts)
    ladder = sorted(artifacts.points, key=lambda p: p.bytes_per_token)
    with torch.inference_mode():
        every = {p.name: cache.check_point(p.name).predicted_kl for p in ladder}
        max_kl = scale * every[artifacts.config.default_point]
        choice = cache.choose_point(max_kl)
    cheapest = next((name for name, kl in every.items() if kl <= max_kl), EXACT_POINT)
    assert choice.point == cheapest
    assert all(choice.checked[name] == pytest.approx(every[name]) for name in choice.checked if name in every)
    if choice.point != EXACT_POINT:
        assert choice.predicted_kl <= max_kl


def test_nothing_within_max_kl_ships_every_token_in_bf16(tiny):
    model, artifacts = tiny
    cache = _filled(model, artifacts)
    with torch.inference_mode():
        payload = SCDPayload.from_bytes(cache.encode(max_kl=0.0).to_bytes())
        assert payload.operating_point == EXACT_POINT and payload.predicted_kl >= 0
        assert all(layer.key_codes.shape[0] == 0 for layer in payload.layers)
        rebuilt = SCDCache.from_payload(payload, artifacts, model)
    for original, again in zip(cache.layers, rebuilt.layers, strict=True):
        for a, b in ((original.keys, again.keys), (original.values, again.values)):
            assert torch.allclose(a, b, rtol=1 / 128, atol=1e-3)  # bf16 rounding alone


def test_max_kl_is_checked_and_needs_a_fidelity_map(tiny):
    model, artifacts = tiny
    cache = _filled(model, artifacts)
    for bad in (float("nan"), -0.1, "0.1", True):
        with pytest.raises(OperatingPointError, match="max_kl must be"):
            cache.choose_point(bad)
    with pytest.raises(CacheStateError, match="not both"):
        cache.encode("2x", max_kl=0.1)
    bare = replace(artifacts.config, fidelity=None)
    without = type(artifacts)(bare, artifacts.tensors)
    with pytest.raises(OperatingPointError, match="no fidelity map"):
        _filled(model, without).encode(max_kl=0.1)


# ---- the prediction on the wire -----------------------------------------------------------------------------------


def _head(predicted_kl) -> PayloadHead:
    ids = torch.arange(4)[None]
    return PayloadHead("abc", "def", "4x", ids, ids, torch.ones_like(ids, dtype=torch.bool), 2, predicted_kl)


def test_the_payload_and_the_stream_head_carry_the_prediction():
    assert PayloadHead.from_bytes(_head(0.0123).to_bytes()).predicted_kl == 0.0123
    assert PayloadHead.from_bytes(_head(None).to_bytes()).predicted_kl is None


def _with_prediction(body: bytes, value: str) -> bytes:
    """A safetensors body (payload or stream head) whose metadata says `predicted_kl` is `value`."""
    (header_len,) = struct.unpack_from("<Q", body)
    metadata = json.loads(json.loads(body[8 : 8 + header_len])["__metadata__"][METADATA_KEY])
    metadata["predicted_kl"] = value
    return save(load(body), metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True)})


@pytest.mark.parametrize("garbage", ["nan", "inf", "-0.5", "lots"])
def test_a_garbage_prediction_is_a_corrupt_payload(tiny, garbage):
    model, artifacts = tiny
    with torch.inference_mode():
        blob = _filled(model, artifacts).encode(max_kl=1.0).to_bytes()
    body = _with_prediction(blob[_HEADER.size :], garbage)
    sealed = _HEADER.pack(MAGIC, FORMAT_VERSION, zlib.crc32(body), len(body)) + body  # a valid checksum
    with pytest.raises(CorruptPayloadError, match="predicted_kl"):
        SCDPayload.from_bytes(sealed)
    with pytest.raises(CorruptPayloadError, match="predicted_kl"):
        PayloadHead.from_bytes(_with_prediction(_head(0.5).to_bytes(), garbage))


# ---- streaming ----------------------------------------------------------------------------------------------------


def test_a_stored_stream_ships_the_choice_and_a_live_one_refuses_max_kl(tiny):
    model, artifacts = tiny
    cache = _filled(model, artifacts)
    consumer_end = ChunkLink()
    producer_end = ChunkLink(consumer_end.feed)
    with torch.inference_mode():
        sender = CacheSender(producer_end, cache, max_kl=0.0)
        sender.send(streaming=True)
    received = receive_cache(consumer_end, artifacts, model, fallback="raise")
    assert received.report.operating_point == EXACT_POINT == sender.point
    assert received.report.predicted_kl == pytest.approx(sender.predicted_kl)
    live = SCDCache(artifacts, model)
    with pytest.raises(CacheStateError, match="live stream"):
        with CacheSender(ChunkLink(lambda chunk: None), live, max_kl=0.01):
            pass


# ---- the real model -----------------------------------------------------------------------------------------------


def _continuation_kl(model, artifacts, payload: SCDPayload, ids: torch.Tensor, prefix: int) -> float:
    """KL of the consumer teacher-forcing `ids[prefix:]` from the shipped cache, against the model's own prefill."""
    oracle = model(ids).logits[:, prefix:-1]
    consumer = SCDCache.from_payload(payload, artifacts, model)
    return next_token_kl(oracle, model(ids[:, prefix:], **with_cache(model, consumer)).logits[:, :-1])


def _inputs(tokenizer, length: int) -> dict[str, torch.Tensor]:
    from hf_scd.eval.corpus import evaluation_texts, token_documents

    phrase = tokenizer("The meeting is moved to Thursday. ", add_special_tokens=False)["input_ids"]
    code = tokenizer(inspect.getsource(sched), add_special_tokens=False)["input_ids"]
    ids = {
        "held-out": token_documents(tokenizer, evaluation_texts(), length)[0],
        "code": code,
        "repeated": phrase * (length // len(phrase) + 1),
        "random": torch.randint(0, 49152, (length,), generator=torch.Generator().manual_seed(0)).tolist(),
    }
    return {name: torch.tensor([doc[:length]]) for name, doc in ids.items()}


@torch.inference_mode()
def test_predicted_kl_tracks_measured_kl_in_rank(smollm2, artifacts):
    model, tokenizer = smollm2
    prefix, predicted, measured = 128, [], []
    for ids in _inputs(tokenizer, prefix + 64).values():
        cache = SCDCache(artifacts, model)
        model(ids[:, :prefix], **with_cache(model, cache), logits_to_keep=1)
        for point in ("4x", "10x"):
            check = cache.check_point(point)
            payload = SCDPayload.of(cache.payload_head(point, check.predicted_kl), check.layers)
            predicted.append(check.predicted_kl)
            measured.append(_continuation_kl(model, artifacts, payload, ids, prefix))
    ranks = [[sorted(values).index(v) for v in values] for values in (predicted, measured)]
    n = len(predicted)
    spearman = 1 - 6 * sum((a - b) ** 2 for a, b in zip(*ranks, strict=True)) / (n * (n * n - 1))
    assert spearman >= 0.8, (predicted, measured)


@torch.inference_mode()
def test_a_tight_max_kl_on_random_ids_ships_a_faithful_point_that_continues_like_the_oracle(smollm2, artifacts):
    model, tokenizer = smollm2
    prefix, max_kl = 128, 1e-4
    ids = _inputs(tokenizer, prefix + 64)["random"]
    cache = SCDCache(artifacts, model)
    model(ids[:, :prefix], **with_cache(model, cache), logits_to_keep=1)
    payload = SCDPayload.from_bytes(cache.encode(max_kl=max_kl).to_bytes())
    default = artifacts.point(artifacts.config.default_point)
    assert artifacts.point(payload.operating_point).bytes_per_token > default.bytes_per_token
    assert payload.predicted_kl <= max_kl or payload.operating_point == EXACT_POINT
    assert _continuation_kl(model, artifacts, payload, ids, prefix) <= max_kl
    rebuilt = SCDCache.from_payload(payload, artifacts, model)
    steps = dict(max_new_tokens=8, do_sample=False)
    shipped = model.generate(ids[:, : prefix + 1], **with_cache(model, rebuilt), **steps)
    assert torch.equal(shipped, model.generate(ids[:, : prefix + 1], **steps))
