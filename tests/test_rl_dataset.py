"""4DRL JSONL reading (reference format, bad lines skipped with reasons) and the resumable order."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from fourdthinker.data.rl_dataset import (BAD_SCHEMA, INVALID_JSON, MISSING_VIDEO, NO_ANSWER, PromptOrder,
                                          read_rl_jsonl)
from fourdthinker.prompts import question_prompt


def test_reads_reference_rows_and_skips_bad_ones_with_reasons(tmp_path):
    frame = tmp_path / "clip" / "frame_0000.png"
    frame.parent.mkdir()
    Image.fromarray(np.zeros((30, 50, 3), dtype=np.uint8)).save(frame)
    video = tmp_path / "v.mp4"
    video.write_bytes(b"")
    rows = [
        {"Question": "Where does it go?", "A": "Left", "B": "Right", "C": "", "D": "Up", "Correct": " b",
         "frame_paths": ["clip/frame_0000.png"], "video_path": "ignored.mp4", "Type": "abs_dir"},
        {"Question": "Pan?", "A": "Yes", "B": "No", "Correct": "A", "video_path": str(video), "id": "q7"},
        {"Question": "No answer", "A": "x", "B": "y", "Correct": "", "video_path": str(video)},
        {"Question": "Missing", "A": "x", "B": "y", "Correct": "A", "video_path": "nope.mp4"},
        {"Question": "Bad letter", "A": "x", "B": "y", "Correct": "D", "video_path": str(video)},
    ]
    path = tmp_path / "rl.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n\n")
    prompts, skipped = read_rl_jsonl(path)
    assert [p.id for p in prompts] == ["1", "q7"]
    first = prompts[0]
    assert first.text == question_prompt("Where does it go?", {"A": "Left", "B": "Right", "D": "Up"})
    assert "C." not in first.text and first.solution == "B" and first.task_type == "abs_dir"
    assert first.frame_paths == (str(frame),) and first.video_path is None
    assert first.load_frames(max_pixels=28 * 28 * 4)[0].size == (56, 28)
    assert prompts[1].video_path == str(video) and prompts[1].frame_paths == ()
    assert skipped == {NO_ANSWER: 1, MISSING_VIDEO: 1, BAD_SCHEMA: 1, INVALID_JSON: 1}


def test_prompt_order_is_a_permutation_per_pass_and_a_pure_function_of_the_step():
    order = PromptOrder(5, seed=3)
    drawn = [i for step in range(5) for i in order.indices(step, 3)]  # 15 draws = 3 passes
    for k in range(3):
        assert sorted(drawn[5 * k: 5 * k + 5]) == list(range(5))
    assert PromptOrder(5, seed=3).indices(3, 3) == order.indices(3, 3)
    assert PromptOrder(5, seed=4).indices(0, 5) != order.indices(0, 5)
