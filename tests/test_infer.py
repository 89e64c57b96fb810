"""`fourdthinker infer` in-process: a video question answered by the tiny model with latent decoding,
the answer letter extracted, and the latent viewer's contact sheet written with one panel per block."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fourdthinker.cli import main
from fourdthinker.infer import user_text

pytestmark = pytest.mark.slow


def test_options_are_lettered_unless_they_carry_letters():
    assert user_text("Q?", ["left", "right"]) == "Q?\n\nA. left\nB. right"
    assert user_text("Q?", ["A. left", "B. right"]) == "Q?\n\nA. left\nB. right"
    assert user_text("Q?", None) == "Q?"


def test_infer_prints_the_reply_the_answer_and_writes_a_contact_sheet(tiny_model_dir, tmp_path):
    from fourdthinker.data.synth.clip import encode_mp4
    from fourdthinker.data.video import decode_video

    video = tmp_path / "clip.mp4"
    encode_mp4(video, np.random.default_rng(5).integers(0, 255, (12, 56, 84, 3), dtype=np.uint8), fps=4)
    png = tmp_path / "sheet.png"
    run = subprocess.run(
        [sys.executable, "-m", "fourdthinker", "infer", "--model", str(tiny_model_dir), "--video", str(video),
         "--question", "Which way?", "--options", "left", "right", "up", "down", "--max-tokens", "16",
         "--max-model-len", "1024", "--force-latent-steps", "1", "8", "--show-latents", str(png), "--json"],
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout)  # --json: nothing else on stdout
    assert "⟨latent 1⟩" in out["reply"] and "⟨latent 2⟩" in out["reply"]
    from fourdthinker.rewards import extract_choice

    assert out["answer"] == extract_choice(out["reply"]) and out["seconds"] > 0
    assert [b["block"] for b in out["latents"]] == [1, 2]
    assert all(len(b["nearest"]) == 5 and len(b["norms"]) == 4 for b in out["latents"])
    frames = decode_video(video)
    sheet = Image.open(out["contact_sheet"])
    assert out["contact_sheet"] == str(png)
    scale = -(-224 // frames[0].height)
    columns = max(len({m["frame"] for m in b["nearest"]}) for b in out["latents"])
    w, h = frames[0].width * scale, frames[0].height * scale
    assert sheet.size == (columns * (w + 4) + 4, 2 * (h + 30 + 4) + 4)  # one panel per block


def test_infer_names_a_missing_video(tiny_model_dir, tmp_path, capsys):
    assert main(["infer", "--model", str(tiny_model_dir), "--video", str(tmp_path / "nope.mp4"),
                 "--question", "q"]) == 2
    assert "nope.mp4: no such file" in capsys.readouterr().err


def test_show_latents_without_a_latent_block_writes_nothing_and_keeps_the_answer(tmp_path, capsys):
    from fourdthinker.infer import _sheet

    assert _sheet(tmp_path / "sheet.png", [], [{"block": 1, "nearest": []}]) is None
    assert not (tmp_path / "sheet.png").exists()
    assert "no latent block" in capsys.readouterr().err
