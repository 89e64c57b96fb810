"""The OpenAI-compatible writer against a local fake endpoint: retries, cache, drops, concurrency."""

from __future__ import annotations

import json
import random
import re
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from fourdthinker.errors import UsageError
from fourdthinker.preprocess import llm_writer
from fourdthinker.preprocess.llm_writer import LlmWriterConfig, ObjectNames, OpenAIWriter
from fourdthinker.preprocess.qa import MentalImage, QuestionDropped, validate_sample, write_clip_questions
from fourdthinker.preprocess.records import ClipAnnotation, ObjectTrack
from fourdthinker.tokens import OUTPUT_IMAGE

FRAMES, WIDTH, HEIGHT = 8, 112, 84
OPTIONS = {"A": "Pan Left", "B": "Pan Right", "C": "Tilt Up", "D": "Dolly In"}


class FakeEndpoint:
    """POST /v1/chat/completions. Replies are derived from the request (a valid chain of thought for
    the stated answer and image count) unless the next scripted fault says otherwise."""

    def __init__(self):
        self.requests: list[dict] = []
        self.script: deque[str] = deque()
        self.delay_s = 0.0
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        self.rejected_subject = ""  # the overlay check answers NO for overlays of this object

    def reply_text(self, body: dict, fault: str) -> str:
        content = body["messages"][0]["content"]
        if isinstance(content, str):  # question phrasing
            question = re.search(r'in one or two sentences: "(.*)"\n', content)[1]
            return "the fake endpoint drops the times" if fault == "bad_phrase" else f"Tell me: {question}"
        text = "\n".join(part["text"] for part in content if part["type"] == "text")
        if "Answer only YES" in text:
            if fault == "garbled":
                return "It is hard to say."
            return "NO." if self.rejected_subject and f"the {self.rejected_subject}." in text else "YES"
        if "dynamic_object" in text:
            return '```json\n{"dynamic_object": "a red ball", "static_object": "null"}\n```'
        n = int(re.search(r"Number of mental images: (\d+)", text)[1])
        gold = re.search(r"Correct answer: (.+)", text)[1]
        if fault == "wrong_answer":
            gold = "Z. Something Else"
        if fault == "wrong_count":
            n += 1
        tags = " to ".join([OUTPUT_IMAGE] * n)
        think = ("I narrow the video to the asked interval and look for a reliable reference in the scene. "
                 f"Picturing the highlighted object, I imagine it going from {tags}. It moves as the answer says.")
        return f"<thinking>{think}</thinking>\n<answer>{gold}</answer>"

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        body = json.loads(handler.rfile.read(int(handler.headers["Content-Length"])))
        with self.lock:
            self.requests.append(body)
            fault = self.script.popleft() if self.script else "ok"
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            time.sleep(self.delay_s)
            if fault == "timeout":
                time.sleep(1.0)  # past the client's timeout
            if fault in ("429", "500", "503", "401"):
                payload = json.dumps({"error": {"message": f"injected {fault}"}}).encode()
                handler.send_response(int(fault))
                if fault == "429":
                    handler.send_header("retry-after", "0")
            else:
                choices = [] if fault == "empty" else [{"index": 0, "finish_reason": "stop", "message": {
                    "role": "assistant", "content": self.reply_text(body, fault)}}]
                payload = json.dumps({"id": "x", "object": "chat.completion", "created": 0,
                                      "model": body["model"], "choices": choices}).encode()
                handler.send_response(200)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(payload)))
            handler.end_headers()
            handler.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout)
        finally:
            with self.lock:
                self.in_flight -= 1


@pytest.fixture
def endpoint():
    fake = FakeEndpoint()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            fake.handle(self)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield fake
    server.shutdown()
    server.server_close()


@pytest.fixture
def make_writer(endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_LLM_KEY", "secret")
    writers = []

    def make(**overrides) -> OpenAIWriter:
        # The overlay check is off unless a test turns it on: the request counts below are per item.
        settings = {"base_url": endpoint.url, "model": "fake-model", "api_key_env": "FAKE_LLM_KEY",
                    "cache_dir": None, "timeout_s": 0.3, "backoff_s": 0.01, "phrase_questions": False,
                    "check_overlays": False}
        writer = OpenAIWriter(LlmWriterConfig(**{**settings, **overrides}))
        writers.append(writer)
        return writer

    yield make
    for writer in writers:
        writer.close()


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> ClipAnnotation:
    root = tmp_path_factory.mktemp("llm_clip")
    rng = np.random.default_rng(0)
    frames, static, dynamic = [], [], []
    for i in range(FRAMES):
        frames.append(str(root / f"frame_{i}.png"))
        Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(frames[-1])
        for masks, x in ((static, 10), (dynamic, 80 - 8 * i)):
            mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
            mask[20:50, x : x + 20] = True
            masks.append(str(root / f"mask_{len(static) + len(dynamic)}_{i}.png"))
            Image.fromarray(mask).save(masks[-1])
    boxes = [[80 - 8 * i, 20, 99 - 8 * i, 49] for i in range(FRAMES)]
    return ClipAnnotation(
        clip_id="c1", group="g", video_path="c1.mp4", frame_paths=frames, frame_times=[0.5 * i for i in range(FRAMES)],
        width=WIDTH, height=HEIGHT,
        camera_segments=[(0, 2, ["Pan Left"]), (2, 4, ["Tilt Up", "Truck Left"]), (4, 7, ["Dolly Out"])],
        objects=[ObjectTrack("grey wall", False, static, [None] * FRAMES, [600.0] * FRAMES),
                 ObjectTrack("red ball", True, dynamic, boxes, [600.0] * FRAMES, direction="Moving Left",
                             speed="Speeding Up", distance="Maintaining Roughly the Same Distance")])


def _images(clip) -> list[MentalImage]:
    return [MentalImage(clip.frame_paths[i], "grey wall", i, clip.frame_times[i]) for i in (0, 2)]


def _write(clip, writer, tmp_path, seed=0):
    return write_clip_questions(clip, writer, random.Random(seed), tmp_path / "overlays")


def _image_urls(body: dict) -> list[str]:
    return [p["image_url"]["url"] for p in body["messages"][0]["content"] if p["type"] == "image_url"]


def test_clip_items_are_valid_and_frames_encoded_once(clip, endpoint, make_writer, tmp_path, monkeypatch):
    encoded = []
    real_fit = llm_writer.fit_to_pixel_budget
    monkeypatch.setattr(llm_writer, "fit_to_pixel_budget", lambda image, px: encoded.append(1) or real_fit(image, px))
    samples, drops = _write(clip, make_writer(), tmp_path)
    assert drops == [] and len(samples) == 5  # three camera segments, two dynamic questions
    assert len(endpoint.requests) == len(samples)  # one request per item when every reply is valid
    for sample in samples:
        assert validate_sample(sample) is None
    for body in endpoint.requests:
        urls = _image_urls(body)
        assert all(u.startswith("data:image/jpeg;base64,") for u in urls)
        frame_urls = urls[:FRAMES]
        assert frame_urls == _image_urls(endpoint.requests[0])[:FRAMES]  # same bytes every request
        text = body["messages"][0]["content"][0]["text"]
        n = len(urls) - FRAMES
        assert f"Number of mental images: {n}" in text and "Correct answer: " in text
    overlays = {path for sample in samples for path in sample.image_output}
    assert len(encoded) == FRAMES + len(overlays)  # each frame and overlay encoded exactly once


def test_retries_on_429_5xx_and_timeouts(clip, endpoint, make_writer, tmp_path):
    endpoint.script.extend(["429", "500", "timeout", "503"])
    samples, drops = _write(clip, make_writer(max_concurrency=1), tmp_path)
    assert drops == [] and len(samples) == 5
    assert len(endpoint.requests) == 5 + 4  # four failed tries re-sent


def test_transport_failures_exhausted_drop_with_reason(clip, endpoint, make_writer, tmp_path):
    endpoint.script.extend(["429"] * 3)
    writer = make_writer(max_retries=2)
    segment = clip.camera_segments[0]
    with pytest.raises(QuestionDropped, match=r"failed 3 times.*HTTP 429"):
        writer.camera_item(clip, segment, _images(clip), OPTIONS, "A")
    assert len(endpoint.requests) == 3


def test_invalid_replies_are_asked_again_then_dropped(clip, endpoint, make_writer, tmp_path):
    writer = make_writer(cot_attempts=3)
    endpoint.script.extend(["wrong_count", "empty", "wrong_answer"])
    with pytest.raises(QuestionDropped, match="3 replies were not a valid chain of thought.*gold option"):
        writer.camera_item(clip, clip.camera_segments[0], _images(clip), OPTIONS, "A")
    assert len(endpoint.requests) == 3

    endpoint.script.extend(["wrong_count", "wrong_answer"])
    question, cot = writer.camera_item(clip, clip.camera_segments[0], _images(clip), OPTIONS, "A")
    assert len(endpoint.requests) == 6
    assert cot.startswith("<think>\n") and cot.endswith("<answer>\nA. Pan Left\n</answer>")
    assert cot.count(OUTPUT_IMAGE) == 2 and "0s" in question and "1s" in question


def test_rerun_with_cache_sends_no_requests(clip, endpoint, make_writer, tmp_path):
    cache = str(tmp_path / "cache")
    endpoint.script.extend(["wrong_answer", "500"])  # an invalid reply and a retry are part of the record
    first, first_drops = _write(clip, make_writer(cache_dir=cache, max_concurrency=1), tmp_path)
    sent = len(endpoint.requests)
    assert sent == len(first) + 2
    again, again_drops = _write(clip, make_writer(cache_dir=cache), tmp_path)
    assert len(endpoint.requests) == sent
    assert [s.to_dift() for s in again] == [s.to_dift() for s in first] and again_drops == first_drops


def test_requests_are_concurrent_but_bounded(clip, endpoint, make_writer, tmp_path):
    endpoint.delay_s = 0.15
    samples, _ = _write(clip, make_writer(max_concurrency=2, timeout_s=5), tmp_path)
    assert len(samples) == 5
    assert endpoint.max_in_flight == 2


def test_phrased_question_kept_only_when_it_keeps_the_details(clip, endpoint, make_writer, tmp_path):
    writer = make_writer(phrase_questions=True)
    question, _ = writer.camera_item(clip, clip.camera_segments[0], _images(clip), OPTIONS, "A")
    assert question.startswith("Tell me: ") and "0s" in question and "1s" in question
    endpoint.script.append("bad_phrase")
    question, _ = writer.camera_item(clip, clip.camera_segments[1], _images(clip), OPTIONS, "A")
    assert not question.startswith("Tell me") and "1s" in question and "2s" in question  # template wording


def test_name_objects(clip, endpoint, make_writer):
    writer = make_writer()
    assert writer.name_objects(clip.frame_paths) == ObjectNames("a red ball", None, "")
    body = endpoint.requests[-1]
    assert len(_image_urls(body)) == FRAMES  # fewer than 10 frames: all of them


def test_from_config_takes_matching_settings(endpoint, monkeypatch, tmp_path):
    from types import SimpleNamespace

    monkeypatch.setenv("FAKE_LLM_KEY", "secret")
    settings = SimpleNamespace(base_url=endpoint.url, model="m", api_key_env="FAKE_LLM_KEY", max_concurrency=3,
                               max_retries=1, timeout_s=9.0, check_overlays=False, unrelated="ignored")
    with OpenAIWriter.from_config(settings, cache_dir=str(tmp_path)) as writer:
        assert (writer.config.max_concurrency, writer.config.max_retries, writer.config.timeout_s) == (3, 1, 9.0)
        assert writer.config.check_overlays is False
        assert writer.config.cache_dir == str(tmp_path) and writer.config.model == "m"


def test_configuration_errors_are_usage_errors(endpoint, make_writer, monkeypatch, clip, tmp_path):
    monkeypatch.delenv("MISSING_KEY_VAR", raising=False)
    with pytest.raises(UsageError, match="MISSING_KEY_VAR"):
        OpenAIWriter(LlmWriterConfig(base_url=endpoint.url, model="m", api_key_env="MISSING_KEY_VAR"))
    with pytest.raises(UsageError, match="max_concurrency"):
        LlmWriterConfig(base_url=endpoint.url, model="m", max_concurrency=0)
    endpoint.script.append("401")
    with pytest.raises(UsageError, match="rejected the request"):
        make_writer().camera_item(clip, clip.camera_segments[0], _images(clip), OPTIONS, "A")


def _is_check(body: dict) -> bool:
    return "Answer only YES" in body["messages"][0]["content"][0]["text"]


def test_overlay_check_no_drops_the_item_yes_keeps_it(clip, endpoint, make_writer):
    writer = make_writer(check_overlays=True)
    images = _images(clip)
    endpoint.rejected_subject = "grey wall"
    with pytest.raises(QuestionDropped, match=f"^{llm_writer.OVERLAY_CHECK_FAILED}: "):
        writer.camera_item(clip, clip.camera_segments[0], images, OPTIONS, "A")
    assert len(endpoint.requests) == 1  # no chain of thought is asked for a rejected item
    check = endpoint.requests[0]
    assert _image_urls(check) == [writer._images.data_url(i.path) for i in images]  # the overlays only

    endpoint.rejected_subject = ""
    _question, cot = writer.camera_item(clip, clip.camera_segments[0], images, OPTIONS, "A")
    assert [_is_check(body) for body in endpoint.requests[1:]] == [True, False]
    assert cot.count(OUTPUT_IMAGE) == len(images)


def test_unusable_check_replies_are_asked_again_then_dropped(clip, endpoint, make_writer):
    writer = make_writer(check_overlays=True, cot_attempts=3)
    endpoint.script.extend(["garbled"] * 3)
    with pytest.raises(QuestionDropped, match=f"^{llm_writer.OVERLAY_CHECK_UNANSWERED}: 3 replies"):
        writer.camera_item(clip, clip.camera_segments[0], _images(clip), OPTIONS, "A")
    assert len(endpoint.requests) == 3
    endpoint.script.extend(["garbled", "500"])  # a garbled reply and a server error, then YES
    writer.camera_item(clip, clip.camera_segments[0], _images(clip), OPTIONS, "A")
    assert [_is_check(body) for body in endpoint.requests[3:]] == [True, True, True, False]


def test_the_verdict_is_the_first_word():
    assert [bool(llm_writer._VERDICT.match(r)) and llm_writer._VERDICT.match(r)[1].upper()
            for r in ("YES", " **Yes**, all of them", "NO. Not every one, YES in some", "Nope", "yesterday")] == \
        ["YES", "YES", "NO", False, False]


def test_clip_questions_of_a_rejected_object_drop_and_rerun_hits_the_cache(clip, endpoint, make_writer, tmp_path):
    from fourdthinker.preprocess.annotate import drop_reason
    from fourdthinker.preprocess.manifest import summarize

    cache = str(tmp_path / "cache")
    endpoint.rejected_subject = "grey wall"  # the static object: every camera question's overlays
    samples, drops = _write(clip, make_writer(check_overlays=True, cache_dir=cache), tmp_path)
    cameras = len(clip.camera_segments)
    assert len(drops) == cameras and len(samples) == 5 - cameras
    assert {s.kind for s in samples} <= {f"dynamic_{k}" for k in ("direct", "bbox", "distance", "speed")}
    result = {"status": "ok", "drops": [drop_reason(d) for d in drops]}
    assert summarize([result])["drops_per_reason"] == {llm_writer.OVERLAY_CHECK_FAILED: cameras}
    assert all(r.startswith(f"{llm_writer.OVERLAY_CHECK_FAILED}: c1_") and r.count(llm_writer.OVERLAY_CHECK_FAILED) == 1
               for r in result["drops"])
    assert drop_reason("c1_0->2: 3 replies were not a valid chain of thought") == \
        "question dropped: c1_0->2: 3 replies were not a valid chain of thought"
    sent = len(endpoint.requests)
    assert sum(map(_is_check, endpoint.requests)) == sent - len(samples)  # one check per item

    again, again_drops = _write(clip, make_writer(check_overlays=True, cache_dir=cache), tmp_path)
    assert len(endpoint.requests) == sent
    assert [s.to_dift() for s in again] == [s.to_dift() for s in samples] and again_drops == drops
