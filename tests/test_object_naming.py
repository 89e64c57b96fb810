"""Per-clip object naming by an LLM (dataset.NameObjects) feeding the segmenter's prompts, and
segmenter batches that never mix buckets, against a local fake OpenAI-compatible endpoint."""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fourdthinker.actors import preprocess_plan as dataset
from fourdthinker.actors import segmenter as segmenter_module
from fourdthinker.actors.preprocess_plan import NameObjects, segment_batches
from fourdthinker.actors.segmenter import SegmentClips, Track
from fourdthinker.preprocess.config import LlmConfig, PreprocessConfig, SegmenterConfig
from fourdthinker.preprocess.index import STATUS_OK, build_index
from fourdthinker.preprocess.llm_writer import LlmWriterConfig, _ImageEncoder

KEY_ENV = "FOURDTHINKER_TEST_LLM_KEY"
VOCABULARY = ["person", "car"]
SEGMENT_CALLS = "segment_calls.jsonl"


class NamingEndpoint:
    """POST /v1/chat/completions answering object-naming requests: scripted replies first, then a
    name derived from the first image (so every clip gets its own names)."""

    def __init__(self):
        self.requests: list[dict] = []
        self.script: deque[str] = deque()
        self.lock = threading.Lock()

    @staticmethod
    def names_for(first_image_url: str) -> tuple[str, str]:
        digest = hashlib.sha256(first_image_url.encode()).hexdigest()[:6]
        return f"moving thing {digest}", f"still thing {digest}"

    def reply(self, body: dict) -> str:
        with self.lock:
            self.requests.append(body)
            if self.script:
                return self.script.popleft()
        urls = [p["image_url"]["url"] for p in body["messages"][0]["content"] if p["type"] == "image_url"]
        dynamic, static = self.names_for(urls[0])
        return json.dumps({"dynamic_object": dynamic, "static_object": static})


@pytest.fixture(scope="module")
def endpoint():
    fake = NamingEndpoint()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            message = {"role": "assistant", "content": fake.reply(body)}
            payload = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                  "choices": [{"index": 0, "finish_reason": "stop", "message": message}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(KEY_ENV, "secret")  # set before Ray starts, so its workers inherit it
        yield fake
    server.shutdown()
    server.server_close()


def _cfg(endpoint, out: Path, **kw) -> PreprocessConfig:
    llm = LlmConfig(base_url=endpoint.url, model="fake", api_key_env=KEY_ENV, max_concurrency=1)
    return PreprocessConfig(input_root="unused", output_dir=str(out), concepts=list(VOCABULARY), llm=llm, **kw)


def _row(tmp_path: Path, clip_id: str, seed: int, frames: int = 3) -> dict:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(frames):
        paths.append(str(tmp_path / f"{clip_id}_{i}.png"))
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(paths[-1])
    return {"clip_id": clip_id, "bucket": "b0", "status": STATUS_OK, "reason": "", "frame_paths": paths,
            "frame_times": [0.5 * i for i in range(frames)]}


def _expected_names(row: dict) -> list[str]:
    return list(NamingEndpoint.names_for(_ImageEncoder(LlmWriterConfig("u", "m").image_max_pixels)
                                         .data_url(row["frame_paths"][0])))


class RecordingSegmenter:
    """Records the prompts each clip is segmented with; finds nothing."""

    def __init__(self):
        self.prompts: dict[str, list[str]] = {}

    def segment(self, clip, prompts):
        self.prompts[clip.clip_id] = list(prompts)
        return [Track(p, [None] * len(clip.times), 0.0) for p in prompts]


def test_names_from_the_llm_prompt_that_clips_segmentation(endpoint, tmp_path, monkeypatch):
    endpoint.requests.clear()
    cfg = _cfg(endpoint, tmp_path / "out")
    rows = [_row(tmp_path, "a", 0), _row(tmp_path, "b", 1),
            {**_row(tmp_path, "dropped", 2), "status": "dropped", "reason": "video missing"}]
    named = [NameObjects(cfg)(row) for row in rows]
    assert len(endpoint.requests) == 2  # a dropped clip costs no request
    for row, out in zip(rows[:2], named):
        assert out["concepts"] == _expected_names(row) and out["concepts_source"] == "llm"
        assert out["concepts_note"] == ""

    recorder = RecordingSegmenter()
    monkeypatch.setattr(segmenter_module, "build_segmenter", lambda *args: recorder)
    segmented = SegmentClips(cfg)(pd.DataFrame(named))
    assert recorder.prompts == {row["clip_id"]: _expected_names(row) for row in rows[:2]}
    assert segmented["status"].tolist() == [STATUS_OK, STATUS_OK, "dropped"]

    # Without the column (offline plan), the vocabulary prompts every clip.
    SegmentClips(cfg)(pd.DataFrame(rows[:1]))
    assert recorder.prompts["a"] == VOCABULARY


@pytest.mark.parametrize("reply, reason", [
    ("Here are the objects: a car and a tree.", "not JSON"),
    ('{"dynamic_object": "a car"}', "lacks dynamic_object / static_object"),
    ('{"dynamic_object": null, "static_object": null}', "the LLM named no object"),
])
def test_an_unusable_naming_reply_falls_back_to_the_vocabulary(endpoint, tmp_path, reply, reason):
    endpoint.requests.clear()
    attempts = LlmWriterConfig("u", "m").cot_attempts
    endpoint.script.extend([reply] * attempts)
    out = NameObjects(_cfg(endpoint, tmp_path / "out"))(_row(tmp_path, "a", 0))
    endpoint.script.clear()
    assert out["concepts"] == VOCABULARY and out["concepts_source"] == "vocabulary"
    assert out["concepts_note"].startswith("object naming: ") and reason in out["concepts_note"]
    # A reply that names no object is an answer; unusable ones are asked again.
    assert len(endpoint.requests) == (1 if "null" in reply else attempts)


def test_naming_replies_are_cached_for_a_rerun(endpoint, tmp_path):
    endpoint.requests.clear()
    cfg = _cfg(endpoint, tmp_path / "out")
    rows = [_row(tmp_path, "a", 0), _row(tmp_path, "b", 1)]
    first = [NameObjects(cfg)(row) for row in rows]
    assert len(endpoint.requests) == 2
    again = [NameObjects(cfg)(row) for row in rows]
    assert len(endpoint.requests) == 2 and again == first


def test_the_clip_result_records_where_its_concepts_came_from(tmp_path):
    from fourdthinker.preprocess.annotate import process_clip
    from fourdthinker.preprocess.manifest import clip_result_path

    cfg = PreprocessConfig(input_root="unused", output_dir=str(tmp_path))
    row = {"clip_id": "c", "group": "g", "bucket": "b", "video_path": "c.mp4", "status": "dropped",
           "reason": "segmentation failed: boom"}
    named = {**row, "clip_id": "n", "concepts": np.array(VOCABULARY), "concepts_source": "vocabulary",
             "concepts_note": "object naming: reply is not JSON"}
    process_clip(row, cfg, writer=None)
    process_clip(named, cfg, writer=None)
    offline = json.loads(clip_result_path(tmp_path, "c").read_text())
    online = json.loads(clip_result_path(tmp_path, "n").read_text())
    assert "concepts" not in offline  # offline results are unchanged
    assert (online["concepts"], online["concepts_source"], online["concepts_note"]) == \
        (VOCABULARY, "vocabulary", "object naming: reply is not JSON")


def test_segment_batches_are_runs_of_one_bucket():
    rows = [{"clip_id": str(i), "bucket": b} for i, b in enumerate("aaabbcccc")]
    batches = segment_batches(rows, 2)
    assert [[r["clip_id"] for r in batch] for batch in batches] == \
        [["0", "1"], ["2"], ["3", "4"], ["5", "6"], ["7", "8"]]
    assert [r for batch in batches for r in batch] == rows


class RecordingSegmentClips(SegmentClips):
    """SegmentClips that appends, per segmenter batch, its rows' (clip id, bucket, prompts) to a file."""

    def __init__(self, cfg: PreprocessConfig):
        super().__init__(cfg)
        self.log = Path(cfg.output_dir) / SEGMENT_CALLS
        recorder = self.segmenter
        self.prompts: dict[str, list[str]] = {}
        real_segment = recorder.segment

        def segment(clip, prompts):
            self.prompts[clip.clip_id] = list(prompts)
            return real_segment(clip, prompts)

        recorder.segment = segment

    def _segment_bucket(self, batch: pd.DataFrame) -> list[dict]:
        out = super()._segment_bucket(batch)
        calls = [{"clip_id": r["clip_id"], "bucket": r["bucket"], "prompts": self.prompts.get(r["clip_id"])}
                 for r in batch.to_dict("records")]
        with self.log.open("a") as handle:
            handle.write(json.dumps(calls) + "\n")
        return out


@pytest.mark.slow
def test_the_ray_plan_names_objects_and_never_mixes_buckets_in_a_batch(endpoint, tmp_path, monkeypatch):
    import ray
    import ray.cloudpickle

    from fourdthinker.data.synth import SynthConfig, build_world

    world = tmp_path / "world"
    build_world(world, SynthConfig(videos=5, seed=0, width=64, height=48, seconds=2, fps=5))
    out = tmp_path / "out"
    out.mkdir()
    cfg = _cfg(endpoint, out, fps=2.5, min_frames=4, max_frames=8,
               segmenter=SegmenterConfig(backend="ground_truth", num_gpus_per_actor=0, max_actors=2,
                                         batch_size=2))
    cfg.input_root = str(world)
    rows, _ = build_index(cfg)
    buckets = ["short", "short", "short", "wide", "wide"]  # the index keeps a bucket's rows together
    rows = [{**row, "bucket": bucket} for row, bucket in zip(rows, buckets, strict=True)]

    monkeypatch.setattr(dataset, "SegmentClips", RecordingSegmentClips)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        results = list(dataset.segmented_clips(cfg, rows).iter_rows())
    finally:
        ray.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])

    calls = [json.loads(line) for line in (out / SEGMENT_CALLS).read_text().splitlines()]
    assert sorted(r["clip_id"] for call in calls for r in call) == sorted(r["clip_id"] for r in rows)
    for call in calls:
        assert 1 <= len(call) <= cfg.segmenter.batch_size
        assert len({r["bucket"] for r in call}) == 1, call
    by_clip = {r["clip_id"]: r for r in results}
    for call in calls:
        for r in call:
            frames = by_clip[r["clip_id"]]
            assert frames["status"] == STATUS_OK and frames["concepts_source"] == "llm"
            assert r["prompts"] == _expected_names(frames) == list(frames["concepts"])
