"""DIFT JSONL: good lines round-trip, each kind of bad line is skipped and counted with its reason."""

from __future__ import annotations

import json
import logging

import pytest

from fourdthinker.data import dift_dataset as dd
from fourdthinker.data.dift_dataset import DiftSample, read_dift_jsonl, write_dift_jsonl


@pytest.fixture
def images(tmp_path):
    names = ["f0.jpg", "f1.jpg", "o0.jpg", "o1.jpg"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")  # existence is what the reader checks
    return {n: str(tmp_path / n) for n in names}


def _record(images, **overrides) -> dict:
    record = {"id": "vid_0-4", "text_input": "Which way does the camera pan?\n\nA. Left\nB. Right",
              "text_output": ("<think>\nfirst <output_image> then <output_image>\n</think>\n"
                              "<answer>\nB. Right\n</answer>"),
              "image_input": [images["f0.jpg"], images["f1.jpg"]],
              "image_output": [images["o0.jpg"], images["o1.jpg"]]}
    record.update(overrides)
    return record


def _write_lines(path, lines: list[bytes]):
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def test_good_lines_round_trip(tmp_path, images):
    samples = [DiftSample(**_record(images)),
               DiftSample(**_record(images, id="vid_2", text_output="no image here: é ü 中",
                                    image_output=[]))]
    path = tmp_path / "out" / "dift.jsonl"
    write_dift_jsonl(samples, path)
    raw = path.read_text(encoding="utf-8").splitlines()
    assert len(raw) == 2 and "中" in raw[1]  # ensure_ascii=False
    assert json.loads(raw[0]) == _record(images)
    back, skipped = read_dift_jsonl(path)
    assert back == samples
    assert skipped == {}


def test_relative_paths_resolve_against_the_jsonl_folder(tmp_path, images):
    path = tmp_path / "data.jsonl"
    record = _record(images, image_input=["f0.jpg"], image_output=["o0.jpg", "o1.jpg"])
    _write_lines(path, [json.dumps(record).encode()])
    (sample,), _ = read_dift_jsonl(path)
    assert sample.image_input == [images["f0.jpg"]]
    assert sample.image_output == [images["o0.jpg"], images["o1.jpg"]]


def test_each_bad_line_is_skipped_with_its_reason(tmp_path, images, caplog):
    good = json.dumps(_record(images), ensure_ascii=False).encode()
    bad = {
        dd.MISSING_IMAGE: [_record(images, image_input=[images["f0.jpg"], str(tmp_path / "gone.jpg")]),
                           _record(images, image_output=[images["o0.jpg"], str(tmp_path / "gone.jpg")])],
        dd.OUTPUT_IMAGE_MISMATCH: [_record(images, image_output=[images["o0.jpg"]])],
        dd.EMPTY_TEXT: [_record(images, text_input="  "), _record(images, text_output="")],
        dd.BAD_SCHEMA: [_record(images, image_input="f0.jpg"), {"id": "x", "text_input": "q"},
                        _record(images, image_input=[])],
        dd.SPECIAL_TOKEN_IN_TEXT: [_record(images, text_output="<|im_end|> <output_image> <output_image>")],
    }
    lines = [good]
    for records in bad.values():
        lines += [json.dumps(r).encode() for r in records]
    lines += [b'{"id": "broken", "text_input": ', b"[1, 2]", "caf\u00e9".encode("latin-1"), b"", good]
    path = tmp_path / "mixed.jsonl"
    _write_lines(path, lines)

    with caplog.at_level(logging.WARNING, logger=dd.__name__):
        samples, skipped = read_dift_jsonl(path)

    expected = {reason: len(records) for reason, records in bad.items()}
    expected[dd.INVALID_JSON] = 1
    expected[dd.BAD_SCHEMA] += 1  # the JSON array line
    expected[dd.NOT_UTF8] = 1
    assert dict(skipped) == expected
    assert len(samples) == 2 and all(s.id == "vid_0-4" for s in samples)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for reason in expected:
        assert f"({reason})" in logged
    assert f"{path}:2 skipped" in logged  # line numbers point at the bad line
