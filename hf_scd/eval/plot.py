"""The quality-bytes frontier as a picture: KL and QA F1 against bytes per token, one marker per method."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from .fidelity import Row


def _series(rows: Sequence[Row]) -> dict[str, list[Row]]:
    """SCD rows by plan (Reuse only; "+pN": N Patch layers), each in order of size; every other method alone."""
    series: dict[str, list[Row]] = {}
    for row in sorted(rows, key=lambda r: r.bytes_per_token):
        if row.method.startswith("scd-"):
            patches = row.method.partition("+")[2]
            label = f"SCD, {patches[1:]} Patch layers" if patches else "SCD, Reuse only"
        else:
            label = row.method
        series.setdefault(label, []).append(row)
    return series


def pareto_plot(rows: Sequence[Row], path: str | Path, title: str) -> None:
    """Two panels (KL, log scale; gold F1) against bytes/token; SCD points of one plan joined in order of size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    series = _series([row for row in rows if not math.isnan(row.bytes_per_token)])
    for axis, field, label in ((axes[0], "kl", "KL(oracle || method), nats"), (axes[1], "f1_gold", "QA F1 vs gold")):
        for name, group in series.items():
            values = [(r.bytes_per_token, getattr(r, field), r.method) for r in group]
            values = [v for v in values if not math.isnan(v[1]) and (field != "kl" or v[1] > 0)]
            if not values:
                continue
            style = "o-" if name.startswith("SCD") else "s"
            axis.plot([v[0] for v in values], [v[1] for v in values], style, label=name)
            if name.startswith("SCD"):
                for x, y, method in values:
                    axis.annotate(method[4:], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        oracle = next((r for r in rows if r.method == "oracle"), None)
        if field == "f1_gold" and oracle is not None and not math.isnan(oracle.f1_gold):
            axis.axhline(oracle.f1_gold, color="gray", linestyle="--", label="oracle (consumer prefill)")
        if field == "kl":
            axis.set_yscale("log")
        axis.set_xscale("log")
        axis.set_xlabel("bytes per token shipped")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def ttft_plot(rows: Sequence[dict], path: str | Path) -> None:
    """TTFT against link rate, one panel per (scenario, prompt length), one line per arm (streamed: solid, one-shot:
    dashed); the consumer's own prefill is a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = sorted({r["scenario"] for r in rows if r["scenario"] != "any"}, reverse=True)  # stored, live
    lengths = sorted({r["tokens"] for r in rows})
    figure, axes = plt.subplots(len(scenarios), len(lengths), figsize=(5.2 * len(lengths), 4.2 * len(scenarios)),
                                squeeze=False)  # fmt: skip
    for (row, scenario), (column, tokens) in ((a, b) for a in enumerate(scenarios) for b in enumerate(lengths)):
        axis = axes[row][column]
        if not any(r["scenario"] == scenario and r["tokens"] == tokens for r in rows):
            axis.set_visible(False)
            continue
        lines: dict[tuple[str, bool], list[tuple[float, float]]] = {}
        for r in rows:
            if r["scenario"] == scenario and r["tokens"] == tokens:
                rate = r["measured_gbps"]
                lines.setdefault((r["method"], r["streaming"]), []).append((rate, r["ttft_ms"]))
        for (method, streaming), points in sorted(lines.items()):
            points.sort()
            label = f"{method} ({'streamed' if streaming else 'one-shot'})"
            axis.plot(*zip(*points, strict=True), "o-" if streaming else "s--", label=label, markersize=4)
        for r in rows:
            if r["method"] == "prefill" and r["tokens"] == tokens:
                axis.axhline(r["ttft_ms"], color="black", linewidth=1, label="consumer prefill")
        axis.set(xscale="log", yscale="log", xlabel="measured link rate, Gbit/s", ylabel="TTFT, ms",
                 title=f"{scenario}, {tokens} tokens")  # fmt: skip
        axis.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
