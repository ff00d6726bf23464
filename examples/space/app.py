"""hf-scd on Spaces: ship a conversation's KV cache as SCD codes, and continue it from them beside the oracle.

    python examples/space/app.py [--port 7860]

"Ship a cache": SmolLM2-135M-Instruct (the producer) prefills the conversation, and its cache is encoded into a
payload, offered for download. The consumer (the same model, or a fine-tuned variant through pair artifacts)
rebuilds the cache from the payload's bytes and answers; beside it, the oracle: the consumer prefilling the same
conversation itself. "Continue from a payload" does the consumer's half for a `.scd` file made anywhere, and shows
the typed error a wrong or damaged file gets.

Artifacts and the variant's adapter come from the repo's `hub_artifacts/`, or from `$HF_SCD_ARTIFACTS` naming a copy
of that folder (examples/space/README.md: running it as a Space).
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import gradio as gr
import torch

from hf_scd import SCDArtifacts, SCDCache, SCDError, SCDPayload
from hf_scd.compat import with_cache
from hf_scd.models import HUB_ARTIFACTS, load_model

PRODUCER = "smollm2-135m-instruct"


@dataclass(frozen=True)
class Route:
    """Who rebuilds the cache, and with which artifacts (a pair's when the consumer has other weights)."""

    consumer: str
    artifacts: str


ROUTES = {
    "SmolLM2-135M-Instruct (the same model)": Route("smollm2-135m-instruct", "smollm2-135m-instruct"),
    "SmolLM2-135M-Instruct fine-tuned on stdlib docs (LoRA)": Route(
        "smollm2-135m-instruct-stdlib", "smollm2-135m-instruct-stdlib-pair"
    ),
}
PASSAGE = (
    "The Amazon rainforest covers much of the Amazon basin of South America. The basin encompasses seven million "
    "square kilometres, of which five and a half million are covered by the rainforest. The region includes "
    "territory belonging to nine nations. The majority of the forest is contained within Brazil, with 60% of the "
    "rainforest, followed by Peru with 13%, Colombia with 10%, and with minor amounts in Bolivia, Ecuador, French "
    "Guiana, Guyana, Suriname, and Venezuela."
)
QUESTION = "Which country holds most of the Amazon rainforest?"


@dataclass(frozen=True)
class Continuation:
    """The consumer's answer from the shipped codes, the oracle's from its own prefill, and what each cost."""

    scd: str
    oracle: str
    identical_tokens: int
    new_tokens: int
    rebuild_ms: float
    prefill_ms: float


@cache
def model(name: str):
    return load_model(name)


@cache
def artifacts(name: str) -> SCDArtifacts:
    return SCDArtifacts.from_pretrained(HUB_ARTIFACTS / name)


def assistant_header(tokenizer) -> torch.Tensor:
    """The tokens that open the assistant's turn: what the consumer appends to the shipped conversation."""
    turn = [{"role": "user", "content": "?"}]
    closed = tokenizer.apply_chat_template(turn, return_tensors="pt")["input_ids"]
    opened = tokenizer.apply_chat_template(turn, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    return opened[:, closed.shape[1] :]


class Demo:
    """Producer and consumer in one process, one request at a time (the models are shared)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    @torch.inference_mode()
    def ship(self, passage: str, question: str, route: Route, point: str) -> tuple[bytes, float, int]:
        """The producer's half: prefill the conversation into an SCDCache; (payload bytes, encode ms, tokens)."""
        producer, tokenizer = model(PRODUCER)
        turn = [{"role": "user", "content": f"{passage.strip()}\n\n{question.strip()}".strip()}]
        ids = tokenizer.apply_chat_template(turn, return_tensors="pt")["input_ids"]
        cache = SCDCache(artifacts(route.artifacts), model=producer, point=point)
        producer(ids, **with_cache(producer, cache))
        start = time.perf_counter()
        blob = cache.encode().to_bytes()
        return blob, (time.perf_counter() - start) * 1e3, ids.shape[1]

    @torch.inference_mode()
    def resume(self, blob: bytes, route: Route, max_new_tokens: int) -> Continuation:
        """The consumer's half: rebuild the cache from the payload and answer, beside its own prefill's answer."""
        consumer, tokenizer = model(route.consumer)
        start = time.perf_counter()
        cache = SCDCache.from_payload(SCDPayload.from_bytes(blob), artifacts(route.artifacts), model=consumer)
        rebuild_ms = (time.perf_counter() - start) * 1e3
        prefix = cache.input_ids
        start = time.perf_counter()
        consumer(prefix, logits_to_keep=1)
        prefill_ms = (time.perf_counter() - start) * 1e3
        ids = torch.cat([prefix, assistant_header(tokenizer).expand(prefix.shape[0], -1)], dim=1)
        settings = {"max_new_tokens": max_new_tokens, "do_sample": False}
        scd = consumer.generate(ids, **with_cache(consumer, cache), **settings)[0, ids.shape[1] :]
        oracle = consumer.generate(ids, **settings)[0, ids.shape[1] :]
        same = 0
        while same < min(len(scd), len(oracle)) and scd[same] == oracle[same]:
            same += 1
        return Continuation(
            scd=tokenizer.decode(scd, skip_special_tokens=True),
            oracle=tokenizer.decode(oracle, skip_special_tokens=True),
            identical_tokens=same,
            new_tokens=len(oracle),
            rebuild_ms=rebuild_ms,
            prefill_ms=prefill_ms,
        )

    def ship_and_resume(self, passage: str, question: str, route_name: str, point: str, max_new_tokens: int):
        """Gradio handler of "Ship a cache": the statistics, both answers and the payload as a file."""
        route = ROUTES[route_name]
        with self.lock:
            blob, encode_ms, tokens = self.ship(passage, question, route, point)
            answer = self.resume(blob, route, int(max_new_tokens))
        chosen = artifacts(route.artifacts).point(point)
        bf16 = artifacts(route.artifacts).shape.bf16_bytes_per_token() * tokens
        path = Path(tempfile.mkdtemp(prefix="hf-scd-")) / "conversation.scd"
        path.write_bytes(blob)
        stats = _table(
            f"| conversation | {tokens} tokens |",
            f"| operating point | {chosen.name} (validation KL {chosen.val_kl:.4f}) |",
            f"| payload | {len(blob):,} bytes, **{bf16 / len(blob):.2f}x** smaller than BF16 KV ({bf16:,} bytes) |",
            f"| producer encode | {encode_ms:.0f} ms |",
            *_consumer_rows(answer),
        )
        return stats, answer.scd, answer.oracle, str(path)

    def resume_file(self, blob: bytes | None, route_name: str, max_new_tokens: int):
        """Gradio handler of "Continue from a payload": a payload the library refuses shows its typed error in place
        of the results."""
        if not blob:
            return "Upload a `.scd` payload first.", "", ""
        try:
            with self.lock:
                answer = self.resume(blob, ROUTES[route_name], int(max_new_tokens))
        except SCDError as error:
            return f"**{type(error).__name__}**: {error}", "", ""
        return _table(*_consumer_rows(answer)), answer.scd, answer.oracle


def _table(*rows: str) -> str:
    return "\n".join(["| step | result |", "|---|---|", *rows])


def _consumer_rows(answer: Continuation) -> list[str]:
    agreement = (
        "identical"
        if answer.identical_tokens == answer.new_tokens
        else f"first {answer.identical_tokens} of {answer.new_tokens} tokens identical"
    )
    return [
        f"| consumer rebuild | {answer.rebuild_ms:.0f} ms, vs {answer.prefill_ms:.0f} ms to prefill it (this CPU) |",
        f"| answers (greedy) | {agreement} |",
    ]


def build(demo: Demo) -> gr.Blocks:
    routes = list(ROUTES)
    with gr.Blocks(title="hf-scd: ship a KV cache") as blocks:
        gr.Markdown(
            "# hf-scd: ship a KV cache as compact codes\n"
            "The producer prefills the conversation and sends its KV cache as SCD codes (de-rotated keys and "
            "values on calibrated bases, bit-allocated quantization). The consumer rebuilds the cache from the bytes "
            "and answers without prefilling; the oracle is the consumer prefilling the conversation itself."
        )
        with gr.Tab("Ship a cache"):
            passage = gr.Textbox(PASSAGE, label="Context", lines=5)
            question = gr.Textbox(QUESTION, label="Question")
            with gr.Row():
                route = gr.Dropdown(routes, value=routes[0], label="Consumer")
                point = gr.Dropdown(_points(routes[0]), value=_default_point(routes[0]), label="Operating point")
                max_new = gr.Slider(8, 96, value=40, step=8, label="New tokens")
            route.change(lambda name: gr.Dropdown(choices=_points(name), value=_default_point(name)), route, point)
            ship = gr.Button("Ship the cache", variant="primary")
            stats = gr.Markdown(elem_id="ship-stats")
            with gr.Row():
                scd = gr.Textbox(label="Consumer, from the shipped codes", elem_id="ship-scd", lines=4)
                oracle = gr.Textbox(label="Oracle, its own prefill", elem_id="ship-oracle", lines=4)
            payload = gr.File(label="Payload (.scd)", elem_id="ship-payload")
            ship.click(demo.ship_and_resume, [passage, question, route, point, max_new], [stats, scd, oracle, payload])
        with gr.Tab("Continue from a payload"):
            upload = gr.File(label="Payload (.scd)", type="binary", elem_id="resume-upload")
            with gr.Row():
                resume_route = gr.Dropdown(routes, value=routes[0], label="Consumer", elem_id="resume-route")
                resume_max_new = gr.Slider(8, 96, value=40, step=8, label="New tokens")
            resume = gr.Button("Continue", variant="primary")
            resume_stats = gr.Markdown(elem_id="resume-stats")
            with gr.Row():
                resume_scd = gr.Textbox(label="Consumer, from the payload", elem_id="resume-scd", lines=4)
                resume_oracle = gr.Textbox(label="Oracle, its own prefill", elem_id="resume-oracle", lines=4)
            resume.click(
                demo.resume_file, [upload, resume_route, resume_max_new], [resume_stats, resume_scd, resume_oracle]
            )
    return blocks


def _points(route_name: str) -> list[str]:
    return [point.name for point in artifacts(ROUTES[route_name].artifacts).points]


def _default_point(route_name: str) -> str:
    return artifacts(ROUTES[route_name].artifacts).select_point().name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", help="default: $GRADIO_SERVER_NAME, else 127.0.0.1 (Spaces sets it)")
    parser.add_argument("--port", type=int, help="default: $GRADIO_SERVER_PORT, else 7860")
    args = parser.parse_args()
    build(Demo()).launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
