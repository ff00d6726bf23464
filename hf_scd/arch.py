"""What SCD needs to know about a model, read once, and the check that it is a model SCD supports."""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from .compat import with_cache
from .errors import UnsupportedModelError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

# The first tokens of a sequence yield the same K/V in a given model whatever follows them, so a consumer that
# recomputes them (the attention sink) does so once per model, weights, dtype, device and token ids.
_PREFIX_MEMO: weakref.WeakKeyDictionary[nn.Module, dict[tuple, list]] = weakref.WeakKeyDictionary()
PREFIX_MEMO_SIZE = 256
# Hashing the weights reads every parameter; a cache is made per request, so the fingerprint is kept per model with
# the state of its weights it was computed from.
_FINGERPRINTS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, str]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class ModelShape:
    """The KV geometry a codec and a payload are tied to."""

    model_type: str
    num_layers: int
    num_kv_heads: int
    head_dim: int

    def bf16_bytes_per_token(self) -> int:
        """Bytes one token of raw BF16 KV costs: 2 (K and V) x layers x kv heads x head_dim x 2 bytes."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 2

    def to_dict(self) -> dict:
        return {
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
        }


class ModelHandle:
    """The parts of a supported decoder SCD touches: attention modules, rotary embedding, norms."""

    def __init__(self, model: nn.Module):
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"hf-scd supports the Llama family ({', '.join(SUPPORTED_MODEL_TYPES)}); "
                f"got model_type={model_type!r}. Other architectures place RoPE or the KV cache differently "
                "and would be rebuilt wrongly."
            )
        decoder = getattr(model, "model", model)
        layers = getattr(decoder, "layers", None)
        rotary = getattr(decoder, "rotary_emb", None)
        if layers is None or rotary is None:
            raise UnsupportedModelError(
                f"{type(model).__name__} has no `.model.layers` / `.model.rotary_emb`; pass a *ForCausalLM model "
                "or its base model."
            )
        self.model = model
        self.decoder = decoder
        self.rotary = rotary
        self.layers = list(layers)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.shape = ModelShape(
            model_type=model_type,
            num_layers=config.num_hidden_layers,
            num_kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
        )

    def attention(self, layer_idx: int) -> nn.Module:
        return self.layers[layer_idx].self_attn

    @property
    def fingerprint(self) -> str:
        """The weights' fingerprint (`model_fingerprint`), computed once per model and again only after its weights
        change: any in-place write (`copy_`, `load_state_dict`, an optimizer step) bumps a parameter's version
        counter, and a replaced parameter or storage changes its identity or address."""
        parameters = list(self.model.parameters())
        if any(p.is_inference() for p in parameters):  # made under inference_mode: no version counter to watch
            return model_fingerprint(self.model)
        state = tuple((id(p), p.data_ptr(), p._version) for p in parameters)
        known = _FINGERPRINTS.get(self.model)
        if known is None or known[0] != state:
            known = (state, model_fingerprint(self.model))
            _FINGERPRINTS[self.model] = known
        return known[1]

    @torch.no_grad()
    def prefix_cache(self, input_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This model's own post-RoPE (keys, values) per layer, (batch, H, n, d), for unpadded prefixes (batch, n)
        starting at position 0. Memoised per prefix: the rows' K/V are computed once for this model's weights."""
        from transformers import DynamicCache

        param = next(self.model.parameters())
        memo = _PREFIX_MEMO.setdefault(self.model, {})
        keys = [(self.fingerprint, param.dtype, param.device, tuple(row)) for row in input_ids.tolist()]
        missing = list(dict.fromkeys(key for key in keys if key not in memo))
        if missing:
            if len(memo) + len(missing) > PREFIX_MEMO_SIZE:
                memo.clear()
            cache = DynamicCache(config=self.model.config)
            ids = torch.tensor([key[-1] for key in missing], dtype=torch.long, device=input_ids.device)
            self.decoder(input_ids=ids, **with_cache(self.decoder, cache), use_cache=True)
            for row, key in enumerate(missing):
                memo[key] = [(layer.keys[row : row + 1], layer.values[row : row + 1]) for layer in cache.layers]
        rows = [memo[key] for key in keys]
        return [
            (torch.cat([row[layer][0] for row in rows]), torch.cat([row[layer][1] for row in rows]))
            for layer in range(len(self.layers))
        ]

    @torch.no_grad()
    def rotary_cos_sin(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """This model's own (cos, sin) for the given positions, shape (batch, seq, head_dim)."""
        probe = torch.empty(0, dtype=dtype, device=position_ids.device)
        return self.rotary(probe, position_ids=position_ids)


@torch.no_grad()
def model_fingerprint(model: nn.Module, samples_per_tensor: int = 4096) -> str:
    """A short hash of the weights, the same for a model in bf16, fp16 or fp32, different after fine-tuning.

    Strided samples of every parameter are rounded to bf16 before hashing, so the fingerprint does not depend on
    the dtype a checkpoint was loaded in, yet any change to the weights that survives bf16 rounding alters it.
    """
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        flat = param.detach().reshape(-1)
        stride = max(1, flat.numel() // samples_per_tensor)
        sample = flat[::stride][:samples_per_tensor].to(device="cpu", dtype=torch.bfloat16)
        digest.update(name.encode())
        digest.update(str(tuple(param.shape)).encode())
        digest.update(sample.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]
