"""The quality-bytes frontier as a picture: KL and QA F1 against bytes per token, one marker per method; and, from
saved `hf-scd eval --json` runs, KL against the ratio to BF16, one panel per run:

    python -m hf_scd.eval.plot --out frontier.png benchmarks/eval_A.json benchmarks/eval_B.json
"""

from __future__ import annotations

import argparse
import json
import math
import re
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


def _family(method: str) -> str:
    """The series a method's row belongs to in the frontier: its name without the ratio."""
    if method.startswith("kvtc-"):
        return "KVTC-style" + (", 128 recent exact" if not re.search(r"-w\d+$", method) else "")
    return "SCD" if method.startswith("scd-") else method


def frontier_plot(runs: dict[str, list[dict]], path: str | Path) -> None:
    """One panel per run (title -> `hf-scd eval --json` rows): KL (log) against the whole payload's ratio to BF16,
    one line per method family in order of ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(2, len(runs))
    lines = -(-len(runs) // columns)
    figure, axes = plt.subplots(lines, columns, figsize=(6.4 * columns, 4.4 * lines), squeeze=False)
    names = sorted({_family(row["method"]) for rows in runs.values() for row in rows if row["method"] != "oracle"})
    colors = {name: f"C{index}" for index, name in enumerate(names)}  # one color per family in every panel
    for axis in axes.flat[len(runs) :]:
        axis.set_visible(False)
    for axis, (title, rows) in zip(axes.flat, runs.items(), strict=False):
        families: dict[str, list[tuple[float, float, str]]] = {}
        for row in rows:
            if row["method"] != "oracle" and row["kl"] and row["kl"] > 0:
                families.setdefault(_family(row["method"]), []).append((row["ratio_vs_bf16"], row["kl"], row["method"]))
        for name, points in sorted(families.items()):
            points.sort()
            style = "o-" if len(points) > 1 else "s"
            axis.plot([p[0] for p in points], [p[1] for p in points], style, label=name, color=colors[name])
            if name == "SCD":
                for x, y, method in points:
                    axis.annotate(method[4:], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        axis.set(yscale="log", xlabel="ratio to BF16 K/V (whole payload)", ylabel="KL(oracle || method), nats",
                 title=title)  # fmt: skip
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="KL against the ratio to BF16, one panel per saved eval run")
    parser.add_argument("runs", nargs="+", type=Path, help="`hf-scd eval --json` files")
    parser.add_argument("--titles", nargs="*", help="one per run (default: the file names)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    titles = args.titles or [run.stem for run in args.runs]
    if len(titles) != len(args.runs):
        parser.error("give one title per run")
    frontier_plot({title: json.loads(run.read_text()) for title, run in zip(titles, args.runs, strict=True)}, args.out)


if __name__ == "__main__":
    main()
