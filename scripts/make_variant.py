"""Fine-tune a packaged model into a *variant* with LoRA, so a producer/consumer pair has truly different weights.

Handing a base model's KV cache to a fine-tune of it is the case SCD has to beat: naive reuse costs something only
when the weights differ. This trains a LoRA on every linear layer of the decoder (q, k, v, o, gate, up, down) with
the causal-LM loss on the standard-library docstrings (the calibration corpus; the held-out pydoc topics are never
trained on), saves the adapter in bf16 (a few MB) with a model card, and reports held-out NLL of base vs variant.

Raw docstrings alone teach a chat model to continue text instead of answering: the variant forgets the terse answer
formats QA is scored on. `--chat-replay N` mixes N chat turns into the training stream whose questions are about
docstrings and whose answers are the base model's own greedy replies (replay, the usual guard against forgetting).

    python scripts/make_variant.py --model smollm2-135m-instruct \\
        --out hub_artifacts/smollm2-135m-instruct-stdlib-lora --steps 300 --lr 1e-3
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import shlex
import sys
import time
from pathlib import Path

import torch
from naive_reuse_check import CONT, PREFIX, check  # scripts/ is on sys.path when this file runs as a script
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from hf_scd.eval.corpus import CALIBRATION_MODULES, calibration_texts, evaluation_texts, token_documents
from hf_scd.models import PACKAGED_MODELS, load_model, load_with_lora

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HELD_OUT_DOCS = 8
HELD_OUT_TOKENS = 512
SAMPLE_PROMPT = "What does Python's functools.lru_cache do? Answer in two sentences."
SAMPLE_TOKENS = 48
REUSE_DOCS = 4
# Replay questions: terse-answer instructions about a docstring excerpt, answered by the base model itself.
REPLAY_TEMPLATES = (
    "{excerpt}\n\nSummarize the text above in one sentence.",
    "Read the documentation and answer with the name only.\n\n{excerpt}\n\nQuestion: Which Python object does it "
    "document?",
    "{excerpt}\n\nList two keywords of the text above, separated by a comma, and nothing else.",
)
REPLAY_EXCERPT_CHARS = 700
REPLAY_ANSWER_TOKENS = 40
REPLAY_BATCH = 8


def _excerpt(doc: str) -> str:
    """Leading whole paragraphs of a docstring, up to `REPLAY_EXCERPT_CHARS` (at least the first one)."""
    paragraphs = doc.split("\n\n")
    kept = [paragraphs[0]]
    for paragraph in paragraphs[1:]:
        if len("\n\n".join([*kept, paragraph])) > REPLAY_EXCERPT_CHARS:
            break
        kept.append(paragraph)
    return "\n\n".join(kept)


@torch.no_grad()
def chat_replay(model, tokenizer, count: int, seed: int) -> list[list[int]]:
    """`count` chat conversations (token ids) about random docstrings, answered greedily by `model`."""
    docs = random.Random(seed).sample(calibration_texts(), count)
    questions = [REPLAY_TEMPLATES[i % len(REPLAY_TEMPLATES)].format(excerpt=_excerpt(d)) for i, d in enumerate(docs)]
    tokenizer.padding_side = "left"
    conversations = []
    for start in tqdm(range(0, count, REPLAY_BATCH), desc="replay answers"):
        batch = [[{"role": "user", "content": q}] for q in questions[start : start + REPLAY_BATCH]]
        inputs = tokenizer.apply_chat_template(
            batch, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
        )
        out = model.generate(**inputs, max_new_tokens=REPLAY_ANSWER_TOKENS, do_sample=False)
        answers = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        conversations += [
            [*turn, {"role": "assistant", "content": a.strip()}] for turn, a in zip(batch, answers, strict=True)
        ]
    return [list(tokenizer.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"]) for c in conversations]


def packed_sequences(tokenizer, seq: int, chats: list[list[int]], seed: int) -> torch.Tensor:
    """Calibration docs and chat conversations, shuffled together, joined with EOS and cut into (n, seq) rows; the
    ragged tail is dropped."""
    pieces = token_documents(tokenizer, calibration_texts(), min_tokens=1)
    if chats:  # docstrings alone keep their fixed order, so adapters trained without replay still reproduce
        pieces += chats
        random.Random(seed).shuffle(pieces)
    stream: list[int] = []
    for piece in pieces:
        stream += piece + [tokenizer.eos_token_id]
    n = len(stream) // seq
    return torch.tensor(stream[: n * seq]).view(n, seq)


def batches(data: torch.Tensor, batch: int, steps: int, seed: int):
    """``steps`` batches of rows, reshuffled each epoch with a fixed generator (full batches only)."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch:
            order = torch.randperm(len(data), generator=gen).tolist()
        rows, order = order[:batch], order[batch:]
        yield data[rows]


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def held_out_nll(model, tokenizer) -> float:
    """Mean next-token NLL (nats) over the first 8 evaluation docs, 512 tokens each."""
    docs = token_documents(tokenizer, evaluation_texts(), HELD_OUT_TOKENS)[:HELD_OUT_DOCS]
    model.eval()
    losses = [model(torch.tensor([d[:HELD_OUT_TOKENS]]), labels=torch.tensor([d[:HELD_OUT_TOKENS]])).loss for d in docs]
    return torch.stack(losses).mean().item()


@torch.no_grad()
def greedy_sample(model, tokenizer) -> str:
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": SAMPLE_PROMPT}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**prompt, max_new_tokens=SAMPLE_TOKENS, do_sample=False)
    return tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def adapter_to_bf16(out: Path) -> int:
    path = out / "adapter_model.safetensors"
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(path).items()}
    save_file(tensors, path, metadata={"format": "pt"})
    return path.stat().st_size


def write_card(out: Path, args, info: dict) -> None:
    spec = PACKAGED_MODELS[args.model]
    name = out.name.removesuffix("-lora")
    replay = (
        f" Mixed in (shuffled with the docstrings): {info['replay']} chat turns ({info['replay_tokens']} tokens) that "
        "ask terse-answer questions about docstring excerpts and carry the base model's own greedy answers, so the "
        "variant keeps the chat answer format (replay against forgetting)."
        if info["replay"]
        else ""
    )
    reuse_rows = "\n".join(
        f"| {method} | {r['kl']:.4f} | {r['top1']:.3f} | {r['nll']:.4f} |" for method, r in info["reuse"].items()
    )
    card = f"""---
library_name: peft
base_model: {spec.hub_id}
license: apache-2.0
tags:
- hf-scd
- lora
- kv-cache
---

# {name}: a LoRA fine-tune of {spec.hub_id} on Python standard-library docstrings

A small, real fine-tune of `{spec.hub_id}` made for [hf-scd](https://github.com/hf-scd/hf-scd): handing the
base model's KV cache to this variant (naive cache reuse) is measurably wrong, so a producer/consumer pair with
different weights can be tested offline. Load it with `hf_scd.models.load_model("{name}")`, which merges the
adapter into the base in float32 and then casts.

## Data

{len(calibration_texts())} docstrings (>= 400 chars, deduplicated) of the public objects of
{len(CALIBRATION_MODULES)} pure-Python standard-library modules (PSF License 2.0;
`hf_scd.eval.corpus.calibration_texts()`).{replay} In all {info["train_tokens"]} tokens, joined with EOS and
packed into {info["rows"]} sequences of {args.seq} tokens. The held-out pydoc language-reference topics
(`evaluation_texts()`) were not trained on.

## Training

LoRA rank {args.rank}, alpha {args.alpha}, dropout {args.dropout} on {", ".join(TARGET_MODULES)} of every
decoder layer ({info["trainable"]:,} trainable parameters); causal-LM loss; AdamW (weight decay 0), peak lr
{args.lr}, linear warmup {info["warmup"]} steps then cosine to 10%; {args.steps} steps x batch {args.batch} x
{args.seq} tokens ({info["epochs"]:.1f} epochs); seed {args.seed}; float32 on CPU ({args.threads} threads, torch
{torch.__version__}, peft {info["peft"]}, transformers {info["transformers"]}); {info["train_s"] / 60:.1f} min at
{info["tok_s"]:.0f} tokens/s. The adapter is stored in bf16.

```
{info["command"]}
```

| | value |
|---|---|
| final train loss (mean of last 10 steps) | {info["final_loss"]:.4f} |
| held-out NLL, base (nats/token) | {info["base_nll"]:.4f} |
| held-out NLL, variant (nats/token) | {info["variant_nll"]:.4f} |

Held-out NLL: mean next-token NLL on the first {HELD_OUT_DOCS} `evaluation_texts()` documents,
{HELD_OUT_TOKENS} tokens each.

## Naive cache reuse

`scripts/naive_reuse_check.py` on the first {REUSE_DOCS} held-out documents of >= {PREFIX + CONT} tokens: the
base model prefills {PREFIX} tokens, the variant continues teacher-forced for {CONT} more from that cache
("naive"), scored against the variant prefilling everything itself (the oracle). For scale: the variant with no
prefix at all, and the base model answering instead of the variant.

| consumer | KL(oracle ‖ it) | top-1 agreement | continuation NLL |
|---|---|---|---|
{reuse_rows}

## Greedy sample

Prompt: "{SAMPLE_PROMPT}"

- base: {info["base_sample"]!r}
- variant: {info["variant_sample"]!r}
"""
    (out / "README.md").write_text(card)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", choices=sorted(PACKAGED_MODELS))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--warmup", type=float, default=0.05, help="fraction of steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chat-replay", type=int, default=0, help="chat turns answered by the base to mix in")
    parser.add_argument("--skip-eval", action="store_true", help="no held-out NLL or samples (timing runs)")
    args = parser.parse_args()

    import peft
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    command = "python scripts/make_variant.py " + shlex.join(sys.argv[1:])

    model, tokenizer = load_model(args.model, dtype=torch.float32)
    chats = chat_replay(model, tokenizer, args.chat_replay, args.seed) if args.chat_replay else []
    data = packed_sequences(tokenizer, args.seq, chats, args.seed)
    info: dict = {"command": command, "rows": len(data), "train_tokens": data.numel()}
    info |= {"replay": len(chats), "replay_tokens": sum(map(len, chats))}
    info |= {"peft": peft.__version__, "transformers": transformers.__version__}
    if not args.skip_eval:
        info["base_nll"] = held_out_nll(model, tokenizer)
        info["base_sample"] = greedy_sample(model, tokenizer)
        print(f"held-out NLL base {info['base_nll']:.4f}\nbase sample: {info['base_sample']!r}")

    config = LoraConfig(
        r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=TARGET_MODULES,
        task_type="CAUSAL_LM",
    )  # fmt: skip
    model = get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    info["trainable"] = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = max(1, round(args.warmup * args.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, args.steps, warmup))
    info |= {"warmup": warmup, "epochs": args.steps * args.batch / len(data)}

    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(batches(data, args.batch, args.steps, args.seed), total=args.steps, desc="train")
    for step, ids in enumerate(bar):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tok_s = (step + 1) * ids.numel() / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tok_s:.0f}")
    info["train_s"] = time.perf_counter() - start
    info["tok_s"] = args.steps * args.batch * args.seq / info["train_s"]
    info["final_loss"] = sum(losses[-10:]) / len(losses[-10:])
    print(f"{info['train_s']:.0f} s, {info['tok_s']:.0f} tokens/s, final train loss {info['final_loss']:.4f}")

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    config_path = args.out / "adapter_config.json"  # name the Hub base, not this machine's cache folder
    config_json = json.loads(config_path.read_text()) | {"base_model_name_or_path": PACKAGED_MODELS[args.model].hub_id}
    config_path.write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
    size = adapter_to_bf16(args.out)
    (args.out / "train_log.json").write_text(json.dumps({"command": command, "losses": losses}) + "\n")
    print(f"adapter: {size / 2**20:.2f} MiB in {args.out}")
    if args.skip_eval:
        return

    del model
    variant, tokenizer = load_with_lora(args.model, args.out, torch.float32)
    info["variant_nll"] = held_out_nll(variant, tokenizer)
    info["variant_sample"] = greedy_sample(variant, tokenizer)
    print(f"held-out NLL base {info['base_nll']:.4f} variant {info['variant_nll']:.4f}")
    print(f"variant sample: {info['variant_sample']!r}")
    base_model = load_model(args.model, dtype=torch.float32)[0]
    docs = token_documents(tokenizer, evaluation_texts(), PREFIX + CONT)[:REUSE_DOCS]
    info["reuse"] = check(base_model, variant, docs)
    for method, r in info["reuse"].items():
        print(f"{method:<12} KL {r['kl']:.4f} top-1 {r['top1']:.3f} NLL {r['nll']:.4f}")
    info["machine"] = platform.machine()
    write_card(args.out, args, info)


if __name__ == "__main__":
    main()
