"""The artifacts' schema, defined once: typed `config.json` and the tensor names of `codec.safetensors`.

Calibration writes through these types and names and `SCDArtifacts` reads through them, so a field or a key is
spelled in one place. Reading a config checks every field's presence and type and raises `ArtifactError` naming the
field, so a malformed or hand-edited file never fails later as a `KeyError` deep in a rebuild.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, fields
from typing import Any

from .arch import ModelShape
from .errors import ArtifactError

# 5 added factored cross-variant coders (`TensorKeys.FACTORED_FIELDS`); a version 4 folder is a version 5 folder
# without them, so both are read.
ARTIFACTS_FORMAT_VERSION = 5
READABLE_FORMAT_VERSIONS = (4, 5)
KINDS = ("k", "v")  # the two coders of a Reuse unit, in the order they are stacked
# Maps written before `FidelityMap.continuation` was recorded were all fitted on calibration's validation documents,
# whose continuations are this long.
LEGACY_MAP_CONTINUATION = 256
# The reserved point that ships every token's K/V exactly, in bf16: what a fidelity check falls back to.
EXACT_POINT = "bf16"


class TensorKeys:
    """Names of the tensors in `codec.safetensors`."""

    # Reuse coders, each stacked over (unit, K/V): `out_mean` only in cross-variant artifacts; `decoder` only where
    # it is not the encoder's inverse (cross-variant), so same-model artifacts derive it on load; `encoder` float16 or
    # float32.
    REUSE_FIELDS = ("mean", "out_mean", "encoder", "decoder", "steps")
    # Cross-variant units coded jointly store their coders factored instead (`artifacts.factored_coders`): one
    # orthonormal `basis` (W, C) float16 and the components' `spread` (C,), between per-head factors (W / d, d, d) of
    # the encoder (the head's predictor times the metric's root) and of the decoder (the root's inverse). Two dense
    # 1,024-wide matrices per unit would be 4x the bytes.
    FACTORED_FIELDS = ("mean", "out_mean", "basis", "spread", "head_encoder", "head_decoder", "steps")
    PATCH_LAYERS = "patch.layers"  # (candidates,) int64: layers whose attention input the producer can code

    @staticmethod
    def patch(field: str) -> str:
        """A Patch coder's tensor (one of REUSE_FIELDS), stacked over the candidates."""
        return f"patch.{field}"

    @staticmethod
    def bits(point: str) -> str:
        """(units, K/V, blocks, components) uint8 bits per component of an operating point."""
        return f"points.{point}.bits"

    @staticmethod
    def hidden_bits(point: str) -> str:
        """(candidates, 1, hidden) uint8 bits per component of the Patch codes of an operating point."""
        return f"points.{point}.hidden_bits"

    @staticmethod
    def aligner(layer: int, field: str) -> str:
        """One tensor of the aligner MLP of a Patch layer (a field of `patch.Aligner`)."""
        return f"aligner.{layer}.{field}"


@dataclass(frozen=True)
class ModelEntry:
    """A model the artifacts were fitted on: the weights' fingerprint is what gets checked."""

    name: str
    base_model: str | None
    shape: ModelShape
    fingerprint: str


@dataclass(frozen=True)
class CodecConfig:
    """How the codes are made: `exact_tokens` sink tokens of each row ship in bf16, `recomputed_tokens` are
    recomputed by the consumer (cross-variant); `reuse` names the cross-variant Reuse fit ("rrr", "joint-svd").
    Reuse units are runs of `unit_layers` consecutive layers; with `joint_basis` a unit's heads and layers share one
    basis (one block per unit), else each head of each layer is a block of its own."""

    max_bits: int
    token_scale: str
    exact_tokens: int
    recomputed_tokens: int = 0
    reuse: str | None = None
    unit_layers: int = 1
    joint_basis: bool = False

    def units(self, num_layers: int) -> list[tuple[int, ...]]:
        """The member layers of every Reuse unit, in order."""
        return [tuple(range(start, start + self.unit_layers)) for start in range(0, num_layers, self.unit_layers)]

    def blocks(self, shape: ModelShape) -> tuple[int, int]:
        """(blocks, width) of a unit's coders: the shape of their `TransformCode.mean`."""
        if self.joint_basis:
            return (1, self.unit_layers * shape.num_kv_heads * shape.head_dim)
        return (self.unit_layers * shape.num_kv_heads, shape.head_dim)


@dataclass(frozen=True)
class OperatingPoint:
    """One point of the plan: a bit allocation with its measured size and fidelity on validation text."""

    name: str
    bytes_per_token: float  # K/V codes and scales, all layers
    ratio_vs_bf16: float
    val_kl: float
    val_top1: float
    patch_layers: tuple[int, ...] = ()  # cross-variant: layers whose K/V the consumer recomputes


@dataclass(frozen=True)
class FitProbe:
    """What calibration measured on the fitted model, so that a model with other weights can be tested for fit (see
    `hf_scd.probe`): per layer, the relative error of keys and values through the codes of `point` on `token_ids`."""

    token_ids: tuple[int, ...]
    point: str
    errors: tuple[tuple[float, ...], ...]  # (layers, K/V)


@dataclass(frozen=True)
class TailLine:
    """The tail probe's map (see `hf_scd.fidelity`): the producer teacher-forces the last `tokens` tokens of the
    request over the rebuilt cache of the tokens before them, against its own exact cache, and the KL it measures
    there maps to the continuation's: log KL = intercept + slope * log tail KL."""

    tokens: int
    slope: float
    intercept: float
    residual: float  # RMS of the fit's residuals, in log KL
    samples: int


@dataclass(frozen=True)
class FidelityMap:
    """What a producer needs to predict, per request, the KL its codes will cost (see `hf_scd.fidelity`): the metric
    calibration weighs errors in (mean squared queries per key dimension; values are weighed by the model's output
    projection), each layer's sensitivity (KL per unit of weighted squared error), and the fitted map from the
    request's weighted distortion D to the continuation's next-token KL: log KL = intercept + slope * log D."""

    query_energy: tuple[tuple[tuple[float, ...], ...], ...]  # (layers, kv_heads, head_dim)
    layer_weights: tuple[tuple[float, ...], ...]  # (layers, K/V)
    slope: float
    intercept: float
    residual: float  # RMS of the fit's residuals, in log KL: how far a prediction typically lands from the truth
    samples: int  # (document, point) measurements the map was fitted on
    # Tokens of continuation each fitted KL is the mean over: what a prediction is for. The mean KL of a continuation
    # falls as it grows (later tokens see their exact predecessors), so a check says most when run on this length.
    continuation: int = LEGACY_MAP_CONTINUATION
    # The tail probe's line, used beside the map from D where a request is longer than its tail (`predict_kl`); maps
    # written before it have none.
    tail: TailLine | None = None


@dataclass(frozen=True)
class ArtifactsConfig:
    """`config.json`: the model(s), the codec, the operating points and the calibration report (free-form)."""

    model: ModelEntry
    codec: CodecConfig
    operating_points: tuple[OperatingPoint, ...]
    default_point: str
    calibration: dict[str, Any]
    consumer: ModelEntry | None = None
    fit_probe: FitProbe | None = None  # same-model artifacts; without one, only the fitted weights are accepted
    fidelity: FidelityMap | None = None  # same-model artifacts; without one, `max_kl` checks cannot be made
    format_version: int = ARTIFACTS_FORMAT_VERSION
    tensors_sha256: str = ""

    @classmethod
    def from_dict(cls, data: Any) -> ArtifactsConfig:
        """A checked config from parsed JSON; `ArtifactError` names the first field that is missing or mistyped."""
        data = _mapping(data, "config")
        version = data.get("format_version")
        if version not in READABLE_FORMAT_VERSIONS:
            raise ArtifactError(
                f"artifacts format version {version!r}; this hf-scd reads "
                f"{' and '.join(map(str, READABLE_FORMAT_VERSIONS))}. "
                "Upgrade hf-scd or re-run `hf-scd calibrate`."
            )
        points = tuple(
            OperatingPoint(
                **_typed(OperatingPoint, _mapping(point, f"operating_points[{index}]"), f"operating_points[{index}]")
            )
            for index, point in enumerate(_field(data, "operating_points", list, "config"))
        )
        names = [point.name for point in points]
        if not points or len(set(names)) != len(names):
            raise ArtifactError(f"config.operating_points must be non-empty with distinct names, got {names}")
        if EXACT_POINT in names:
            raise ArtifactError(f"config.operating_points may not name a point {EXACT_POINT!r}: it is reserved")
        model = _model_entry(data.get("model"), "model")
        probe, fidelity = data.get("fit_probe"), data.get("fidelity")
        config = cls(
            model=model,
            codec=CodecConfig(**_typed(CodecConfig, _mapping(data.get("codec"), "codec"), "codec")),
            operating_points=points,
            default_point=_field(data, "default_point", str, "config"),
            calibration=_mapping(data.get("calibration", {}), "calibration"),
            consumer=_model_entry(data["consumer"], "consumer") if data.get("consumer") is not None else None,
            fit_probe=_fit_probe(probe, model.shape.num_layers) if probe is not None else None,
            fidelity=_fidelity_map(fidelity, model.shape) if fidelity is not None else None,
            format_version=version,
            tensors_sha256=_field(data, "tensors_sha256", str, "config"),
        )
        if config.default_point not in names:
            raise ArtifactError(f"config.default_point {config.default_point!r} is not one of {names}")
        if config.codec.exact_tokens < 0 or config.codec.recomputed_tokens < 0:
            raise ArtifactError("config.codec exact_tokens and recomputed_tokens must be >= 0")
        unit_layers = config.codec.unit_layers
        if not 0 < unit_layers <= model.shape.num_layers or model.shape.num_layers % unit_layers:
            raise ArtifactError(
                f"config.codec.unit_layers must divide the model's {model.shape.num_layers} layers, got {unit_layers}"
            )
        if unit_layers > 1 and any(point.patch_layers for point in points):
            raise ArtifactError("config.codec.unit_layers must be 1 where points patch layers: a Patch layer is a unit")
        if config.consumer is not None and config.consumer.shape != config.model.shape:
            raise ArtifactError("config.consumer must have the producer's KV shape")
        if config.fit_probe is not None:
            if config.fit_probe.point not in names:
                raise ArtifactError(f"config.fit_probe.point {config.fit_probe.point!r} is not one of {names}")
            if points[names.index(config.fit_probe.point)].patch_layers:
                raise ArtifactError("config.fit_probe.point must be a point without Patch layers")
            if len(config.fit_probe.token_ids) <= config.codec.exact_tokens:
                raise ArtifactError("config.fit_probe.token_ids must be longer than the exact sink")
        if config.fidelity is not None and config.consumer is not None:
            raise ArtifactError("config.fidelity is for same-model artifacts: a pair's producer cannot measure it")
        return config

    def to_dict(self) -> dict[str, Any]:
        """The JSON form; optional fields at their defaults are left out."""
        out: dict[str, Any] = {"model": _entry_dict(self.model)}
        if self.consumer is not None:
            out["consumer"] = _entry_dict(self.consumer)
        codec = {f.name: getattr(self.codec, f.name) for f in fields(CodecConfig)}
        out["codec"] = {k: v for k, v in codec.items() if v is not None and not (k == "recomputed_tokens" and v == 0)}
        out["calibration"] = self.calibration
        if self.fit_probe is not None:
            probe = self.fit_probe
            errors = [list(pair) for pair in probe.errors]
            out["fit_probe"] = {"point": probe.point, "errors": errors, "token_ids": list(probe.token_ids)}
        if self.fidelity is not None:
            out["fidelity"] = _fidelity_dict(self.fidelity)
        out["operating_points"] = [_point_dict(point) for point in self.operating_points]
        out["default_point"] = self.default_point
        out["format_version"] = self.format_version
        out["tensors_sha256"] = self.tensors_sha256
        return out


def _point_dict(point: OperatingPoint) -> dict[str, Any]:
    out = {f.name: getattr(point, f.name) for f in fields(OperatingPoint)}
    out["patch_layers"] = list(point.patch_layers)
    return out


def _entry_dict(entry: ModelEntry) -> dict[str, Any]:
    return {
        "name": entry.name,
        "base_model": entry.base_model,
        "shape": entry.shape.to_dict(),
        "fingerprint": entry.fingerprint,
    }


# What each annotated type of the config's dataclasses accepts from JSON.
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "bool": (bool,),
    "str | None": (str, type(None)),
    "int": (int,),
    "float": (int, float),
    "tuple[int, ...]": (list,),
}


def _typed(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    """`data`'s fields of dataclass `cls`, each checked against its annotation; unknown keys are ignored."""
    out = {}
    for f in fields(cls):
        if f.name not in data:
            if f.default is not MISSING:
                continue
            raise ArtifactError(f"config.{where} has no field {f.name!r}")
        value = data[f.name]
        accepted = _JSON_TYPES[f.type]
        if (isinstance(value, bool) and f.type != "bool") or not isinstance(value, accepted):
            raise ArtifactError(f"config.{where}.{f.name} must be {f.type}, got {value!r}")
        if f.type == "tuple[int, ...]":
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
                raise ArtifactError(f"config.{where}.{f.name} must be a list of layer indices, got {value!r}")
            value = tuple(value)
        if f.type == "float" and f.name in ("bytes_per_token", "ratio_vs_bf16") and not math.isfinite(value):
            raise ArtifactError(f"config.{where}.{f.name} must be finite, got {value!r}")
        out[f.name] = value
    return out


def _model_entry(data: Any, where: str) -> ModelEntry:
    data = _mapping(data, where)
    shape = _mapping(data.get("shape"), f"{where}.shape")
    dims = {}
    for name in ("num_layers", "num_kv_heads", "head_dim"):
        value = shape.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 1 << 16:
            raise ArtifactError(f"config.{where}.shape.{name} must be a positive integer, got {value!r}")
        dims[name] = value
    return ModelEntry(
        name=_field(data, "name", str, where),
        base_model=data.get("base_model") if isinstance(data.get("base_model"), str) else None,
        shape=ModelShape(model_type=_field(shape, "model_type", str, f"{where}.shape"), **dims),
        fingerprint=_field(data, "fingerprint", str, where),
    )


def _fit_probe(data: Any, num_layers: int) -> FitProbe:
    data = _mapping(data, "fit_probe")
    ids = _field(data, "token_ids", list, "fit_probe")
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 1 << 24 for i in ids):
        raise ArtifactError(f"config.fit_probe.token_ids must be a non-empty list of token ids, got {ids!r}")
    errors = _field(data, "errors", list, "fit_probe")
    if len(errors) != num_layers or not all(
        isinstance(pair, list)
        and len(pair) == len(KINDS)
        and all(not isinstance(e, bool) and isinstance(e, int | float) and 0 <= e < math.inf for e in pair)
        for pair in errors
    ):
        raise ArtifactError(
            f"config.fit_probe.errors must list {num_layers} layers' [key, value] relative errors (finite, >= 0)"
        )
    return FitProbe(
        token_ids=tuple(ids),
        point=_field(data, "point", str, "fit_probe"),
        errors=tuple(tuple(float(e) for e in pair) for pair in errors),
    )


def _fidelity_dict(fidelity: FidelityMap) -> dict[str, Any]:
    out = {f.name: getattr(fidelity, f.name) for f in fields(FidelityMap) if f.name != "tail"}
    if fidelity.tail is not None:
        out["tail"] = {f.name: getattr(fidelity.tail, f.name) for f in fields(TailLine)}
    out["query_energy"] = [[list(head) for head in layer] for layer in fidelity.query_energy]
    out["layer_weights"] = [list(pair) for pair in fidelity.layer_weights]
    return out


def _finite_list(value: Any, length: int, positive: bool) -> bool:
    """Whether `value` is a list of `length` finite numbers (> 0 with `positive`, else >= 0)."""
    return (
        isinstance(value, list)
        and len(value) == length
        and all(
            not isinstance(v, bool)
            and isinstance(v, int | float)
            and math.isfinite(v)
            and (v > 0 if positive else v >= 0)
            for v in value
        )
    )


def _fidelity_map(data: Any, shape: ModelShape) -> FidelityMap:
    data = _mapping(data, "fidelity")
    energy = _field(data, "query_energy", list, "fidelity")
    if len(energy) != shape.num_layers or not all(
        isinstance(layer, list)
        and len(layer) == shape.num_kv_heads
        and all(_finite_list(head, shape.head_dim, positive=False) for head in layer)
        for layer in energy
    ):
        raise ArtifactError(
            f"config.fidelity.query_energy must be ({shape.num_layers}, {shape.num_kv_heads}, {shape.head_dim}) "
            "finite numbers >= 0"
        )
    weights = _field(data, "layer_weights", list, "fidelity")
    if len(weights) != shape.num_layers or not all(_finite_list(pair, len(KINDS), positive=True) for pair in weights):
        raise ArtifactError(f"config.fidelity.layer_weights must list {shape.num_layers} layers' [key, value] > 0")
    tail = data.get("tail")
    if tail is not None:
        tail = _mapping(tail, "fidelity.tail")
        tail = TailLine(tokens=_count(tail, "tokens", "fidelity.tail", 1), **_log_line(tail, "fidelity.tail"))
    return FidelityMap(
        query_energy=tuple(tuple(tuple(float(v) for v in head) for head in layer) for layer in energy),
        layer_weights=tuple(tuple(float(w) for w in pair) for pair in weights),
        continuation=_count(data, "continuation", "fidelity", 2, LEGACY_MAP_CONTINUATION),
        tail=tail,
        **_log_line(data, "fidelity"),
    )


def _log_line(data: dict[str, Any], where: str) -> dict[str, Any]:
    """A fitted line's slope (> 0: KL grows with what it is fitted on), intercept, RMS residual (>= 0) and samples."""
    numbers: dict[str, Any] = {}
    for name in ("slope", "intercept", "residual"):
        value = data.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ArtifactError(f"config.{where}.{name} must be a finite number, got {value!r}")
        numbers[name] = float(value)
    if numbers["slope"] <= 0 or numbers["residual"] < 0:
        raise ArtifactError(f"config.{where}.slope must be > 0 and residual >= 0: KL grows with distortion")
    numbers["samples"] = _count(data, "samples", where, 2)
    return numbers


def _count(data: dict[str, Any], name: str, where: str, least: int, default: int | None = None) -> int:
    value = data.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ArtifactError(f"config.{where}.{name} must be an integer >= {least}, got {value!r}")
    return value


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ArtifactError(f"config.{where} must be a JSON object, got {type(value).__name__}")
    return value


def _field(data: dict[str, Any], name: str, kind: type, where: str) -> Any:
    value = data.get(name)
    if not isinstance(value, kind):
        raise ArtifactError(f"config.{where}.{name} must be a {kind.__name__}, got {value!r}")
    return value
