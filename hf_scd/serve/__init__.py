"""Disaggregated serving on Ray Serve: a prefill deployment (the producer model), a decode deployment per route (the
same model, or a fine-tune of it through pair artifacts) and an OpenAI-style HTTP ingress. A request flows prompt ->
prefill -> frames -> decode -> tokens; a transfer that fails, or a prefill replica that dies, ends in the decode
replica's own prefill, and every response's usage block says what happened.

    serve run examples/serve/config.yaml          # or: python -m hf_scd.serve examples/serve/config.yaml

Needs the `serve` extra (`pip install 'hf-scd[serve]'`).
"""

from .config import AppConfig, Policy, Resources, Route, Transport
from .deployments import build_app

__all__ = ["AppConfig", "Policy", "Resources", "Route", "Transport", "build_app"]
