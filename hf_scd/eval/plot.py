"""The quality-bytes frontier as a picture: KL and QA F1 against bytes per token, one marker per method."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from .fidelity import Row


def pareto_plot(rows: Sequence[Row], path: str | Path, title: str) -> None:
    """Two panels (KL, log scale; gold F1) against bytes/token; SCD points joined in order of size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    shipped = [row for row in rows if not math.isnan(row.bytes_per_token)]
    for axis, field, label in ((axes[0], "kl", "KL(oracle || method), nats"), (axes[1], "f1_gold", "QA F1 vs gold")):
        scd = sorted((r for r in shipped if r.method.startswith("scd-")), key=lambda r: r.bytes_per_token)
        for group, style in ((scd, "o-"), ([r for r in shipped if r not in scd], "s")):
            values = [(r.bytes_per_token, getattr(r, field), r.method) for r in group]
            values = [v for v in values if not math.isnan(v[1]) and (field != "kl" or v[1] > 0)]
            if not values:
                continue
            axis.plot([v[0] for v in values], [v[1] for v in values], style, label="SCD" if group is scd else None)
            for x, y, name in values:
                axis.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        oracle = next((r for r in rows if r.method == "oracle"), None)
        if field == "f1_gold" and oracle is not None and not math.isnan(oracle.f1_gold):
            axis.axhline(oracle.f1_gold, color="gray", linestyle="--", label="oracle (consumer prefill)")
        if field == "kl":
            axis.set_yscale("log")
        axis.set_xscale("log")
        axis.set_xlabel("bytes per token shipped")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
