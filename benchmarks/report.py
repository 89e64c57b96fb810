"""Where benchmark figures go: one JSON file per benchmark and device under benchmarks/results/."""

from __future__ import annotations

import json
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def write_result(benchmark: str, device: str, result: dict, out: str | Path | None = None) -> Path:
    """Write `result` (stamped with benchmark, device and date) and say where."""
    path = Path(out) if out else RESULTS / f"{benchmark}-{device.replace(' ', '_')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    stamped = {"benchmark": benchmark, "device": device, "date": time.strftime("%Y-%m-%d"), **result}
    path.write_text(json.dumps(stamped, indent=2))
    print(f"wrote {path}")
    return path
