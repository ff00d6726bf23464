"""The Ray Serve app on a real local Ray cluster, through real HTTP requests: greedy output equals the oracle, on
the same model and on its fine-tune, streamed or whole, over both channels; bad requests get a 4xx that says why;
8 concurrent requests all come back right; and a prefill replica killed mid-request still ends in the right answer,
through the decode replica's own prefill. One cluster for the module."""

import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytest.importorskip("ray.serve")

from hf_scd.eval.corpus import evaluation_texts  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAME, TUNED = "smollm2-135m-instruct", "smollm2-135m-instruct-stdlib"
SAME_ARTIFACTS = str(REPO / "hub_artifacts" / "smollm2-135m-instruct")
PAIR_ARTIFACTS = str(REPO / "hub_artifacts" / "smollm2-135m-instruct-stdlib-pair")
POINT = "2.5x"  # the near-lossless point of the same-model artifacts
NEW_TOKENS = 20
MAX_PROMPT = 2048
# Greedy decoding may leave the oracle only where its two best tokens are this close (nats): a near-tie that the
# codec's error may flip. Anywhere else a difference is a fault.
NEAR_TIE = 0.3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _app_config(channel: str, routes: list[dict], entropy: bool = False) -> dict:
    replica = {"num_cpus": 0, "torch_threads": 1}
    return {
        "routes": [route | {"decode": replica} for route in routes],
        "prefill": replica,
        "ingress": {"num_cpus": 0},
        "transport": {"channel": channel, "timeout_s": 60, "entropy": entropy},
        "policy": {"enabled": False},  # every request transfers: the tests are about the transfer
        "max_prompt_tokens": MAX_PROMPT,
        "max_new_tokens": 64,
    }


@dataclass(frozen=True)
class Cluster:
    url: str  # the HTTP API
    metrics: str  # this node's Prometheus endpoint


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster with two apps: the TCP channel with both routes at "/", the object store at "/store" with
    the entropy stage on."""
    os.environ["RAY_enable_worker_prestart"] = "0"
    os.environ["HF_SCD_TRANSPORT_KEY"] = "test-serve-key"  # frames between replicas are authenticated
    import ray
    from ray import serve

    from hf_scd.serve import AppConfig, build_app

    port, metrics_port = _free_port(), _free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        same = {"name": SAME, "model": "default", "artifacts": SAME_ARTIFACTS, "point": POINT}
        tuned = {"name": TUNED, "model": TUNED, "artifacts": PAIR_ARTIFACTS}
        serve.run(build_app(AppConfig.model_validate(_app_config("tcp", [same, tuned]))), name="tcp", route_prefix="/")
        store = AppConfig.model_validate(_app_config("object_store", [same], entropy=True))
        serve.run(build_app(store), name="store", route_prefix="/store")
        yield Cluster(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        serve.shutdown()
        ray.shutdown()


def _post(url: str, body: dict | bytes, timeout: float = 180) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _stream(url: str, body: dict) -> list[dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(request, timeout=180) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response:
            line = line.decode().strip()
            if line.startswith("data: "):
                events.append(line[len("data: ") :])
    assert events[-1] == "[DONE]"
    return [json.loads(event) for event in events[:-1]]


def _prompts(tokenizer, count: int, tokens: int) -> list[str]:
    """Real held-out text, cut to about `tokens` tokens each."""
    texts = [text for text in evaluation_texts() if len(tokenizer(text)["input_ids"]) >= tokens][:count]
    assert len(texts) == count
    return [tokenizer.decode(tokenizer(text)["input_ids"][:tokens]) for text in texts]


def _ids(tokenizer, prompt: str | None = None, messages: list | None = None) -> torch.Tensor:
    if messages is not None:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


@torch.inference_mode()
def _oracle(model, ids: torch.Tensor, new: int = NEW_TOKENS) -> tuple[list[int], list[float]]:
    """The consumer's own greedy continuation, and at each step the margin between its two best tokens."""
    out = model.generate(ids, max_new_tokens=new, do_sample=False, output_scores=True, return_dict_in_generate=True)
    margins = [float(step[0].topk(2).values.diff().abs()) for step in out.scores]
    return out.sequences[0, ids.shape[1] :].tolist(), margins


@torch.inference_mode()
def _in_process(producer, consumer, artifacts, ids: torch.Tensor, point: str | None = None) -> list[int]:
    """The same transfer without Ray: encode on the producer, bytes, rebuild on the consumer, greedy."""
    from hf_scd import SCDCache, SCDPayload
    from hf_scd.compat import with_cache

    cache = SCDCache(artifacts, producer, point=point)
    producer(ids[:, :-1], **with_cache(producer, cache))
    rebuilt = SCDCache.from_payload(SCDPayload.from_bytes(cache.encode().to_bytes()), artifacts, consumer)
    out = consumer.generate(ids, **with_cache(consumer, rebuilt), max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


def _check_against_oracle(producer, consumer, tokenizer, artifacts, ids, served: str, point=None) -> None:
    """The served text is exactly what the same transfer gives in process (serving adds no error), and that
    continuation leaves the consumer's own greedy only at a near-tie."""
    shipped = _in_process(producer, consumer, artifacts, ids, point)
    assert served == tokenizer.decode(shipped, skip_special_tokens=True)
    oracle, margins = _oracle(consumer, ids)
    first = next((i for i, (a, b) in enumerate(zip(shipped, oracle, strict=True)) if a != b), None)
    assert first is None or margins[first] < NEAR_TIE, (first, margins)


@pytest.fixture(scope="module")
def same_artifacts():
    from hf_scd import SCDArtifacts

    return SCDArtifacts.from_pretrained(SAME_ARTIFACTS)


def _completion(cluster: Cluster, prompt: str, model: str = SAME, prefix: str = "", **extra) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0} | extra
    status, reply = _post(f"{cluster.url}{prefix}/v1/completions", body)
    assert status == 200, reply
    return reply


@pytest.mark.parametrize("prefix", ["", "/store"], ids=["tcp", "object_store"])
def test_greedy_output_equals_the_oracle(cluster, smollm2, same_artifacts, prefix):
    model, tokenizer = smollm2
    for prompt in _prompts(tokenizer, 3, 400):
        reply = _completion(cluster, prompt, prefix=prefix)
        transfer = reply["usage"]["hf_scd"]
        assert transfer["outcome"] == "transferred", transfer
        assert transfer["channel"] == ("object_store" if prefix else "tcp")
        assert transfer["operating_point"] == POINT
        assert transfer["wire_bytes"] * 2 < transfer["bf16_bytes"], transfer
        assert reply["usage"]["prompt_tokens"] == len(tokenizer(prompt)["input_ids"])
        assert reply["usage"]["completion_tokens"] == NEW_TOKENS
        text = reply["choices"][0]["text"]
        _check_against_oracle(model, model, tokenizer, same_artifacts, _ids(tokenizer, prompt), text, POINT)


def test_the_entropy_stage_codes_the_frames_and_the_answer_is_the_oracles(cluster, smollm2, same_artifacts):
    model, tokenizer = smollm2
    (prompt,) = _prompts(tokenizer, 1, 1200)
    reply, plain = _completion(cluster, prompt, prefix="/store"), _completion(cluster, prompt)  # "/": no entropy
    transfer = reply["usage"]["hf_scd"]
    assert transfer["outcome"] == "transferred" and transfer["entropy"], transfer
    assert not plain["usage"]["hf_scd"]["entropy"]
    assert transfer["wire_bytes"] < 0.97 * plain["usage"]["hf_scd"]["wire_bytes"]
    text = reply["choices"][0]["text"]
    _check_against_oracle(model, model, tokenizer, same_artifacts, _ids(tokenizer, prompt), text, POINT)


def test_chat_and_the_fine_tune_route(cluster, smollm2):
    from hf_scd import SCDArtifacts
    from hf_scd.models import load_model

    producer, tokenizer = smollm2
    variant = load_model(TUNED)[0]
    doc = _prompts(tokenizer, 1, 300)[0]
    messages = [{"role": "user", "content": f"{doc}\n\nWhat does the text above describe?"}]
    body = {"model": TUNED, "messages": messages, "max_tokens": NEW_TOKENS, "temperature": 0}
    status, reply = _post(f"{cluster.url}/v1/chat/completions", body)
    assert status == 200, reply
    assert reply["object"] == "chat.completion"
    transfer = reply["usage"]["hf_scd"]
    assert transfer["outcome"] == "transferred", transfer
    assert reply["choices"][0]["message"]["role"] == "assistant"
    # The consumer is the fine-tune, continuing from the producer's cache through the pair's artifacts.
    pair = SCDArtifacts.from_pretrained(PAIR_ARTIFACTS)
    text = reply["choices"][0]["message"]["content"]
    _check_against_oracle(producer, variant, tokenizer, pair, _ids(tokenizer, messages=messages), text)


def test_streaming_returns_the_same_tokens(cluster, smollm2):
    _, tokenizer = smollm2
    prompt = _prompts(tokenizer, 1, 300)[0]
    whole = _completion(cluster, prompt)["choices"][0]["text"]
    body = {"model": SAME, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "stream": True}
    events = _stream(f"{cluster.url}/v1/completions", body | {"stream_options": {"include_usage": True}})
    texts = [event["choices"][0]["text"] for event in events if event["choices"]]
    assert len([text for text in texts if text]) > 3  # arrived in pieces, not at the end
    assert "".join(texts) == whole
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert events[-1]["usage"]["completion_tokens"] == NEW_TOKENS
    assert events[-1]["usage"]["hf_scd"]["outcome"] == "transferred"

    chat = {"model": SAME, "messages": [{"role": "user", "content": prompt}], "max_tokens": 8, "temperature": 0}
    status, reply = _post(f"{cluster.url}/v1/chat/completions", chat)
    chunks = _stream(f"{cluster.url}/v1/chat/completions", chat | {"stream": True})
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    streamed = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks)
    assert status == 200 and streamed == reply["choices"][0]["message"]["content"]


def test_a_request_may_ask_for_no_transfer(cluster, smollm2):
    model, tokenizer = smollm2
    prompt = _prompts(tokenizer, 1, 200)[0]
    transfer = (reply := _completion(cluster, prompt, kv_transfer="never"))["usage"]["hf_scd"]
    assert (transfer["outcome"], transfer["fallback_reason"], transfer["wire_bytes"]) == (
        "prefilled",
        "asked for no transfer",
        0,
    )
    assert transfer["prefill_ms"] > 0 and transfer["tokens"] == len(tokenizer(prompt)["input_ids"]) - 1
    oracle, _ = _oracle(model, _ids(tokenizer, prompt))  # the decode replica's own prefill: the oracle exactly
    assert reply["choices"][0]["text"] == tokenizer.decode(oracle, skip_special_tokens=True)


def test_stop_strings_end_the_text(cluster, smollm2):
    _, tokenizer = smollm2
    prompt = _prompts(tokenizer, 1, 200)[0]
    whole = _completion(cluster, prompt)["choices"][0]["text"]
    stop = whole.strip().split()[2]
    reply = _completion(cluster, prompt, stop=[stop])
    assert reply["choices"][0]["text"] == whole[: whole.index(stop)]
    assert reply["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("path", "body", "status", "says"),
    [
        ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "no model 'gpt-4' here"),
        ("/v1/completions", {"model": SAME}, 400, "prompt: Field required"),
        ("/v1/completions", {"model": SAME, "prompt": "hi", "n": 3}, 400, "'n' is not supported"),
        ("/v1/completions", {"model": SAME, "prompt": "hi", "max_tokens": 10_000}, 400, "at most 64 tokens"),
        ("/v1/completions", {"model": SAME, "prompt": "hi", "temperature": -1}, 400, "temperature"),
        ("/v1/completions", {"model": SAME, "prompt": [1, 2, 10**9]}, 400, "token ids must lie in"),
        ("/v1/completions", {"model": SAME, "prompt": "word " * 3000}, 400, f"at most {MAX_PROMPT}"),
        ("/v1/chat/completions", {"model": SAME, "messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"model": SAME, "messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
        ("/v1/completions", b"{not json", 400, "JSON"),
    ],
)
def test_bad_requests_get_a_4xx_that_says_why(cluster, path, body, status, says):
    got, reply = _post(f"{cluster.url}{path}", body)
    assert got == status, reply
    assert says in reply["error"]["message"], reply


def test_eight_concurrent_requests_all_come_back_right(cluster, smollm2, same_artifacts):
    model, tokenizer = smollm2
    prompts = _prompts(tokenizer, 8, 200)
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda prompt: _completion(cluster, prompt), prompts))
    for prompt, reply in zip(prompts, replies, strict=True):
        assert reply["usage"]["hf_scd"]["outcome"] == "transferred", reply["usage"]
        shipped = _in_process(model, model, same_artifacts, _ids(tokenizer, prompt), POINT)
        assert reply["choices"][0]["text"] == tokenizer.decode(shipped, skip_special_tokens=True)


def test_the_usage_figures_are_exported_for_prometheus(cluster):
    """Serve's metrics API: what each response's usage block reports, per route, on this node's metrics endpoint."""
    counts = {}
    deadline = time.monotonic() + 60  # Ray exports every few seconds
    while time.monotonic() < deadline:
        with urllib.request.urlopen(cluster.metrics, timeout=10) as response:
            lines = response.read().decode().splitlines()
        for name in ("ray_hf_scd_requests_total", "ray_hf_scd_wire_bytes_total", "ray_hf_scd_bf16_bytes_total"):
            values = [float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name + "{") and SAME in line]
            counts[name] = sum(values)
        if all(counts.values()) and any(line.startswith("ray_hf_scd_stage_ms_bucket{") for line in lines):
            break
        time.sleep(2)
    assert counts["ray_hf_scd_requests_total"] >= 8, counts  # the tests above made more than that
    assert 0 < counts["ray_hf_scd_wire_bytes_total"] * 2 < counts["ray_hf_scd_bf16_bytes_total"], counts


def test_a_prefill_replica_killed_mid_request_still_answers(cluster, smollm2):
    from ray import serve

    model, tokenizer = smollm2
    prompt = _prompts(tokenizer, 1, MAX_PROMPT - 100)[0]  # a long prefill, to kill it while it streams
    stats = serve.get_deployment_handle("Prefill", app_name="tcp").stats
    before = stats.remote().result()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(_completion, cluster, prompt)
        deadline = time.monotonic() + 120
        while (now := stats.remote().result())["layers_streamed"] < before["layers_streamed"] + 2:
            assert time.monotonic() < deadline and not pending.done(), "the prefill replica never started streaming"
            time.sleep(0.01)
        os.kill(now["pid"], signal.SIGKILL)
        reply = pending.result()
    transfer = reply["usage"]["hf_scd"]
    assert transfer["outcome"] == "prefilled", transfer
    assert "ConnectionLostError" in transfer["fallback_reason"], transfer
    oracle, _ = _oracle(model, _ids(tokenizer, prompt))  # the decode replica's own prefill: the oracle exactly
    assert reply["choices"][0]["text"] == tokenizer.decode(oracle, skip_special_tokens=True)
