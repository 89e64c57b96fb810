"""What a person watching a multi-stage run sees: one line per stage, a progress bar, a summary and the
time, while everything the libraries print (Ray, vLLM, DeepSpeed, Ray Data's own bars, C-level output of
worker processes started meanwhile) goes to that stage's log file.

The screen keeps a duplicate of the terminal's file descriptors; during a stage, fds 1 and 2 point at the
stage's log, so output from any layer lands there without each library being configured. A failed stage
prints the end of its log on the screen, so errors still reach the user in full.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm


class StageFailed(RuntimeError):
    def __init__(self, stage: str, log: str, detail: str = ""):
        super().__init__(stage, log, detail)
        self.stage, self.log, self.detail = stage, log, detail

    def __str__(self) -> str:
        return f"stage {self.stage!r} failed{': ' + self.detail if self.detail else ''}; full log: {self.log}"


class StageScreen:
    def __init__(self, log_dir: str | Path, stages: int):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.stages = stages
        self.number = 0
        self.screen = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
        self.times: dict[str, float] = {}

    def say(self, text: str = "") -> None:
        self.screen.write(text + "\n")

    @contextmanager
    def stage(self, name: str, total: int | None = None, count: Callable[[], int] | None = None,
              unit: str = "it") -> Iterator[Path]:
        """Run a stage with its output captured to `<log_dir>/<n>-<name>.log`. With `count`, a bar on
        the screen follows it (polled: the stage writes its own progress files, e.g. metrics lines)."""
        self.number += 1
        slug = name.split()[0].lower().strip(":")
        log = self.log_dir / f"{self.number}-{slug}.log"
        self.say(f"\n== {self.number}/{self.stages} {name}   (log: {log})")
        started = time.perf_counter()
        bar = stop = watcher = None
        if count is not None:
            bar = tqdm(total=total, unit=unit, file=self.screen, leave=False, dynamic_ncols=True, mininterval=0.5)
            stop = threading.Event()

            def follow():
                while not stop.wait(0.5):
                    try:
                        done = count()
                    except OSError:
                        continue
                    bar.update(max(0, done - bar.n))

            watcher = threading.Thread(target=follow, daemon=True)
            watcher.start()
        saved = [os.dup(1), os.dup(2)]
        sys.stdout.flush()
        sys.stderr.flush()
        with open(log, "ab") as sink:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            try:
                yield log
            except BaseException as err:
                self._close_bar(bar, stop, watcher)
                self._show_tail(log)  # the screen is its own descriptor: still the terminal
                if isinstance(err, StageFailed):
                    raise
                raise StageFailed(name, str(log), f"{type(err).__name__}: {err}") from err
            finally:
                self._restore(saved)
        self._close_bar(bar, stop, watcher)
        self.times[name] = time.perf_counter() - started

    def done(self, name: str, summary: str) -> None:
        self.say(f"   {summary}  ({self.times.get(name, 0.0):.1f} s)")

    @staticmethod
    def _restore(saved: list[int]) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)

    @staticmethod
    def _close_bar(bar, stop, watcher) -> None:
        if bar is None:
            return
        stop.set()
        watcher.join(timeout=2)
        bar.close()

    def _show_tail(self, log: Path, lines: int = 60) -> None:
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        self.say(f"   -- last {len(tail)} lines of {log} --")
        for line in tail:
            self.say("   | " + line)
