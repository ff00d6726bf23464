"""The `hf-scd eval` command end to end on the real default model, at toy sizes."""

import json
import math
from pathlib import Path

import pytest
import torch

from hf_scd.cli import main

HUB = Path(__file__).resolve().parents[1] / "hub_artifacts"
SMOLLM2_ARTIFACTS = HUB / "smollm2-135m-instruct"

ROW_KEYS = {"method", "bytes_per_token", "ratio_vs_bf16", "kl", "top1", "dnll", "f1_gold", "f1_agree"}
# Cross-variant columns: null for a same-model eval.
ROW_KEYS |= {"consumer_flops_vs_prefill", "consumer_time_vs_prefill"}


def test_eval_prints_the_table_and_writes_json_rows(tmp_path, capsys):
    torch.manual_seed(0)
    out = tmp_path / "rows.json"
    main(
        ["eval", "--artifacts", str(SMOLLM2_ARTIFACTS), "--points", "4x", "--docs", "2", "--prefix", "48",
         "--continuation", "16", "--questions", "2", "--json", str(out)]
    )  # fmt: skip
    rows = json.loads(out.read_text())
    assert [row["method"] for row in rows] == ["oracle", "bf16", "int8", "kivi-int4", "kivi-int2", "scd-4x"]
    assert all(set(row) == ROW_KEYS for row in rows)
    scd = rows[-1]
    # Bytes are the whole serialized payload over the shipped tokens, so a 48-token prefix pays for the header,
    # the ids and the exact sink token: less than the nominal 4x, more than BF16's 1x.
    assert 1.5 < scd["ratio_vs_bf16"] < 4 and math.isfinite(scd["kl"]) and 0 <= scd["f1_agree"] <= 1
    assert rows[0]["bytes_per_token"] is None  # the oracle ships nothing
    assert "| scd-4x |" in capsys.readouterr().out


def test_eval_entropy_ships_each_point_both_ways_with_the_same_fidelity_in_fewer_bytes(tmp_path):
    pytest.importorskip("zstandard")
    out = tmp_path / "rows.json"
    main(
        ["eval", "--artifacts", str(SMOLLM2_ARTIFACTS), "--points", "8x", "--entropy", "--baselines", "--docs", "1",
         "--prefix", "256", "--continuation", "16", "--questions", "0", "--json", str(out)]
    )  # fmt: skip
    oracle, plain, coded = json.loads(out.read_text())
    assert (plain["method"], coded["method"]) == ("scd-8x", "scd-8x+zstd")
    assert (coded["kl"], coded["top1"], coded["dnll"]) == (plain["kl"], plain["top1"], plain["dnll"])  # lossless
    assert coded["bytes_per_token"] < plain["bytes_per_token"]


def test_eval_with_a_consumer_runs_the_pair_methods_and_their_consumer_cost(tmp_path):
    out = tmp_path / "rows.json"
    main(
        ["eval", "--producer", "default", "--consumer", "smollm2-135m-instruct-stdlib", "--artifacts",
         str(HUB / "smollm2-135m-instruct-stdlib-pair"), "--points", "4x", "--droidspeak-layers", "2", "--docs", "1",
         "--prefix", "48", "--continuation", "16", "--questions", "0", "--json", str(out)]
    )  # fmt: skip
    rows = json.loads(out.read_text())
    assert [row["method"] for row in rows] == ["oracle", "reuse-bf16", "reuse-kivi-int4", "droidspeak-2", "scd-4x"]
    assert rows[1]["kl"] > 0  # the producer's own K/V are not the consumer's
    # Rebuilding from codes or handed-over K/V costs the consumer a fraction of its own prefill.
    assert all(0 <= row["consumer_flops_vs_prefill"] < 0.5 for row in rows[1:])


def test_eval_refuses_an_unknown_baseline_before_loading_anything():
    with pytest.raises(SystemExit, match="unknown baselines"):
        main(["eval", "--artifacts", str(SMOLLM2_ARTIFACTS), "--baselines", "kivi-int3"])
