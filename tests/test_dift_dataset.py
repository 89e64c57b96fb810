"""DIFT JSONL: good lines round-trip, each kind of bad line is skipped and counted with its reason."""

from __future__ import annotations

import json
import logging

import pytest

from fourdthinker.data import dift_dataset as dd
from fourdthinker.data.dift_dataset import DiftSample, read_dift_jsonl, write_dift_jsonl
from fourdthinker.errors import UsageError


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
    path = tmp_path / "dift.jsonl"  # the images' folder: media stay inside the JSONL's folder
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


def test_no_usable_sample_is_an_error_naming_the_file_the_counts_per_reason_and_the_fix(tmp_path, images):
    # The issue: paths written relative to the working directory, not to the JSONL's folder.
    path = tmp_path / "dift.jsonl"
    records = [_record(images, image_input=["runs/out/frames/c/f0.jpg"]) for _ in range(3)]
    records.append(_record(images, text_input=""))
    _write_lines(path, [json.dumps(r).encode() for r in records])
    samples, skipped = read_dift_jsonl(path)
    assert samples == [] and skipped == {dd.MISSING_IMAGE: 3, dd.EMPTY_TEXT: 1}
    with pytest.raises(UsageError) as err:
        dd.require_usable(path, len(samples), skipped)
    message = str(err.value)
    assert str(path) in message and f"{dd.MISSING_IMAGE}: 3" in message and f"{dd.EMPTY_TEXT}: 1" in message
    assert f"relative to the JSONL file's folder {path.parent}" in message
    dd.require_usable(path, 1, skipped)  # one usable sample is enough


def test_a_media_path_leaving_the_jsonl_folder_is_skipped_as_outside_the_root(tmp_path, images):
    root = tmp_path / "data"
    (root / "frames").mkdir(parents=True)
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(b"x")
    (root / "frames" / "link.jpg").symlink_to(outside)  # a symlink inside that points out
    (root / "frames" / "ok.jpg").write_bytes(b"x")
    escapes = ["../../../../../etc/passwd", "/etc/passwd", str(outside), "frames/../../secret.jpg",
               "frames/link.jpg"]
    records = [_record(images, image_input=["frames/ok.jpg", bad], image_output=["frames/ok.jpg"] * 2)
               for bad in escapes]
    records.append(_record(images, image_input=["frames/ok.jpg", str(root / "frames" / "ok.jpg")],
                           image_output=["./frames/ok.jpg", "frames/../frames/ok.jpg"]))
    path = root / "dift.jsonl"
    _write_lines(path, [json.dumps(r).encode() for r in records])
    samples, skipped = read_dift_jsonl(path)
    assert dict(skipped) == {dd.PATH_OUTSIDE_ROOT: len(escapes)}
    ok = str(root / "frames" / "ok.jpg")
    assert [s.image_input + s.image_output for s in samples] == [[ok] * 4]


def test_rl_media_paths_follow_the_same_root_rule(tmp_path):
    from fourdthinker.data.rl_dataset import read_rl_jsonl

    root = tmp_path / "data"
    root.mkdir()
    (tmp_path / "v.mp4").write_bytes(b"x")
    (root / "v.mp4").write_bytes(b"x")
    rows = [{"Question": "Pan?", "A": "Yes", "B": "No", "Correct": "A", "video_path": p}
            for p in ("../v.mp4", str(tmp_path / "v.mp4"), "v.mp4")]
    rows.append({"Question": "Pan?", "A": "Yes", "B": "No", "Correct": "A", "frame_paths": ["../v.mp4"]})
    path = root / "rl.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts, skipped = read_rl_jsonl(path)
    assert [p.video_path for p in prompts] == [str(root / "v.mp4")]
    assert dict(skipped) == {dd.PATH_OUTSIDE_ROOT: 3}
