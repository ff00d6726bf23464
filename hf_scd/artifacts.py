"""SCDArtifacts: the calibration a model needs for SCD, stored as a Hub repo (config + safetensors + card).

``config.json`` says which model (architecture, KV shape, weight fingerprint) the artifacts were fitted on, what the
fit probe measured on it (same-model artifacts), how many leading tokens ship exactly, and lists the operating points
of the plan; ``codec.safetensors`` holds, stacked
over (Reuse unit, K/V), the means, encoder matrices (and, across variants, decoder matrices: a model's own decoder is
its encoder's inverse, derived on load; a pair's joint units store both factored, `factored_coders`) and quantizer
steps, and per operating point the bit allocation of every
component; ``README.md`` is the model card. Loading checks the tensors against the hash the
config records.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch
from huggingface_hub import ModelHubMixin, snapshot_download
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from . import linalg
from .arch import ModelHandle
from .codes import MAX_BITS, TransformCode
from .errors import ArtifactError, ArtifactFitWarning, ArtifactMismatchError, OperatingPointError
from .fidelity import DistortionMetric
from .patch import Aligner
from .plan import ALL_TOKENS, PatchLayer, Plan, ReuseUnit, SinkPolicy
from .probe import fit_verdict
from .schema import ARTIFACTS_FORMAT_VERSION, EXACT_POINT, KINDS, ArtifactsConfig, OperatingPoint, TensorKeys

TENSORS_FILE = "codec.safetensors"


class SCDArtifacts(
    ModelHubMixin,
    library_name="hf-scd",
    tags=["hf-scd", "kv-cache", "kv-cache-compression"],
    repo_url="https://github.com/hf-scd/hf-scd",
):
    """Calibration artifacts for one model: bases, quantizer steps and the bit-allocation plan."""

    def __init__(self, config: ArtifactsConfig, tensors: dict[str, torch.Tensor], card: str | None = None):
        _check_tensors(config, tensors)
        self.config = config
        self.tensors = tensors
        self.card = card
        self.shape = config.model.shape
        self.points = list(config.operating_points)
        self._plans: dict[tuple[str, str], Plan] = {}
        self._metrics: dict[tuple[str, str], DistortionMetric] = {}
        self.coders = _coder_matrices(tensors)

    # ---- identity ---------------------------------------------------------------------------------------------

    @property
    def artifacts_id(self) -> str:
        """Content hash of the tensors: payloads name the artifacts they were made with by it."""
        return self.config.tensors_sha256[:16]

    @property
    def model_fingerprint(self) -> str:
        return self.config.model.fingerprint

    @property
    def patch_candidates(self) -> list[int]:
        """Layers that some operating point may patch: the producer records their attention input."""
        return self.tensors[TensorKeys.PATCH_LAYERS].tolist() if TensorKeys.PATCH_LAYERS in self.tensors else []

    @property
    def is_pair(self) -> bool:
        """Whether these artifacts ship a producer's cache to a different consumer model."""
        return self.config.consumer is not None

    def describe(self) -> str:
        """ "model" or "producer -> consumer": what these artifacts were fitted for."""
        name = self.config.model.name
        return f"{name} -> {self.config.consumer.name}" if self.is_pair else name

    def identify(self, model: torch.nn.Module, *, strict: bool = False) -> tuple[ModelHandle, str]:
        """The model's handle and its role: "producer" for the model these artifacts were fitted on (which, for
        same-model artifacts, also rebuilds), "consumer" for the fine-tune of a pair; a clear error for any other.

        Two questions, answered apart. Identity: the weights whose fingerprint the artifacts record are accepted at
        once. Fit: same-model artifacts also accept other weights (the model in another precision, requantized) when
        the fit probe (`hf_scd.probe`) through their codes comes, in every layer, within `FIT_TOLERANCE` of what
        calibration measured, with an `ArtifactFitWarning` saying what was accepted; `strict=True` refuses them. Pair
        artifacts accept their two fitted models only.
        """
        handle = ModelHandle(model)
        if handle.shape != self.shape:
            raise ArtifactMismatchError(
                f"artifacts were fitted on a {self.shape} model ({self.describe()}); this model is "
                f"{handle.shape}. Load the artifacts published for this model."
            )
        fingerprint = handle.fingerprint
        roles = {"producer": self.config.model} | ({"consumer": self.config.consumer} if self.is_pair else {})
        for role, fitted in roles.items():
            if fitted.fingerprint == fingerprint:
                return handle, role
        fitted_on = " or ".join(f"{e.name} (weights fingerprint {e.fingerprint})" for e in roles.values())
        differ = f"artifacts were fitted on {fitted_on}; this model's weights differ (fingerprint {fingerprint})"
        remedy = "Use artifacts calibrated for these weights (`hf-scd calibrate`)."
        probe = None if self.is_pair else self.config.fit_probe
        if probe is None or strict:
            why = (
                "and strict=True accepts only the weights they were fitted on"
                if probe is not None
                else "e.g. a fine-tuned variant or the model of another pair"
            )
            raise ArtifactMismatchError(f"{differ}, {why}. {remedy}")
        verdict = fit_verdict(self, handle)
        if not verdict.fits:
            raise ArtifactMismatchError(f"{differ}, and the codes do not fit them: {verdict.describe()}. {remedy}")
        warnings.warn(
            f"{self.describe()} artifacts accepted for weights they were not fitted on (fingerprint {fingerprint}, "
            f"fitted on {self.config.model.fingerprint}): {verdict.describe()}. Payloads made on this model rebuild "
            "only on these same weights; strict=True refuses weights other than the fitted ones.",
            ArtifactFitWarning,
            stacklevel=3,
        )
        return handle, "producer"

    def check_producer(self, fingerprint: str, model: torch.nn.Module) -> None:
        """Refuse a payload whose producer is not the model it must be, by its exact weights fingerprint: for
        same-model artifacts the consumer `model`'s own weights (whatever fit was accepted, a cache rebuilds only on
        the weights that made it), for a pair the pair's producer."""
        handle = ModelHandle(model)
        if self.is_pair:
            producer = self.config.model
            if fingerprint != producer.fingerprint:
                raise ArtifactMismatchError(
                    f"payload was made by weights with fingerprint {fingerprint}, not by {producer.name} "
                    f"({producer.fingerprint}), the producer of the pair {self.describe()}"
                )
        elif fingerprint != handle.fingerprint:
            raise ArtifactMismatchError(
                f"payload was made by weights with fingerprint {fingerprint}; this model's are {handle.fingerprint}. "
                "Same-model artifacts rebuild a cache only on the weights that made it (a fine-tune or a "
                "requantization of the producer is another model): continue on the producer's weights, or ship "
                "between two models with pair artifacts (`hf-scd calibrate --producer P --consumer C`)."
            )

    # ---- operating points -------------------------------------------------------------------------------------

    def select_point(self, ratio: float | None = None, max_kl: float | None = None) -> OperatingPoint:
        """Resolve a target to a point: at least `ratio` x smaller than BF16 and/or validation KL <= `max_kl`.

        With a ratio, the most faithful point that reaches it; with only a KL bound, the smallest point within it;
        with neither, the plan's default point.
        """
        for name, value in (("ratio", ratio), ("max_kl", max_kl)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value != value):
                raise OperatingPointError(f"{name} must be a number, got {value!r}")
        if ratio is None and max_kl is None:
            return self.point(self.config.default_point)
        candidates = [
            p
            for p in self.points
            if (ratio is None or p.ratio_vs_bf16 >= ratio) and (max_kl is None or p.val_kl <= max_kl)
        ]
        if not candidates:
            available = ", ".join(f"{p.name} ({p.ratio_vs_bf16:.1f}x, KL {p.val_kl:.4f})" for p in self.points)
            raise OperatingPointError(f"no operating point meets ratio>={ratio}, KL<={max_kl}; available: {available}")
        if ratio is not None:
            return min(candidates, key=lambda p: (p.val_kl, -p.ratio_vs_bf16))
        return max(candidates, key=lambda p: p.ratio_vs_bf16)

    def point(self, name: str) -> OperatingPoint:
        """A calibrated point by name, or (same-model artifacts) the reserved `EXACT_POINT`."""
        for point in self.points:
            if point.name == name:
                return point
        if name == EXACT_POINT and not self.is_pair:
            return self.exact_point
        raise OperatingPointError(
            f"operating point {name!r} is not in these artifacts: {[p.name for p in self.points]}"
        )

    @property
    def exact_point(self) -> OperatingPoint:
        """The reserved point that ships every token's K/V in bf16, as the sink ships: what a fidelity check falls
        back to when no point is faithful enough. A pair has none: the producer's exact K/V are another model's."""
        if self.is_pair:
            raise OperatingPointError(f"pair artifacts ({self.describe()}) have no {EXACT_POINT!r} point")
        return OperatingPoint(EXACT_POINT, float(self.shape.bf16_bytes_per_token()), 1.0, 0.0, 1.0)

    def plan(self, point: str, device: torch.device | str = "cpu") -> Plan:
        """The plan of an operating point, its tensors on `device` (built once per point and device): Reuse coders
        for most layers, Patch coders for the point's `patch_layers`, and the sink policy."""
        cache_key = (point, str(device))
        if cache_key not in self._plans:
            patch_layers = self.point(point).patch_layers
            sink = SinkPolicy(exact=self.config.codec.exact_tokens, recomputed=self.config.codec.recomputed_tokens)
            # The exact point codes no token: its (never used) coders are the default point's, its sink is everything.
            coders = self.config.default_point if point == EXACT_POINT else point
            if point == EXACT_POINT:
                sink = SinkPolicy(exact=ALL_TOKENS)
            layers: list[ReuseUnit | PatchLayer] = []
            for unit, members in enumerate(self.config.codec.units(self.shape.num_layers)):
                if set(members) <= set(patch_layers):  # a Patch layer is a unit of one layer (config checks)
                    layers.append(self._patch_layer(coders, members[0], device))
                else:
                    layers.extend([self._reuse_unit(coders, unit, members, device)] * len(members))
            layers = tuple(layers)
            self._plans[cache_key] = Plan(point, layers, sink, (self.shape.num_kv_heads, self.shape.head_dim))
        return self._plans[cache_key]

    def distortion_metric(self, handle: ModelHandle, device: torch.device | str) -> DistortionMetric:
        """The metric a fidelity check weighs this model's errors in (built once per weights and device)."""
        fidelity = self.config.fidelity
        if fidelity is None:
            remedy = (
                "a pair's producer never holds the consumer's exact K/V to measure against"
                if self.is_pair
                else "re-run `hf-scd calibrate` or `python scripts/add_fidelity_map.py FOLDER`"
            )
            raise OperatingPointError(
                f"the {self.describe()} artifacts carry no fidelity map, so a request's KL cannot be predicted: "
                f"{remedy}"
            )
        cache_key = (handle.fingerprint, str(device))
        if cache_key not in self._metrics:
            energy = [torch.tensor(layer) for layer in fidelity.query_energy]
            self._metrics[cache_key] = DistortionMetric.of(energy, fidelity.layer_weights, handle, device)
        return self._metrics[cache_key]

    def _reuse_unit(self, point: str, unit: int, members: tuple[int, ...], device: torch.device | str) -> ReuseUnit:
        bits = self.tensors[TensorKeys.bits(point)]
        coders = self.coders
        key, value = (
            TransformCode(
                mean=self.tensors["mean"][unit, index],
                encoder=coders["encoder"][unit, index],
                decoder=coders["decoder"][unit, index],
                steps=self.tensors["steps"][unit, index],
                bits=bits[unit, index],
                out_mean=self.tensors["out_mean"][unit, index] if "out_mean" in self.tensors else None,
            ).to(device)
            for index in range(len(KINDS))
        )
        return ReuseUnit(members, key, value)

    def _patch_layer(self, point: str, layer: int, device: torch.device | str) -> PatchLayer:
        slot = self.patch_candidates.index(layer)
        hidden = TransformCode(
            **{f: self.tensors[TensorKeys.patch(f)][slot] for f in TensorKeys.REUSE_FIELDS},
            bits=self.tensors[TensorKeys.hidden_bits(point)][slot],
        )
        aligner = None
        if TensorKeys.aligner(layer, "w_in") in self.tensors:
            aligner = Aligner(*(self.tensors[TensorKeys.aligner(layer, f.name)] for f in fields(Aligner))).to(device)
        return PatchLayer(hidden.to(device), aligner)

    # ---- persistence ------------------------------------------------------------------------------------------

    @classmethod
    def build(cls, config: ArtifactsConfig, tensors: dict[str, torch.Tensor], card: str | None = None) -> SCDArtifacts:
        """Artifacts from freshly fitted parts; stamps the format version and the tensors' hash into the config."""
        blob = st_save({k: v.contiguous() for k, v in tensors.items()})
        config = replace(config, format_version=ARTIFACTS_FORMAT_VERSION, tensors_sha256=_sha256(blob))
        return cls(config, st_load(blob), card)

    def _save_pretrained(self, save_directory: Path) -> None:
        save_directory = Path(save_directory)
        (save_directory / TENSORS_FILE).write_bytes(st_save({k: v.contiguous() for k, v in self.tensors.items()}))
        (save_directory / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        if self.card is not None:
            (save_directory / "README.md").write_text(self.card)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        force_download: bool = False,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        revision: str | None = None,
    ) -> SCDArtifacts:
        """Artifacts from a local folder or a Hub repo id (`ModelHubMixin.from_pretrained`'s signature).

        Reads and checks `config.json` itself, so a malformed file is an `ArtifactError` naming what is wrong, and a
        local path that does not exist fails at once instead of being tried as a Hub id.
        """
        model_id = str(pretrained_model_name_or_path)
        folder = Path(model_id)
        if not folder.is_dir():
            if _looks_like_a_path(str(model_id)):
                raise ArtifactError(f"{model_id} is not a folder: no hf-scd artifacts there (a Hub id is 'owner/name')")
            folder = Path(
                snapshot_download(
                    repo_id=model_id,
                    revision=revision,
                    cache_dir=cache_dir,
                    force_download=force_download,
                    local_files_only=local_files_only,
                    token=token,
                )
            )
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise ArtifactError(f"{folder} has no config.json: not an hf-scd artifact folder")
        try:
            config = ArtifactsConfig.from_dict(json.loads(config_path.read_bytes().decode("utf-8")))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ArtifactError(f"{config_path} is not valid UTF-8 JSON: {exc}") from exc
        tensors_path = folder / TENSORS_FILE
        if not tensors_path.is_file():
            raise ArtifactError(f"{folder} has no {TENSORS_FILE}: not an hf-scd artifact folder")
        blob = tensors_path.read_bytes()
        if _sha256(blob) != config.tensors_sha256:
            raise ArtifactError(f"{tensors_path} does not match the hash in config.json: the download is corrupted")
        try:
            tensors = st_load(blob)
        except (SafetensorError, ValueError) as exc:
            raise ArtifactError(f"{tensors_path} is not a valid safetensors file: {exc}") from exc
        card = (folder / "README.md").read_text() if (folder / "README.md").exists() else None
        return cls(config, tensors, card)

    def summary(self) -> dict:
        config = self.config.to_dict()
        models = {"model": config["model"]} | ({"consumer": config["consumer"]} if self.is_pair else {})
        return models | {"operating_points": [asdict(p) for p in self.points]}


def _check_tensors(config: ArtifactsConfig, tensors: dict[str, torch.Tensor]) -> None:
    """The tensors every operating point needs, with the shapes, dtypes and values a plan can run on: finite
    matrices, bits of at most MAX_BITS, and a positive quantizer step for every bit width a point uses."""

    def need(
        key: str, shape: tuple[int | None, ...], dtype: torch.dtype | tuple[torch.dtype, ...] = torch.float32
    ) -> torch.Tensor:
        tensor = tensors.get(key)
        if tensor is None:
            raise ArtifactError(f"{TENSORS_FILE} has no tensor {key!r}")
        expected = tuple(t if s is None else s for s, t in zip(shape, tensor.shape, strict=False))
        dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
        if tensor.dtype not in dtypes or tensor.ndim != len(shape) or tuple(tensor.shape) != expected:
            raise ArtifactError(
                f"{TENSORS_FILE}: {key} is {tensor.dtype} {tuple(tensor.shape)}, expected {dtype} {shape}"
            )
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            raise ArtifactError(f"{TENSORS_FILE}: {key} has non-finite values")
        return tensor

    def check_bits(key: str, shape: tuple[int | None, ...], steps: torch.Tensor) -> None:
        bits = need(key, shape, torch.uint8)
        if bits.numel() and int(bits.max()) > MAX_BITS:
            raise ArtifactError(f"{TENSORS_FILE}: {key} gives a component more than {MAX_BITS} bits")
        table = steps.reshape(*steps.shape[:-1], *[1] * (bits.ndim - steps.ndim + 1), steps.shape[-1])
        used = table.expand(*bits.shape, steps.shape[-1]).gather(-1, bits.long().unsqueeze(-1)).squeeze(-1)
        if bool(((used <= 0) & (bits > 0)).any()):
            raise ArtifactError(f"{TENSORS_FILE}: {key} uses a bit width whose quantizer step is not positive")

    shape = config.model.shape
    units = len(config.codec.units(shape.num_layers))
    blocks, block_width = config.codec.blocks(shape)
    need("mean", (units, len(KINDS), blocks, block_width))
    if "out_mean" in tensors:
        need("out_mean", (units, len(KINDS), blocks, block_width))
    if "basis" in tensors:
        if "out_mean" not in tensors or "encoder" in tensors or "decoder" in tensors:
            raise ArtifactError(f"{TENSORS_FILE}: factored coders are a pair's, and stand in for 'encoder'/'decoder'")
        head_dim = config.model.shape.head_dim
        width = need("basis", (units, len(KINDS), blocks, block_width, None), (torch.float32, torch.float16)).shape[-1]
        if bool((need("spread", (units, len(KINDS), blocks, width)) <= 0).any()):
            raise ArtifactError(f"{TENSORS_FILE}: spread has a component whose spread is not positive")
        for factor in ("head_encoder", "head_decoder"):
            need(factor, (units, len(KINDS), blocks, block_width // head_dim, head_dim, head_dim))
    else:
        encoder = need("encoder", (units, len(KINDS), blocks, block_width, None), (torch.float32, torch.float16))
        width = encoder.shape[-1]
        if "decoder" in tensors:
            need("decoder", (units, len(KINDS), blocks, width, block_width))
        elif "out_mean" in tensors or width != block_width:
            raise ArtifactError(f"{TENSORS_FILE} has no tensor 'decoder', and its encoders have no inverse to stand in")
    steps = need("steps", (units, len(KINDS), MAX_BITS + 1))
    patched = any(point.patch_layers for point in config.operating_points)
    if patched:
        candidates = need(TensorKeys.PATCH_LAYERS, (None,), torch.int64)
        count = candidates.shape[0]
        hidden = need(TensorKeys.patch("mean"), (count, 1, None)).shape[-1]
        need(TensorKeys.patch("out_mean"), (count, 1, hidden))
        code_width = need(TensorKeys.patch("encoder"), (count, 1, hidden, None)).shape[-1]
        need(TensorKeys.patch("decoder"), (count, 1, code_width, hidden))
        patch_steps = need(TensorKeys.patch("steps"), (count, MAX_BITS + 1))
    for point in config.operating_points:
        check_bits(TensorKeys.bits(point.name), (units, len(KINDS), blocks, width), steps)
        if point.patch_layers:
            if not set(point.patch_layers) <= set(candidates.tolist()):
                raise ArtifactError(f"point {point.name} patches layers {point.patch_layers} with no Patch coder")
            check_bits(TensorKeys.hidden_bits(point.name), (count, 1, code_width), patch_steps)
    for key, tensor in tensors.items():
        if key.startswith("aligner.") and not bool(tensor.isfinite().all()):
            raise ArtifactError(f"{TENSORS_FILE}: {key} has non-finite values")


def factored_coders(
    basis: torch.Tensor, spread: torch.Tensor, head_encoder: torch.Tensor, head_decoder: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder (..., W, C) and decoder (..., C, W) in float32 from their factors: encoder = blockdiag(head_encoder)
    basis / spread, decoder = spread basis^T blockdiag(head_decoder), over heads (..., W / d, d, d) of width d.

    A joint unit of a pair predicts each head from its own producer head and then codes the predictions with one
    basis, so both matrices are a per-head factor around one shared orthonormal basis: storing that basis once takes
    a quarter of the bytes of two dense float32 matrices."""
    heads, dim = head_encoder.shape[-3], head_encoder.shape[-1]
    per_head = basis.float().unflatten(-2, (heads, dim))  # (..., heads, d, C)
    encoder = (head_encoder.float() @ per_head).flatten(-3, -2) / spread.unsqueeze(-2)
    decoder = (per_head.transpose(-1, -2) @ head_decoder.float()).transpose(-3, -2).flatten(-2) * spread.unsqueeze(-1)
    return encoder, decoder


def _coder_matrices(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The Reuse coders' encoder and decoder matrices in float32 (units, K/V, blocks, ...): assembled from a pair's
    factors, or a model's own decoder as its encoder's inverse, computed on load in float64 rather than stored
    (`linalg.inverse`: one matrix at a time, since the batched CPU inverse can hang)."""
    if "basis" in tensors:
        factors = (tensors[name] for name in ("basis", "spread", "head_encoder", "head_decoder"))
        return dict(zip(("encoder", "decoder"), factored_coders(*factors), strict=True))
    encoder = tensors["encoder"].float()
    decoder = tensors.get("decoder")
    if decoder is None:
        inverse, info = linalg.inverse(encoder.double())
        decoder = inverse.float()
        if bool((info != 0).any()) or not bool(decoder.isfinite().all()):
            raise ArtifactError(f"{TENSORS_FILE}: an encoder is singular, so it has no decoder")
    return {"encoder": encoder, "decoder": decoder}


def _looks_like_a_path(model_id: str) -> bool:
    """A local path rather than a Hub repo id ("owner/name" or "name"), which would only waste a Hub round trip:
    absolute, home- or dot-relative, more than two parts, or inside a folder that exists here."""
    if model_id.startswith((".", "/", "~")) or "\\" in model_id or model_id.count("/") > 1:
        return True
    parent = Path(model_id).parent
    return parent != Path(".") and parent.is_dir()


def _sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()
