"""Connect a stage's driver to Ray: the cluster of `ray job submit` (RAY_ADDRESS), or a local one."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def ray_session(**init_kwargs) -> Iterator[None]:
    """Use the running Ray (a driver inside a Ray job, or an enclosing stage of the demo), else
    join RAY_ADDRESS, else start a local cluster; shut down only what was started here."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="auto" if os.environ.get("RAY_ADDRESS") else None, **init_kwargs)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def run_stage(stage: str, config_cls, doc: str | None, argv: list[str] | None, body) -> int:
    """The entry point every stage shares: `--config FILE key=value ...` -> typed config -> `body(cfg)`
    inside a Ray session. A bad config or input (UsageError) exits 2 with its message, no traceback."""
    import argparse
    import sys

    from fourdthinker.config import load_config
    from fourdthinker.errors import UsageError

    parser = argparse.ArgumentParser(prog=f"{stage}.py", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help=f"YAML config (see configs/*/{stage}.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config, e.g. seed=1")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(config_cls, args.config, args.overrides)
        with ray_session():
            return int(body(cfg) or 0)
    except UsageError as err:
        print(f"{stage}: error: {err}", file=sys.stderr)
        return 2
