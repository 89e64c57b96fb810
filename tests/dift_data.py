"""A small DIFT training set on disk for the pipeline tests (frames and mental images as PNG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from fourdthinker.data.dift_dataset import DiftSample, write_dift_jsonl


def write_dift_set(root: Path, n: int = 8, frames: int = 2, size: int = 56, seed: int = 0) -> Path:
    """`n` samples of equal token length (same frame sizes, one mental image, a one-letter answer
    in a fixed sentence): then a batch's token-mean loss equals the mean of its samples' losses."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    samples = []
    labels = ["Pan Left", "Pan Right", "Tilt Up", "Dolly In"]
    for i in range(n):
        paths = []
        for f in range(frames + 1):
            p = root / f"s{i}_{f}.png"
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(p)
            paths.append(str(p))
        letter = "ABCD"[i % 4]
        text = (f"<think>The scene shifts as the camera moves; imagine <output_image> to see it.</think>"
                f"<answer>{letter}</answer>")
        question = "What is the camera movement?\n\n" + "\n".join(f"{l}. {t}" for l, t in zip("ABCD", labels))
        samples.append(DiftSample(f"s{i}", question, text, paths[:frames], paths[frames:]))
    path = root / "dift.jsonl"
    write_dift_jsonl(samples, path)
    return path
