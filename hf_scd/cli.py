"""`hf-scd`: calibrate artifacts for a model, evaluate fidelity, or run the transfer demo."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from .models import DEFAULT_MODEL, PACKAGED_MODELS

# Cross-variant baselines: the producer's K/V as is (naive reuse) and KIVI-int4-quantized.
PAIR_BASELINES = ("bf16", "kivi-int4")


def _load(model: str):
    from .models import load_model

    return load_model(model)


def _model_name(model: str) -> str:
    return DEFAULT_MODEL if model == "default" else Path(model).name if Path(model).is_dir() else model


def _calibration_split(tokenizer, args: argparse.Namespace) -> tuple[list[list[int]], list[list[int]], str]:
    """(calibration docs within --tokens, validation docs, data description) as the calibrate flags ask."""
    from .eval.corpus import calibration_documents, calibration_texts, validation_documents

    if args.data:
        texts = [Path(path).read_text() for path in args.data]
        description = "Text files: " + ", ".join(Path(path).name for path in args.data)
    else:
        texts = calibration_texts()
        description = "Docstrings of the Python standard library (PSF License 2.0)"
    calibration_docs = calibration_documents(tokenizer, texts, args.tokens, args.doc_tokens)
    validation = validation_documents(tokenizer, args.validation_prefix, args.validation_docs)
    return calibration_docs, validation, description


def _hub_id(name: str) -> str | None:
    spec = PACKAGED_MODELS.get(name)
    return spec.hub_id if spec else None


def cmd_calibrate(args: argparse.Namespace) -> None:
    from .calibrate import calibrate, calibrate_pair

    producer_name = _model_name(args.producer)
    producer, tokenizer = _load(args.producer)
    calibration_docs, validation, description = _calibration_split(tokenizer, args)
    common = {
        "base_model": _hub_id(producer_name),
        "data_description": description,
        "validation_prefix": args.validation_prefix,
    } | ({"ratios": tuple(args.ratios)} if args.ratios else {})
    if args.consumer is None or _model_name(args.consumer) == producer_name:
        weigh = not args.no_layer_weights
        extra = {"unit_layers": args.unit_layers} | (
            {"exact_tokens": args.exact_tokens} if args.exact_tokens is not None else {}
        )
        artifacts = calibrate(
            producer, calibration_docs, validation, model_name=producer_name, weigh_layers=weigh, **common, **extra
        )
    else:
        consumer, _ = _load(args.consumer)
        artifacts = calibrate_pair(
            producer,
            consumer,
            calibration_docs,
            validation,
            producer_name=producer_name,
            consumer_name=_model_name(args.consumer),
            patch_counts=tuple(args.patch_counts),
            reuse=args.reuse,
            target_kl=args.target_kl,
            target_ratio=args.target_ratio,
            **common,
            **({"unit_layers": args.unit_layers} if args.unit_layers is not None else {}),
        )
    artifacts.save_pretrained(args.out)
    print(json.dumps(artifacts.summary()["operating_points"], indent=2))
    print(f"artifacts written to {args.out}; default point {artifacts.config.default_point}")


def cmd_eval(args: argparse.Namespace) -> None:
    from .artifacts import SCDArtifacts
    from .eval.baselines import KIVI, Int8KV, ProducerKV, RawKV
    from .eval.corpus import calibration_documents, calibration_texts
    from .eval.droidspeak import SelectiveRecompute, critical_layers
    from .eval.fidelity import format_table, run_fidelity
    from .eval.kvtc import CALIBRATION_TOKENS, KVTC, KVTCBasis, parse_kvtc_name
    from .eval.scd_method import SCDTransfer

    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise SystemExit("--plot needs matplotlib: pip install 'hf-scd[pair]'")
    artifacts = SCDArtifacts.from_pretrained(args.artifacts)
    points = args.points or [p.name for p in artifacts.points]
    # Another consumer adds the cross-variant baselines and the consumer-cost columns; the methods are the same.
    cross = args.consumer is not None and _model_name(args.consumer) != _model_name(args.producer)
    coders = {coder.name: coder for coder in (RawKV(), Int8KV(), KIVI(bits=4), KIVI(bits=2))}
    chosen = args.baselines if args.baselines is not None else (PAIR_BASELINES if cross else list(coders))
    kvtc = [name for name in chosen if name.startswith("kvtc-")]
    unknown = sorted(set(chosen) - set(coders) - set(kvtc))
    if unknown:
        raise SystemExit(f"unknown baselines {unknown}; choose from {sorted(coders)} or kvtc-<ratio>x[-w<recent>]")
    try:
        kvtc_settings = {name: parse_kvtc_name(name) for name in kvtc}
    except ValueError as error:
        raise SystemExit(str(error)) from None
    droidspeak = args.droidspeak_layers if args.droidspeak_layers is not None else ([6] if cross else [])
    producer, tokenizer = _load(args.producer)
    consumer = _load(args.consumer)[0] if cross else producer
    if kvtc:  # one fit on the producer's K/V serves every ratio
        documents = calibration_documents(tokenizer, calibration_texts(), CALIBRATION_TOKENS, 1024)
        basis = KVTCBasis.fit(producer, documents)
        for name, (ratio, recent) in kvtc_settings.items():
            coders[name] = KVTC(producer, basis, ratio, recent_tokens=recent)
    methods = [ProducerKV(producer, coders[name], f"reuse-{name}" if cross else name) for name in chosen]
    methods += [SelectiveRecompute(producer, critical_layers(artifacts, k)) for k in droidspeak]
    stages = (False, True) if args.entropy else (False,)
    methods += [SCDTransfer(producer, artifacts, p, entropy) for p in points for entropy in stages]
    rows = run_fidelity(
        consumer,
        tokenizer,
        methods,
        n_docs=args.docs,
        prefix_len=args.prefix,
        cont_len=args.continuation,
        n_questions=args.questions,
    )
    if cross:
        from .eval.cost import add_consumer_cost

        add_consumer_cost(rows, methods, consumer, tokenizer, args.prefix)
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([row.to_json() for row in rows], indent=2) + "\n")
    if args.plot:
        from .eval.plot import pareto_plot

        pareto_plot(rows, args.plot, f"{artifacts.describe()}: quality vs bytes")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hf-scd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    cal = sub.add_parser("calibrate", help="fit artifacts (bases, quantizers, plan) for a model")
    cal.add_argument(
        "--producer", default="default", help="the model that prefills and encodes: packaged name or local folder"
    )
    cal.add_argument(
        "--consumer",
        help="the model that rebuilds and decodes, a fine-tuned variant for pair artifacts (default: the producer)",
    )
    cal.add_argument("--reuse", choices=("rrr", "joint-svd"), default="rrr", help="cross-variant Reuse coder")
    cal.add_argument("--patch-counts", type=int, nargs="+", default=[0, 2, 4, 6], help="Patch layers to try")
    target = cal.add_mutually_exclusive_group()
    target.add_argument("--target-kl", type=float, help="default point: the smallest with validation KL <= this")
    target.add_argument("--target-ratio", type=float, help="default point: the most faithful this much below BF16")
    cal.add_argument("--data", nargs="*", help="text files to fit on (default: stdlib docstrings)")
    cal.add_argument("--out", required=True, help="artifact folder to write (a Hub repo layout)")
    cal.add_argument("--tokens", type=int, default=16384, help="calibration tokens")
    cal.add_argument("--doc-tokens", type=int, default=1024, help="longest calibration document, in tokens")
    cal.add_argument("--ratios", type=float, nargs="+", help="one operating point per ratio vs BF16")
    cal.add_argument("--validation-docs", type=int, default=4)
    cal.add_argument("--validation-prefix", type=int, default=384)
    cal.add_argument("--no-layer-weights", action="store_true", help="skip the per-layer sensitivity measurement")
    cal.add_argument(
        "--unit-layers",
        type=int,
        help="layers per joint basis (same-model default: the fewest, a divisor, 960 wide; a pair's: 1, per head; a "
        "pair with more needs --patch-counts 0)",
    )
    cal.add_argument("--exact-tokens", type=int, help="same-model: leading tokens of each row shipped in bf16")
    cal.set_defaults(func=cmd_calibrate)

    ev = sub.add_parser("eval", help="fidelity of SCD operating points and baselines against the oracle")
    ev.add_argument(
        "--producer", default="default", help="the model that prefills: packaged name, 'default' or a folder"
    )
    ev.add_argument(
        "--consumer", help="the model that continues, a fine-tuned variant for pair artifacts (default: the producer)"
    )
    ev.add_argument(
        "--droidspeak-layers", type=int, nargs="*", help="layers DroidSpeak recomputes (default: 6 with a --consumer)"
    )
    ev.add_argument("--plot", help="write a Pareto plot (KL and F1 vs bytes) as PNG here")
    ev.add_argument("--artifacts", required=True)
    ev.add_argument("--points", nargs="*", help="operating points to evaluate (default: all)")
    ev.add_argument(
        "--entropy", action="store_true", help="also ship each point through the entropy stage (scd-<point>+zstd)"
    )
    ev.add_argument(
        "--baselines",
        nargs="*",
        help="baselines to run: bf16 int8 kivi-int4 kivi-int2, and kvtc-<ratio>x (KVTC at that ratio on the tokens it "
        "codes, fitted at start on stdlib docstrings) or kvtc-<ratio>x-w<n> (n recent tokens exact, not 128) "
        "(default: the four fixed ones; with a --consumer, bf16 kivi-int4)",
    )
    ev.add_argument("--docs", type=int, default=8)
    ev.add_argument("--prefix", type=int, default=512)
    ev.add_argument("--continuation", type=int, default=256)
    ev.add_argument("--questions", type=int, default=200)
    ev.add_argument("--json", help="write the rows as JSON here")
    ev.set_defaults(func=cmd_eval)

    sub.add_parser(
        "bench-ttft",
        help="time to first token between two processes on shaped links (options: hf-scd bench-ttft --help)",
        add_help=False,
    )

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench-ttft"]:
        from .eval.ttft import main as bench_ttft

        return bench_ttft(argv[1:])
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
