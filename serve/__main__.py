"""`python -m serve --config configs/tiny/serve.yaml [key=value ...]`: start Ray Serve (or join the
cluster of `ray job submit`) and run the app until interrupted, listening on the config's host/port.

    python -m serve --config configs/tiny/serve.yaml model_dir=/tmp/tiny
    ray job submit --working-dir . -- python -m serve --config configs/3b/serve.yaml model_dir=/ckpt
"""

from __future__ import annotations

from fourdthinker.cluster import run_stage
from fourdthinker.serve_config import ServeConfig


def _run(cfg: ServeConfig) -> int:
    from ray import serve

    from serve.app import build

    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    print(f"serve: {cfg.served_name} on http://{cfg.host}:{cfg.port}/v1 (Ctrl-C stops)", flush=True)
    serve.run(build(cfg), name="fourdthinker", route_prefix="/", blocking=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_stage("serve", ServeConfig, __doc__, argv, _run)


if __name__ == "__main__":
    raise SystemExit(main())
