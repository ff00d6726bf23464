"""`python -m hf_scd.serve [config.yaml]`: start the app on this machine's Ray (or the cluster at `--address`) and
serve until interrupted. The file is a Serve config (what `serve run` reads): its first application's `args` are an
`AppConfig`, and its `http_options` say where the HTTP API listens. Without a file, the defaults on 127.0.0.1:8000.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from .config import AppConfig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hf_scd.serve", description=__doc__)
    parser.add_argument("config", nargs="?", type=Path, help="a Serve config file (e.g. examples/serve/config.yaml)")
    parser.add_argument("--address", help="an existing Ray cluster (`ray start --head`); default: start one here")
    args = parser.parse_args(argv)
    document = yaml.safe_load(args.config.read_text()) if args.config else {}
    application = (document.get("applications") or [{}])[0]
    http = {"host": "127.0.0.1", "port": 8000} | (document.get("http_options") or {})
    config = AppConfig.model_validate(application.get("args") or {})

    import ray
    from ray import serve

    from .deployments import build_app

    ray.init(address=args.address)
    serve.start(http_options=http)
    serve.run(
        build_app(config),
        name=application.get("name", "hf-scd"),
        route_prefix=application.get("route_prefix", "/"),
        blocking=True,
    )


if __name__ == "__main__":
    main()
