"""What a method costs the consumer to get a usable cache, against the consumer prefilling the prefix itself."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from .corpus import evaluation_texts, token_documents
from .fidelity import Row
from .transfer import Recompute, Transfer


@dataclass
class ConsumerCost:
    """The consumer's work to get a usable cache: seconds (median of runs) and FLOPs."""

    seconds: float
    flops: int


@torch.inference_mode()
def consumer_cost(method: Transfer, consumer: torch.nn.Module, input_ids: torch.Tensor, runs: int = 3) -> ConsumerCost:
    """Time and count the FLOPs of `method.receive` alone, for one shipment of `input_ids`."""
    shipment = method.send(input_ids, None)
    with FlopCounterMode(display=False) as counter:
        method.receive(consumer, shipment)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        method.receive(consumer, shipment)
        times.append(time.perf_counter() - start)
    return ConsumerCost(sorted(times)[runs // 2], counter.get_total_flops())


def add_consumer_cost(rows: Sequence[Row], methods: Sequence[Transfer], consumer, tokenizer, prefix_len: int) -> None:
    """Fill each row's consumer FLOPs and time, relative to the consumer prefilling one evaluation prefix itself."""
    doc = token_documents(tokenizer, evaluation_texts(), prefix_len)[0][:prefix_len]
    input_ids = torch.tensor([doc], device=consumer.device)
    oracle = consumer_cost(Recompute(consumer), consumer, input_ids)
    by_name = {method.name: method for method in methods}
    for row in rows:
        if row.method == "oracle":
            row.consumer_flops_vs_prefill, row.consumer_time_vs_prefill = 1.0, 1.0
        elif row.method in by_name:
            cost = consumer_cost(by_name[row.method], consumer, input_ids)
            row.consumer_flops_vs_prefill = cost.flops / oracle.flops
            row.consumer_time_vs_prefill = cost.seconds / oracle.seconds
