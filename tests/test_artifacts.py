"""SCDArtifacts as a Hub repo: save/load, integrity, version, operating-point resolution."""

import json
import shutil
import subprocess
import sys

import pytest
from huggingface_hub import ModelCard

from hf_scd import ArtifactError, OperatingPointError, SCDArtifacts
from hf_scd.calibrate.card import model_card


def test_save_and_reload_keeps_identity(artifacts, tmp_path):
    artifacts.save_pretrained(tmp_path / "copy")
    files = sorted(p.name for p in (tmp_path / "copy").iterdir())
    assert files == ["README.md", "codec.safetensors", "config.json"]
    again = SCDArtifacts.from_pretrained(tmp_path / "copy")
    assert again.artifacts_id == artifacts.artifacts_id and again.points == artifacts.points
    assert again.config == artifacts.config and again.config.fit_probe is not None


def test_model_card_has_hub_metadata(artifacts):
    card = ModelCard(model_card(artifacts))
    assert card.data.to_dict() == {
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "library_name": "hf-scd",
        "license": "apache-2.0",
        "tags": ["hf-scd", "kv-cache", "kv-cache-compression"],
    }
    default = artifacts.config.default_point
    assert f"| `{default}` |" in card.text and card.text.count(" default |") == 1
    assert str(card) == artifacts.card  # the shipped card is the one calibration writes


def test_corrupted_tensors_and_unknown_version(artifacts, tmp_path):
    folder = tmp_path / "bad"
    artifacts.save_pretrained(folder)
    blob = bytearray((folder / "codec.safetensors").read_bytes())
    blob[-10] ^= 1
    (folder / "codec.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match="corrupted"):
        SCDArtifacts.from_pretrained(folder)
    shutil.rmtree(folder)
    artifacts.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    for old in (3, 99):  # 3: codec v2's artifacts, per-layer coders
        config["format_version"] = old
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(ArtifactError, match=f"format version {old}; this hf-scd reads 4 and 5"):
            SCDArtifacts.from_pretrained(folder)
    with pytest.raises(ArtifactError, match="no config.json"):
        SCDArtifacts.from_pretrained(tmp_path)


def test_operating_point_resolution(artifacts):
    by_ratio = artifacts.select_point(ratio=4)
    assert by_ratio.ratio_vs_bf16 >= 4
    assert all(p.val_kl >= by_ratio.val_kl for p in artifacts.points if p.ratio_vs_bf16 >= 4)
    loosest = max(p.val_kl for p in artifacts.points)
    assert artifacts.select_point(max_kl=loosest) == max(artifacts.points, key=lambda p: p.ratio_vs_bf16)
    with pytest.raises(OperatingPointError, match="available"):
        artifacts.select_point(ratio=1000)


def test_loads_after_the_program_sets_torch_threads():
    """torch 2.13's batched CPU LU (inverse, solve) hangs inside oneMKL once `torch.set_num_threads(2)` was called;
    the decoders computed on load, and calibration's solves (`hf_scd.linalg`), must not take that path (a fresh
    process: the thread setting is process-wide)."""
    script = (
        "import torch; torch.set_num_threads(2)\n"
        "from hf_scd import SCDArtifacts, linalg\n"
        "from hf_scd.eval.codec_speed import ARTIFACTS\n"
        "a = torch.randn(12, 960, 960, dtype=torch.float64) + 40 * torch.eye(960, dtype=torch.float64)\n"
        "b = torch.randn(12, 960, 4, dtype=torch.float64)\n"
        "assert torch.allclose(a @ linalg.solve(a, b), b, atol=1e-8)\n"
        "print(len(SCDArtifacts.from_pretrained(ARTIFACTS).points))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "oneMKL ERROR" not in done.stderr and int(done.stdout) > 0
