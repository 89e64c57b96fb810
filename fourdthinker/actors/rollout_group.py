"""Fan a step's prompts out over the rollout actors, and its rewards over Ray tasks.

A rollout actor that dies mid-step is restarted by Ray (its `max_restarts`), re-synced to the
current weights and given its shard again; results come back in prompt order either way.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)


def generate_groups(actors: Sequence[Any], requests: Sequence[Any], sampling: Any,
                    resync: Callable[[Any], None], max_retries: int) -> list[list[Any]]:
    """Completion groups for `requests`, sharded contiguously over `actors`.

    An actor that dies mid-step is restarted by Ray (its max_restarts); it is then re-synced to
    the current weights with `resync(actor)` and its shard re-queued, at most `max_retries` times.
    """
    import ray
    from ray.exceptions import RayActorError

    shards = [list(part) for part in np.array_split(np.arange(len(requests)), len(actors)) if len(part)]
    pending = {i: actors[i].generate.remote([requests[j] for j in shard], sampling)
               for i, shard in enumerate(shards)}
    results: dict[int, list] = {}
    retries = 0
    while pending:
        i, ref = next(iter(pending.items()))
        try:
            results[i] = ray.get(ref)
            del pending[i]
        except RayActorError as err:
            retries += 1
            if retries > max_retries:
                raise RuntimeError(f"rollout actor {i} failed {retries} times this step") from err
            log.warning("rollout actor %d died (%s); re-syncing it and re-queueing %d prompts",
                        i, type(err).__name__, len(shards[i]))
            _wait_until_restarted(actors[i])
            resync(actors[i])
            pending[i] = actors[i].generate.remote([requests[j] for j in shards[i]], sampling)
    return [group for i in range(len(shards)) for group in results[i]]


def _wait_until_restarted(actor, timeout_s: float = 900.0) -> None:
    """Block until Ray has restarted `actor` (its constructor, e.g. an engine start, has run)."""
    import ray
    from ray.exceptions import ActorUnavailableError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get(actor.__ray_ready__.remote())
            return
        except ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def score_groups(groups: Sequence[Sequence[Any]], solutions: Sequence[str], specs, num_tasks: int):
    """Rewards of every completion, computed by `num_tasks` Ray tasks; merged in order."""
    import ray

    from fourdthinker.rewards import RewardScores, score_completions

    texts = [c.text for g in groups for c in g]
    golds = [s for g, s in zip(groups, solutions) for _ in g]
    parts = [p for p in np.array_split(np.arange(len(texts)), max(1, num_tasks)) if len(p)]
    task = ray.remote(num_cpus=0.1)(score_completions)
    scored = ray.get([task.remote([texts[i] for i in p], [golds[i] for i in p], specs) for p in parts])
    names = [s.name for s in specs]
    return RewardScores(per_reward={n: np.concatenate([s.per_reward[n] for s in scored]) for n in names},
                        total=np.concatenate([s.total for s in scored]),
                        errors={n: sum(s.errors[n] for s in scored) for n in names})
