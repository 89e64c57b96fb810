"""Connect a stage's driver to Ray (a local cluster of its own, or the one the user names), and the
entry point every stage shares."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator


def ray_address(address: str | None = None) -> str:
    """The cluster to join: `address` (the --address flag), else RAY_ADDRESS (set by `ray job submit`
    for its driver), else "local": a Ray of the stage's own. Never "auto": a plain `ray.init()`
    would join whatever cluster happens to run on the machine."""
    return address or os.environ.get("RAY_ADDRESS") or "local"


@contextmanager
def ray_session(address: str | None = None, **init_kwargs) -> Iterator[None]:
    """Use the running Ray (an enclosing stage of the demo, a test), else start or join the one
    `ray_address` names and say which; shut down only what was started here."""
    import ray

    started = not ray.is_initialized()
    if started:
        target = ray_address(address)
        ray.init(address=target, **init_kwargs)
        print(f"ray: {'started a local cluster' if target == 'local' else f'joined the cluster at {target}'}",
              flush=True)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def run_stage(stage: str, config_cls, doc: str | None, argv: list[str] | None, body) -> int:
    """The entry point every stage shares: `--config FILE key=value ...` -> typed config -> its paths
    made absolute and its inputs checked -> `body(cfg)` inside a Ray session. A bad config or input
    (UsageError) exits 2 with its message, a stage that cannot go on (StageError) exits 1, both
    without a traceback."""
    import argparse
    import sys

    from fourdthinker.config import config_help, load_config
    from fourdthinker.errors import StageError, UsageError
    from fourdthinker.paths import resolve_config_paths

    parser = argparse.ArgumentParser(prog=f"{stage}.py", description=doc,
                                     epilog=f"config keys (key=default  description):\n{config_help(config_cls)}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help=f"YAML config (see configs/*/{stage}.yaml)")
    parser.add_argument("--address", default=None,
                        help="a Ray cluster to join (default: RAY_ADDRESS if set, else a local Ray of its own)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config, e.g. seed=1")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(config_cls, args.config, args.overrides)
        resolve_config_paths(cfg, getattr(config_cls, "PATH_KEYS", ()))
        check = getattr(cfg, "check_inputs", None)
        if check is not None:
            check()
        with ray_session(args.address):
            return int(body(cfg) or 0)
    except UsageError as err:
        print(f"{stage}: error: {err}", file=sys.stderr)
        return 2
    except StageError as err:
        print(f"{stage}: failed: {err}", file=sys.stderr)
        return 1
