"""Distribution-level fidelity of a consumer against the oracle, on teacher-forced tokens.

All functions take logits of shape (T, vocab) (any leading dims are flattened) over the same
continuation positions, and work in float64 so tiny KLs of near-lossless methods are not
swamped by rounding.
"""

from __future__ import annotations

import torch


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.reshape(-1, logits.shape[-1]).double(), dim=-1)


def next_token_kl(oracle_logits: torch.Tensor, test_logits: torch.Tensor) -> float:
    """Mean over positions of KL(oracle ‖ test) in nats: the extra code length the test model pays."""
    oracle, test = _log_probs(oracle_logits), _log_probs(test_logits)
    return (oracle.exp() * (oracle - test)).sum(-1).mean().item()


def top1_agreement(oracle_logits: torch.Tensor, test_logits: torch.Tensor) -> float:
    """Fraction of positions where both pick the same greedy next token."""
    oracle = oracle_logits.reshape(-1, oracle_logits.shape[-1]).argmax(-1)
    test = test_logits.reshape(-1, test_logits.shape[-1]).argmax(-1)
    return (oracle == test).double().mean().item()


def mean_nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean negative log-likelihood (nats/token) of ``targets`` under ``logits``."""
    log_probs = _log_probs(logits)
    return -log_probs.gather(-1, targets.reshape(-1, 1).long()).mean().item()
