"""Segmenter backends behind one interface: ground-truth masks, a tiny random transformers SAM3,
greedy linking, and the actor's mask files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from fourdthinker.actors.segmenter import (
    ClipFrames,
    GroundTruthSegmenter,
    TransformersSam3Segmenter,
    Track,
    keep_objects,
    link_detections,
    track_record,
)
from fourdthinker.data.synth import SynthConfig, build_world
from fourdthinker.preprocess.config import SegmenterConfig


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg") / "world"
    build_world(root, SynthConfig(videos=1, seed=0, width=112, height=84, seconds=2, fps=5))
    return root


def test_transformers_sam3_gives_one_track_per_prompt_with_the_frames_shape():
    segmenter = TransformersSam3Segmenter(SegmenterConfig(backend="transformers", score_threshold=0.0))
    frames = np.random.default_rng(0).integers(0, 256, (3, 84, 112, 3), dtype=np.uint8)
    prompts = ["red box", "person"]
    tracks = segmenter.segment(ClipFrames("c", frames, np.arange(3.0)), prompts)
    assert [t.prompt for t in tracks] == prompts
    for track in tracks:
        assert len(track.masks) == 3 and 0.0 <= track.score <= 1.0
        for mask in track.masks:
            assert mask is None or (mask.shape == (84, 112) and mask.dtype == bool)
    # A threshold above every score finds nothing: tracks stay one per prompt, all frames None.
    segmenter.threshold = 1.0
    empty = segmenter.segment(ClipFrames("c", frames, np.arange(3.0)), prompts)
    assert len(empty) == 2 and all(m is None for t in empty for m in t.masks)


def test_ground_truth_segmenter_returns_the_world_masks(world):
    truth = json.loads((world / "ground_truth" / "clip_0000" / "tracks.json").read_text())
    ids = np.load(world / "ground_truth" / "clip_0000" / "masks.npz")["instance_ids"]
    frames = np.zeros((3, 84, 112, 3), dtype=np.uint8)
    times = np.array([0.0, 0.4, 0.8])  # source frames 0, 2, 4 at 5 fps
    name = truth["objects"][0]["name"]
    tracks = GroundTruthSegmenter(world).segment(ClipFrames("clip_0000", frames, times), [name, "unicorn"])
    np.testing.assert_array_equal(np.stack(tracks[0].masks), ids[[0, 2, 4]] == truth["objects"][0]["id"])
    assert tracks[1].masks == [None] * 3 and tracks[1].score == 0.0


def test_link_detections_follows_the_overlapping_candidate():
    masks = np.zeros((3, 2, 4, 4), dtype=bool)
    masks[0, 0, :2, :2] = True               # frame 0: best score is candidate 0 (top-left)
    masks[0, 1, 2:, 2:] = True
    masks[1, 0, 2:, 2:] = True               # frame 1: higher score but elsewhere
    masks[1, 1, :2, :3] = True               # overlaps the previous mask
    scores = np.array([[0.9, 0.8], [0.95, 0.6], [0.1, 0.2]])
    linked = link_detections(scores, masks, threshold=0.5)
    assert linked[0] is masks[0, 0] or np.array_equal(linked[0], masks[0, 0])
    np.testing.assert_array_equal(linked[1], masks[1, 1])
    assert linked[2] is None


def test_keep_objects_and_track_record_write_readable_masks(tmp_path):
    on = np.zeros((6, 8), dtype=bool)
    on[2:4, 3:6] = True
    seen = Track("seen", [on, on, None], 0.7)
    rare = Track("rare", [on, None, None], 0.9)
    assert [t.prompt for t in keep_objects([rare, seen], 0.5, 5)] == ["seen"]
    record = track_record(seen, tmp_path / "seen", 6, 8)
    assert record["mask_paths"][2] is None and record["areas"] == [6.0, 6.0, 0.0]
    assert record["boxes"][0] == [3.0, 2.0, 5.0, 3.0] and record["boxes"][2] is None
    np.testing.assert_array_equal(np.asarray(Image.open(record["mask_paths"][0]).convert("L")) > 127, on)


def test_byte_level_bpe_stand_in_loads_in_the_sam3_tokenizer_and_encodes_bytes(tmp_path):
    """The stand-in vocabulary the `sam3` backend builds with when it has no real one: the package's
    own tokenizer reads it, encodes byte by byte, and every id stays inside the text encoder's table."""
    from fourdthinker.actors.segmenter import write_byte_level_bpe

    tokenizer_ve = pytest.importorskip("sam3.model.tokenizer_ve")
    tokenizer = tokenizer_ve.SimpleTokenizer(bpe_path=str(write_byte_level_bpe(tmp_path / "bpe.txt.gz")))
    symbols = list(tokenizer_ve.bytes_to_unicode().values())
    assert tokenizer.vocab_size == 2 * len(symbols) + 2  # bytes, their end-of-word forms, start, end
    word_end = len(symbols)
    expected = [symbols.index(c) for c in "re"] + [word_end + symbols.index("d"), word_end + symbols.index("!")]
    assert tokenizer.encode("Red !") == expected
    ids = tokenizer(["red cube", "ünïcödé"], context_length=32)
    assert ids.shape == (2, 32) and int(ids.max()) == tokenizer.eot_token_id < tokenizer.vocab_size
    assert tokenizer.decode(tokenizer.encode("ünïcödé 42")).strip() == "ünïcödé 4 2"
