"""The serving app's configuration: the `args` of a Serve config file's application, validated as one typed object.

Everything a deployment needs is here (which models, which artifacts at which point, how many replicas on how much
hardware, how the payload travels, when to transfer at all) so that `serve run config.yaml`, `python -m hf_scd.serve`
and a test all start the same app from the same object.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

REPO = Path(__file__).resolve().parents[2]
REPO_ARTIFACTS = REPO / "hub_artifacts"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Resources(_Strict):
    """One deployment's replicas and what each may use. `torch_threads` bounds torch's intra-op threads, so replicas
    sharing a machine do not oversubscribe its cores (None: torch's default). `cpu_affinity` pins each replica's
    process to those CPUs (Linux): Ray counts CPUs but does not isolate them, so co-located replicas that must not
    share cores, as in the load check's "two one-core machines", say so here. `resources` are Ray custom resources,
    to place a deployment on the nodes that declare them (`ray start --resources '{"prefill": 1}'`)."""

    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    resources: dict[str, float] = Field(default_factory=dict)
    torch_threads: int | None = Field(None, ge=1)
    cpu_affinity: list[int] | None = None
    max_ongoing_requests: int = Field(8, ge=1)

    def deployment_options(self, name: str) -> dict:
        """`Deployment.options(...)` for these resources."""
        return {
            "name": name,
            "num_replicas": self.num_replicas,
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
            | ({"resources": dict(self.resources)} if self.resources else {}),
        }


class Route(_Strict):
    """A `model` name clients ask for: the consumer model that answers it (the producer itself, or a fine-tune of
    it), and the artifacts the producer encodes with and the consumer rebuilds with (the pair's, for a fine-tune)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._:/-]+$")
    model: str
    artifacts: str
    point: str | None = None  # None: the artifacts' default point
    decode: Resources = Resources()

    @field_validator("artifacts")
    @classmethod
    def _located(cls, value: str) -> str:
        """A relative folder made absolute (from here, or from the repo), since replicas need not share this
        process's working directory; anything else is a Hub repo id."""
        for base in (Path.cwd(), REPO):
            if not Path(value).is_absolute() and (base / value).is_dir():
                return str((base / value).resolve())
        return value


class Transport(_Strict):
    """How a payload travels from a prefill replica to a decode replica.

    `channel`: "object_store", frames stream through Ray's object store as the prefill replica writes them (a Serve
    streaming call); "tcp", the decode replica listens and hands the prefill replica a ticket (its address), and the
    frames stream over a TCP connection (`hf_scd.transport`). `host` is what a decode replica listens on for "tcp":
    loopback on one machine; "0.0.0.0" across machines, and the ticket then names the node's IP. The shared key that
    authenticates frames is read from the environment variable `key_env`, never from the config file. `entropy`:
    the prefill replica codes each unit's frame with the entropy stage (`hf_scd.entropy`: about 11% fewer bytes at 8x
    and 2K tokens, for about 0.1 s of CPU a side), which pays on links of about 0.1 Gbit/s or slower.
    """

    channel: Literal["object_store", "tcp"] = "tcp"
    host: str = "127.0.0.1"
    key_env: str | None = "HF_SCD_TRANSPORT_KEY"
    timeout_s: float = Field(30.0, gt=0)
    entropy: bool = False

    def key(self) -> bytes | None:
        value = os.environ.get(self.key_env) if self.key_env else None
        return value.encode() if value else None


class Policy(_Strict):
    """When a decode replica asks for a transfer at all (`hf_scd.transport.LinkPolicy`): the starting estimates, which
    each finished request then updates, and `fixed_ms`, what any transfer costs whatever its length (a Serve call,
    the producer's forward starting, the head frame). `enabled=False` always transfers."""

    enabled: bool = True
    fixed_ms: float = Field(50.0, ge=0)
    link_gbit_s: float = Field(1.0, gt=0)
    decode_tokens_per_s: float = Field(20_000.0, gt=0)
    prefill_tokens_per_s: float = Field(2_000.0, gt=0)


def _repo(name: str) -> str:
    return str(REPO_ARTIFACTS / name)


def _default_routes() -> list[Route]:
    return [
        Route(name="smollm2-135m-instruct", model="default", artifacts=_repo("smollm2-135m-instruct")),
        Route(
            name="smollm2-135m-instruct-stdlib",
            model="smollm2-135m-instruct-stdlib",
            artifacts=_repo("smollm2-135m-instruct-stdlib-pair"),
        ),
    ]


class AppConfig(_Strict):
    """The whole app: one prefill deployment for `producer`, one decode deployment per route, an HTTP ingress."""

    producer: str = "default"
    routes: list[Route] = Field(default_factory=_default_routes, min_length=1)
    prefill: Resources = Resources()
    ingress: Resources = Resources(num_cpus=0.1)
    transport: Transport = Transport()
    policy: Policy = Policy()
    max_prompt_tokens: int = Field(4096, ge=2)
    max_new_tokens: int = Field(512, ge=1)

    @model_validator(mode="after")
    def _unique_routes(self) -> AppConfig:
        names = [route.name for route in self.routes]
        if len(set(names)) != len(names):
            raise ValueError(f"route names must be unique, got {names}")
        return self

    def route(self, name: str) -> Route:
        return next(route for route in self.routes if route.name == name)
