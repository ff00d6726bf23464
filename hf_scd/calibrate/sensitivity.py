"""How much the model's output moves per unit of K or V error in each layer.

Water-filling needs errors in different layers on one scale. We inject Gaussian noise of known power into one
layer's keys (pre-RoPE, at `k_proj`'s output) or values and measure the next-token KL against the clean model;
KL per unit of weighted squared error (the error in the layer's metric, see `fit.py`) is that layer's weight.
Small noise keeps the response in its quadratic regime. The exact (sink) tokens get no noise: they are not coded.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..arch import ModelHandle
from ..eval.metrics import next_token_kl
from ..schema import KINDS


@torch.inference_mode()
def layer_sensitivity(
    model: torch.nn.Module,
    documents: list[list[int]],
    rms: dict[tuple[int, str], float],
    metrics: dict[tuple[int, str], torch.Tensor],
    skip_tokens: int = 0,
    relative_noise: float = 0.05,
    progress: bool = True,
) -> dict[tuple[int, str], float]:
    """KL per unit of per-token weighted squared error, for each (layer, 'k'|'v').

    Isotropic noise of variance s^2 has expected weighted error s^2 * trace(metric) per token.
    """
    handle = ModelHandle(model)
    device = next(model.parameters()).device
    batch = torch.tensor(documents, device=device)
    clean = model(batch, use_cache=False).logits
    weights = {}
    keys = [(layer, kind) for layer in range(handle.shape.num_layers) for kind in KINDS]
    generator = torch.Generator(device=device)
    for layer, kind in tqdm(keys, desc="layer sensitivity", disable=not progress):
        attention = handle.attention(layer)
        proj = attention.k_proj if kind == "k" else attention.v_proj
        std = relative_noise * rms[(layer, kind)]
        generator.manual_seed(layer * 2 + KINDS.index(kind))

        def add_noise(_module, _inputs, output, std=std):
            noise = torch.randn(output.shape, generator=generator, device=output.device, dtype=torch.float32)
            noise[:, :skip_tokens] = 0
            return output + (noise * std).to(output.dtype)

        hook = proj.register_forward_hook(add_noise)
        try:
            kl = next_token_kl(clean, model(batch, use_cache=False).logits)
        finally:
            hook.remove()
        per_token_error = std**2 * float(metrics[(layer, kind)].diagonal(dim1=-2, dim2=-1).sum())
        weights[(layer, kind)] = max(kl, 1e-12) / per_token_error
    return weights
