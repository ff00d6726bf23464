"""The `hf-scd eval` command end to end on the real default model, at toy sizes."""

import json
import math
from pathlib import Path

import pytest
import torch

from hf_scd.cli import main

SMOLLM2_ARTIFACTS = Path(__file__).resolve().parents[1] / "hub_artifacts" / "smollm2-135m-instruct"

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


def test_eval_refuses_an_unknown_baseline_before_loading_anything():
    with pytest.raises(SystemExit, match="unknown baselines"):
        main(["eval", "--artifacts", str(SMOLLM2_ARTIFACTS), "--baselines", "kivi-int3"])
