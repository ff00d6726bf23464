"""The serving app's configuration and request schema, without a cluster: the example config file is a valid
`AppConfig`, and wrong configs and requests are refused with a message that says what is wrong."""

from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
pytest.importorskip("ray.serve")

from pydantic import ValidationError  # noqa: E402

from hf_scd.errors import RequestError  # noqa: E402
from hf_scd.serve import AppConfig  # noqa: E402
from hf_scd.serve.openai import ChatRequest, CompletionRequest, generation  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_the_example_config_is_an_app_config():
    document = yaml.safe_load((REPO / "examples" / "serve" / "config.yaml").read_text())
    (application,) = document["applications"]
    assert application["import_path"] == "hf_scd.serve:build_app"
    config = AppConfig.model_validate(application["args"])
    assert [route.name for route in config.routes] == ["smollm2-135m-instruct", "smollm2-135m-instruct-stdlib"]
    for route in config.routes:  # relative folders are made absolute: replicas need not share the working directory
        assert Path(route.artifacts).is_absolute() and (Path(route.artifacts) / "config.json").exists()
    assert config.prefill.deployment_options("Prefill")["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 0}


def test_wrong_configs_are_refused_with_what_is_wrong(monkeypatch):
    with pytest.raises(ValidationError, match="replica_count"):
        AppConfig.model_validate({"prefill": {"replica_count": 2}})  # a typo is not ignored
    with pytest.raises(ValidationError, match="channel"):
        AppConfig.model_validate({"transport": {"channel": "carrier-pigeon"}})
    route = {"name": "a", "model": "default", "artifacts": "hub_artifacts/smollm2-135m-instruct"}
    with pytest.raises(ValidationError, match="unique"):
        AppConfig.model_validate({"routes": [route, route]})
    with pytest.raises(ValidationError, match="num_replicas"):
        AppConfig.model_validate({"prefill": {"num_replicas": 0}})
    monkeypatch.setenv("MY_KEY", "s3cret")
    assert AppConfig.model_validate({"transport": {"key_env": "MY_KEY"}}).transport.key() == b"s3cret"
    monkeypatch.delenv("MY_KEY")
    assert AppConfig.model_validate({"transport": {"key_env": "MY_KEY"}}).transport.key() is None


def test_requests_become_decode_jobs_and_unsupported_options_are_refused():
    job = generation(CompletionRequest(model="m", prompt=[1, 2, 3], max_tokens=5, stop="\n"), max_new_tokens=64)
    assert (job.prompt_ids, job.max_new_tokens, job.stops, job.prompt) == ([1, 2, 3], 5, ["\n"], None)
    chat = ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=7)
    assert generation(chat, 64).messages == [{"role": "user", "content": "hi"}]
    assert generation(chat, 64).max_new_tokens == 7
    with pytest.raises(RequestError, match="at most 64 tokens"):
        generation(CompletionRequest(model="m", prompt="x", max_tokens=65), max_new_tokens=64)
    for unsupported in ({"n": 2}, {"logprobs": 5}, {"echo": True}, {"best_of": 3}, {"stop": ["a"] * 5}):
        with pytest.raises(ValidationError, match="not supported|at most 4"):
            CompletionRequest(model="m", prompt="x", **unsupported)
    assert RequestError("gone", 404, "model_not_found").__reduce__()[1] == ("gone", 404, "model_not_found")
