"""The Llama family beyond Llama: Qwen2 (bias on q/k/v) and Mistral, on tiny random-weight models.

Random weights say nothing about quality; these tests check that keys are de-rotated exactly where the model puts
its bias, and that calibration (with its fit probe) and a round trip work on each architecture's module layout.
"""

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from hf_scd import ArtifactFitWarning, ArtifactMismatchError, SCDCache, SCDPayload
from hf_scd.arch import ModelHandle
from hf_scd.calibrate import calibrate
from hf_scd.codec import remove_rotary
from hf_scd.compat import with_cache
from hf_scd.eval.weights import requantized
from hf_scd.probe import probe_errors

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=200,
    max_position_embeddings=256,
)


def _tiny(kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**TINY))
        assert model.model.layers[0].self_attn.k_proj.bias is not None
        with torch.no_grad():  # a visible bias, so a de-rotation that drops or double-counts it fails
            model.model.layers[1].self_attn.k_proj.bias.normal_(0, 2.0)
    else:
        model = MistralForCausalLM(MistralConfig(**TINY))
    return model.eval()


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
@torch.inference_mode()
def test_tiny_model_calibrates_and_round_trips(kind):
    model = _tiny(kind)
    generator = torch.Generator().manual_seed(1)
    docs = torch.randint(0, 200, (6, 96), generator=generator).tolist()
    artifacts = calibrate(
        model, docs[:4], docs[4:], model_name=f"tiny-{kind}", ratios=(2,), validation_prefix=64,
        weigh_layers=False, progress=False,
    )  # fmt: skip
    captured = []
    hook = model.model.layers[1].self_attn.k_proj.register_forward_hook(lambda m, i, o: captured.append(o))
    producer = SCDCache(artifacts, model, point="2x")
    ids = torch.tensor(docs[5][:40])[None]
    model(ids, **with_cache(model, producer), position_ids=torch.arange(7, 47)[None])
    hook.remove()
    cos, sin = producer.record.cos.unsqueeze(1), producer.record.sin.unsqueeze(1)
    content = remove_rotary(producer.layers[1].keys, cos, sin)
    assert torch.allclose(content, captured[0].reshape(1, 40, 2, 16).transpose(1, 2), atol=1e-5)

    consumer = SCDCache.from_payload(SCDPayload.from_bytes(producer.encode().to_bytes()), artifacts, model)
    for original, rebuilt in zip(producer.layers, consumer.layers, strict=True):
        for a, b in ((original.keys, rebuilt.keys), (original.values, rebuilt.values)):
            assert float((a - b).norm() / a.norm()) < 0.05  # 8 bits a component at 2x: about 1% measured
        # The sink token ships exactly, up to bf16 rounding.
        assert torch.allclose(original.keys[:, :, 0], rebuilt.keys[:, :, 0], rtol=1e-2, atol=1e-2)
        assert torch.allclose(original.values[:, :, 0], rebuilt.values[:, :, 0], rtol=1e-2, atol=1e-2)

    # Calibration records the fit probe (the start of the first validation document, at the default point): a
    # requantized copy fits the codes, another random model of the same shape does not.
    probe = artifacts.config.fit_probe
    assert probe.token_ids == tuple(docs[4]) and probe.point == artifacts.config.default_point
    assert probe.errors == probe_errors(artifacts, ModelHandle(model), probe.token_ids, probe.point)
    with pytest.warns(ArtifactFitWarning, match="accepted"):
        assert artifacts.identify(requantized(model, bits=8))[1] == "producer"
    with pytest.raises(ArtifactMismatchError, match="the codes do not fit them"):
        artifacts.identify(_tiny(kind, seed=1))
