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
