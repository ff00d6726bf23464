"""Malformed artifacts and bad arguments end in typed errors that say what is wrong, never a KeyError deep inside."""

import json
import time

import pytest

from hf_scd import ArtifactError, OperatingPointError, SCDArtifacts


@pytest.fixture
def folder(artifacts, tmp_path):
    artifacts.save_pretrained(tmp_path / "arts")
    return tmp_path / "arts"


def _rewrite(folder, edit) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps(edit(config)))


def _drop(config: dict, *path: str) -> dict:
    target = config
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return config


def _probe(config: dict, **fields) -> dict:
    return {**config, "fit_probe": {**config["fit_probe"], **fields}}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: [c], "config must be a JSON object"),
        (lambda c: None, "config must be a JSON object"),
        (lambda c: _drop(c, "model", "fingerprint"), "model.fingerprint must be a str"),
        (lambda c: _drop(c, "codec"), "config.codec must be a JSON object"),
        (lambda c: {**c, "codec": {**c["codec"], "exact_tokens": "1"}}, "codec.exact_tokens must be int"),
        (lambda c: {**c, "codec": {**c["codec"], "exact_tokens": -1}}, "must be >= 0"),
        (lambda c: {**c, "operating_points": c["operating_points"] * 2}, "distinct names"),
        (lambda c: {**c, "default_point": "99x"}, "default_point '99x' is not one of"),
        (lambda c: _drop(c, "operating_points", 0, "val_kl"), "has no field 'val_kl'"),
        (lambda c: {**c, "model": {**c["model"], "shape": {**c["model"]["shape"], "num_layers": 0}}}, "num_layers"),
        (lambda c: {**c, "fit_probe": []}, "config.fit_probe must be a JSON object"),
        (lambda c: _probe(c, point="99x"), "fit_probe.point '99x' is not one of"),
        (lambda c: _probe(c, token_ids=[5, -1]), "fit_probe.token_ids must be a non-empty list of token ids"),
        (lambda c: _probe(c, token_ids=[5]), "longer than the exact sink"),
        (lambda c: _probe(c, errors=c["fit_probe"]["errors"][:3]), "fit_probe.errors must list 30 layers"),
        (lambda c: _probe(c, errors=[[float("nan"), 0.1]] * 30), "fit_probe.errors must list 30 layers"),
        (lambda c: _drop(c, "fit_probe", "errors"), "fit_probe.errors must be a list"),
    ],
)
def test_malformed_config_is_an_artifact_error_naming_the_field(folder, edit, message):
    _rewrite(folder, edit)
    with pytest.raises(ArtifactError, match=message):
        SCDArtifacts.from_pretrained(folder)


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00garbage"])
def test_undecodable_config_is_an_artifact_error(folder, content):
    (folder / "config.json").write_bytes(content)
    with pytest.raises(ArtifactError, match="not valid UTF-8 JSON"):
        SCDArtifacts.from_pretrained(folder)


@pytest.mark.parametrize("path", ["/nonexistent/hf-scd/arts", "./missing-arts", "tests/no-such-artifacts"])
def test_a_missing_local_path_fails_fast_without_the_hub(path):
    start = time.monotonic()
    with pytest.raises(ArtifactError, match="is not a folder"):
        SCDArtifacts.from_pretrained(path)
    assert time.monotonic() - start < 1.0  # no Hub round trip (which takes tens of seconds offline)


@pytest.mark.parametrize(("kwargs", "name"), [({"ratio": "4"}, "ratio"), ({"max_kl": float("nan")}, "max_kl")])
def test_a_target_that_is_not_a_number_is_an_operating_point_error(artifacts, kwargs, name):
    with pytest.raises(OperatingPointError, match=f"{name} must be a number"):
        artifacts.select_point(**kwargs)


def _retensor(folder, edit) -> None:
    """Rewrite codec.safetensors with `edit` applied, and the config's hash to match: only the content checks stand."""
    import hashlib

    from safetensors.torch import load, save

    tensors = load((folder / "codec.safetensors").read_bytes())
    blob = edit(tensors)
    blob = blob if isinstance(blob, bytes) else save(tensors)
    (folder / "codec.safetensors").write_bytes(blob)
    _rewrite(folder, lambda c: {**c, "tensors_sha256": hashlib.sha256(blob).hexdigest()})


def _set_bits(value):
    def edit(tensors):
        tensors["points.4x.bits"][0, 0, 0, 0] = value

    return edit


def _zero_steps(tensors):
    tensors["steps"][:, :, 1:] = 0.0  # every used bit width has a zero step


def _nan_encoder(tensors):
    tensors["encoder"][3, 1, 0, 0, 0] = float("nan")


def _singular_encoder(tensors):
    tensors["encoder"][2, 0, 0, :, 5] = 0.0  # a component nothing maps to: no inverse to decode with


def _no_decoder_for_a_truncated_encoder(tensors):
    tensors["encoder"] = tensors["encoder"][..., :-1].contiguous()
    for key in [key for key in tensors if key.endswith(".bits")]:
        tensors[key] = tensors[key][..., :-1].contiguous()


def _drop_tensor(tensors):
    del tensors["encoder"]


def _pickled(_tensors):
    import pickle

    return pickle.dumps({"encoder": [1, 2, 3]})


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_set_bits(9), "more than 8 bits"),
        (_set_bits(255), "more than 8 bits"),
        (_zero_steps, "quantizer step is not positive"),
        (_nan_encoder, "encoder has non-finite values"),
        (_singular_encoder, "an encoder is singular"),
        (_no_decoder_for_a_truncated_encoder, "no tensor 'decoder'"),
        (_drop_tensor, "no tensor 'encoder'"),
        (_pickled, "not a valid safetensors file"),
    ],
)
def test_corrupted_tensors_with_a_matching_hash_are_artifact_errors(folder, edit, message):
    _retensor(folder, edit)
    with pytest.raises(ArtifactError, match=message):
        SCDArtifacts.from_pretrained(folder)


def test_a_folder_in_place_of_a_file_is_an_artifact_error(folder):
    (folder / "codec.safetensors").unlink()
    (folder / "codec.safetensors").mkdir()
    with pytest.raises(ArtifactError, match="no codec.safetensors"):
        SCDArtifacts.from_pretrained(folder)
