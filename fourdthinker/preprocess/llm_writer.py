"""The LLM writer: questions and chains of thought from any OpenAI-compatible chat endpoint.

`OpenAIWriter` implements the `QaWriter` interface of `qa.py`, plus `name_objects`, the reference's
object-identification call (REFERENCE-SPEC §2.2 step 4), whose names become a clip's segmentation
prompts. Before writing an item it asks, in one request with the item's overlays, whether every overlay
highlights the same object (the reference's YES/NO verification, §4 step 6); a NO drops the item with
the reason `overlay_check_failed`. Per request it is async with
bounded concurrency, retries 429 / 5xx / timeouts / connection errors with exponential backoff (and
the server's Retry-After), and caches every reply on disk keyed by the request, so a rerun costs no
requests. A reply that is not a valid chain of thought for the given answer (`validate_text_output`)
is asked again, up to `cot_attempts` times, then the item is dropped with the last reason.

Images are sent as base64 JPEG data URLs, each frame shrunk to the model's pixel budget and encoded
once per writer (the reference re-encoded every full-size frame on every attempt).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import random
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import openai
from PIL import Image

from fourdthinker.atomic import atomic_write_json
from fourdthinker.data.video import MAX_FRAMES, MAX_PIXELS, fit_to_pixel_budget, spread_indices
from fourdthinker.errors import UsageError
from fourdthinker.preprocess.options import format_movement
from fourdthinker.preprocess.qa import (
    MentalImage,
    QuestionDropped,
    QuestionJob,
    Segment,
    TemplateWriter,
    answer_option,
    assemble_cot,
    format_seconds,
    initial_box_text,
    validate_text_output,
)
from fourdthinker.preprocess.records import ClipAnnotation, ObjectTrack
from fourdthinker.prompts import options_block
from fourdthinker.tokens import OUTPUT_IMAGE

T = TypeVar("T")

# Frames shown to the object-identification call (the reference's choice).
IDENTIFY_FRAMES = 10
# Object labels are short noun phrases ("a red car"); longer text is a sentence, not a label.
MAX_LABEL_WORDS = 8
_JPEG_QUALITY = 90
_ENCODED_IMAGE_CACHE = 512

# Drop-reason categories of the overlay check (the text before the first ':' of a reason).
OVERLAY_CHECK_FAILED = "overlay_check_failed"
OVERLAY_CHECK_UNANSWERED = "overlay_check_unanswered"

_REPLY = re.compile(r"<think(?:ing)?>(?P<think>.*?)</think(?:ing)?>\s*<answer>(?P<answer>.*?)</answer>",
                    re.DOTALL | re.IGNORECASE)
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)
# The verdict is the reply's first word; the reference's `"YES" in reply` also passed "NO, ... YES".
_VERDICT = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)
_RETRYABLE = (openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError,
              openai.APIConnectionError)
# A wrong key, model or URL fails every request alike: stop and say so instead of dropping everything.
_CONFIG_ERRORS = (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError)


@dataclass(frozen=True)
class ObjectNames:
    """The objects an LLM named in a clip's frames; `reason` says why a name is missing
    ("" when the reply was usable, even if it named no object of a kind)."""

    dynamic: str | None
    static: str | None
    reason: str = ""

    @property
    def concepts(self) -> list[str]:
        """The named objects as segmentation prompts (dynamic first, no repeats)."""
        return list(dict.fromkeys(name for name in (self.dynamic, self.static) if name))


@dataclass(frozen=True)
class LlmWriterConfig:
    """Where the endpoint is and how hard to try. `api_key_env` names the variable holding the key
    (any non-empty value for endpoints without authentication)."""

    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    cache_dir: str | None = None  # None: no cache
    max_concurrency: int = 8  # requests in flight per event loop
    max_retries: int = 5  # re-sends of one request on 429 / 5xx / timeout / connection error
    cot_attempts: int = 4  # requests for a valid chain of thought before the item is dropped
    timeout_s: float = 120.0
    backoff_s: float = 1.0  # first retry delay; doubles per retry, with jitter
    max_backoff_s: float = 30.0
    max_tokens: int = 4096
    temperature: float = 0.7
    image_max_pixels: int = MAX_PIXELS
    max_video_frames: int = MAX_FRAMES
    phrase_questions: bool = True  # False: keep the template question wording
    check_overlays: bool = True  # ask whether every overlay of an item shows the same object

    def __post_init__(self):
        for name in ("max_concurrency", "cot_attempts", "max_tokens", "max_video_frames"):
            if getattr(self, name) < 1:
                raise UsageError(f"llm {name}={getattr(self, name)}: must be at least 1")
        if self.max_retries < 0 or self.timeout_s <= 0 or self.backoff_s < 0:
            raise UsageError("llm max_retries and backoff_s must be >= 0 and timeout_s > 0")


class OpenAIWriter:
    """A `QaWriter` backed by an OpenAI-compatible chat-completions endpoint.

    Sync methods (`camera_item`, `dynamic_item`, `write_many`, `name_objects`) run on a private
    event-loop thread, so one connection pool serves every call; the `a*` coroutines run on the
    caller's loop. Item methods raise `QuestionDropped` with the reason when no valid text comes back.
    """

    def __init__(self, config: LlmWriterConfig):
        self.config = config
        self._api_key = os.environ.get(config.api_key_env)
        if not self._api_key:
            raise UsageError(f"environment variable {config.api_key_env} is not set; export the API key "
                             "there (any non-empty value for endpoints without authentication) or name "
                             "another variable in the llm api_key_env setting")
        self._cache = _ReplyCache(Path(config.cache_dir)) if config.cache_dir else None
        self._templates = TemplateWriter()
        self._images = _ImageEncoder(config.image_max_pixels)
        self._clients: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_lock = threading.Lock()
        self._rng = random.Random()  # backoff jitter only: never affects what is written

    @classmethod
    def from_config(cls, settings: Any, **overrides: Any) -> "OpenAIWriter":
        """A writer from any settings object (e.g. the preprocess stage's `llm` section): its
        attributes named like `LlmWriterConfig` fields are used, `overrides` win."""
        known = {f.name for f in fields(LlmWriterConfig)}
        values = {name: getattr(settings, name) for name in known if hasattr(settings, name)}
        return cls(LlmWriterConfig(**{**values, **overrides}))

    # --- QaWriter (sync facade) ---------------------------------------------------------------

    def camera_item(self, clip: ClipAnnotation, segment: Segment, overlay_paths: Sequence[MentalImage],
                    options: dict[str, str], answer_letter: str) -> tuple[str, str]:
        return self._run(self.acamera_item(clip, segment, overlay_paths, options, answer_letter))

    def dynamic_item(self, clip: ClipAnnotation, track: ObjectTrack, kind: str,
                     overlay_paths: Sequence[MentalImage], options: dict[str, str],
                     answer_letter: str) -> tuple[str, str]:
        return self._run(self.adynamic_item(clip, track, kind, overlay_paths, options, answer_letter))

    def write_many(self, jobs: Sequence[QuestionJob]) -> list[tuple[str, str] | QuestionDropped]:
        """All jobs concurrently (bounded by `max_concurrency`); a failed job's entry is its
        `QuestionDropped`. Used by `write_clip_questions`."""
        return self._run(self.awrite_many(jobs))

    def name_objects(self, frames: Sequence[str | Path]) -> ObjectNames:
        """The dynamic and static object seen in the frames (see `aname_objects`)."""
        return self._run(self.aname_objects(frames))

    def check_overlays(self, images: Sequence[MentalImage]) -> None:
        """Raise `QuestionDropped` unless every overlay shows the same object (see `acheck_overlays`)."""
        self._run(self.acheck_overlays(images))

    def close(self) -> None:
        """Close the private event loop's client and stop the loop."""
        with self._loop_lock:
            loop, self._loop = self._loop, None
        if loop is not None:
            asyncio.run_coroutine_threadsafe(self._aclose_client(), loop).result()
            loop.call_soon_threadsafe(loop.stop)

    async def _aclose_client(self) -> None:
        pair = self._clients.pop(asyncio.get_running_loop(), None)
        if pair is not None:
            await pair[0].close()

    def __enter__(self) -> "OpenAIWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- async API -----------------------------------------------------------------------------

    async def awrite_many(self, jobs: Sequence[QuestionJob]) -> list[tuple[str, str] | QuestionDropped]:
        async def one(job: QuestionJob) -> tuple[str, str] | QuestionDropped:
            try:
                return await self.awrite(job)
            except QuestionDropped as dropped:
                return dropped

        return list(await asyncio.gather(*(one(job) for job in jobs)))

    async def awrite(self, job: QuestionJob) -> tuple[str, str]:
        if job.dynamic_kind is None:
            return await self.acamera_item(job.clip, job.segment, job.images, job.options, job.answer)
        return await self.adynamic_item(job.clip, job.track, job.dynamic_kind, job.images, job.options,
                                        job.answer)

    async def acamera_item(self, clip: ClipAnnotation, segment: Segment, images: Sequence[MentalImage],
                           options: dict[str, str], letter: str) -> tuple[str, str]:
        template_question, _ = self._templates.camera_item(clip, segment, images, options, letter)
        await self.acheck_overlays(images)
        start, end, _labels = segment
        times = (format_seconds(clip.frame_times[start]), format_seconds(clip.frame_times[end]))
        question = await self._phrase(template_question, must_keep=times)
        shown = self._shown_frames(clip)
        instruction = _camera_instruction(clip, shown, images, question, options, letter, times)
        return question, await self._chain_of_thought(clip, shown, images, instruction, options, letter)

    async def adynamic_item(self, clip: ClipAnnotation, track: ObjectTrack, kind: str,
                            images: Sequence[MentalImage], options: dict[str, str],
                            letter: str) -> tuple[str, str]:
        template_question, _ = self._templates.dynamic_item(clip, track, kind, images, options, letter)
        await self.acheck_overlays(images)
        times = (format_seconds(images[0].time_s), format_seconds(images[-1].time_s))
        box = initial_box_text(clip, track, images) if kind == "bbox" else None
        question = await self._phrase(template_question, must_keep=times + ((box,) if box else ()))
        shown = self._shown_frames(clip)
        instruction = _dynamic_instruction(clip, shown, track, images, question, options, letter, times)
        return question, await self._chain_of_thought(clip, shown, images, instruction, options, letter)

    async def aname_objects(self, frames: Sequence[str | Path]) -> ObjectNames:
        """One dynamic and one static object named from up to IDENTIFY_FRAMES frames spread over the
        clip. An unusable reply is asked again (`cot_attempts` in all); when none is usable, or the
        frames cannot be read or the endpoint fails, both names are None and `reason` says why."""
        if not frames:
            raise UsageError("name_objects needs at least one frame")
        picked = [frames[i] for i in spread_indices(len(frames), IDENTIFY_FRAMES)]
        try:
            content = [_text(_IDENTIFY_INSTRUCTION), *[self._image_part(p) for p in picked]]
        except QuestionDropped as unreadable:
            return ObjectNames(None, None, f"frames unreadable: {unreadable}")
        reason = "no reply"
        for attempt in range(self.config.cot_attempts):
            try:
                reply = await self._chat([{"role": "user", "content": content}], attempt)
            except QuestionDropped as dropped:
                return ObjectNames(None, None, str(dropped))
            labels, reason = _parse_objects(reply)
            if labels is not None:
                return ObjectNames(*labels)
        return ObjectNames(None, None, f"{self.config.cot_attempts} replies unusable; last: {reason}")

    async def acheck_overlays(self, images: Sequence[MentalImage]) -> None:
        """Ask, with the overlays only, whether each highlights the same object; raise
        `QuestionDropped` with reason `overlay_check_failed` on NO, `overlay_check_unanswered` when
        `cot_attempts` replies are neither YES nor NO. No-op when `check_overlays` is off."""
        if not self.config.check_overlays or not images:
            return
        content = [_text(_CHECK_INSTRUCTION.format(n=len(images), subject=images[0].subject)),
                   *[self._image_part(image.path) for image in images]]
        reply = ""
        for attempt in range(self.config.cot_attempts):
            reply = await self._chat([{"role": "user", "content": content}], attempt)
            verdict = _VERDICT.match(reply)
            if verdict is None:
                continue
            if verdict[1].lower() == "yes":
                return
            raise QuestionDropped(f"{OVERLAY_CHECK_FAILED}: the LLM says the {len(images)} overlays do not "
                                  f"all show the same {images[0].subject}")
        raise QuestionDropped(f"{OVERLAY_CHECK_UNANSWERED}: {self.config.cot_attempts} replies were not "
                              f"YES or NO; last: {reply[:80]!r}")

    # --- internals -----------------------------------------------------------------------------

    async def _chain_of_thought(self, clip: ClipAnnotation, shown: Sequence[int], images: Sequence[MentalImage],
                                instruction: str, options: dict[str, str], letter: str) -> str:
        content = [
            _text(instruction),
            *[self._image_part(clip.frame_paths[i]) for i in shown],
            _text(f"--- The next {len(images)} images are the highlighted key frames, in time order: the "
                  f"mental images you imagine; write one {OUTPUT_IMAGE} for each ---"),
            *[self._image_part(image.path) for image in images],
        ]
        messages = [{"role": "user", "content": content}]
        gold = answer_option(options, letter)
        reason = "no reply"
        for attempt in range(self.config.cot_attempts):
            reply = await self._chat(messages, attempt)
            cot, reason = _cot_from_reply(reply, len(images), gold)
            if cot is not None:
                return cot
        raise QuestionDropped(f"{self.config.cot_attempts} replies were not a valid chain of thought; "
                              f"last: {reason}")

    async def _phrase(self, template_question: str, must_keep: Sequence[str]) -> str:
        """An LLM rewording of the template question, or the template when the rewording drops a
        required detail (times, the box) or looks like more than a question."""
        if not self.config.phrase_questions:
            return template_question
        keep = ", ".join(f'"{k}"' for k in must_keep)
        prompt = (f"Rephrase this multiple-choice question stem in your own words, in one or two sentences: "
                  f'"{template_question}"\nKeep {keep} exactly as written. Do not list answer options and do '
                  "not mention masks, highlights or overlays. Reply with the question only.")
        try:
            reply = (await self._chat([{"role": "user", "content": prompt}], 0)).strip().strip('"').strip()
        except QuestionDropped:
            return template_question
        usable = (len(reply) > 10 and "\n" not in reply and "<" not in reply
                  and all(k in reply for k in must_keep))
        return reply if usable else template_question

    async def _chat(self, messages: list[dict], attempt: int) -> str:
        """The reply text for `messages`; `attempt` tells apart repeated asks of the same request."""
        request = {"model": self.config.model, "messages": messages, "max_tokens": self.config.max_tokens,
                   "temperature": self.config.temperature}
        key = hashlib.sha256(json.dumps({**request, "attempt": attempt}, sort_keys=True).encode()).hexdigest()
        if self._cache is not None and (cached := self._cache.get(key)) is not None:
            return cached
        reply = await self._request(request)
        if self._cache is not None:
            self._cache.put(key, reply)
        return reply

    async def _request(self, request: dict) -> str:
        client, slots = self._client()
        retries = 0
        while True:
            try:
                async with slots:
                    response = await client.chat.completions.create(**request)
            except _CONFIG_ERRORS as err:
                raise UsageError(f"the LLM endpoint {self.config.base_url} rejected the request ({err}); "
                                 f"check base_url, model {self.config.model!r} and "
                                 f"{self.config.api_key_env}") from None
            except _RETRYABLE as err:
                if retries == self.config.max_retries:
                    raise QuestionDropped(f"LLM endpoint failed {retries + 1} times; "
                                          f"last: {_describe(err)}") from None
                await asyncio.sleep(self._backoff(retries, err))
                retries += 1
                continue
            except openai.APIError as err:
                raise QuestionDropped(f"LLM request failed: {_describe(err)}") from None
            choices = getattr(response, "choices", None) or []
            content = choices[0].message.content if choices and choices[0].message else None
            # A reply without text is answered like an invalid one: the caller asks again.
            return content or ""

    def _backoff(self, retry: int, err: Exception) -> float:
        response = getattr(err, "response", None)
        retry_after = response.headers.get("retry-after") if response is not None else None
        try:
            if retry_after is not None:
                return min(float(retry_after), self.config.max_backoff_s)
        except ValueError:
            pass  # an HTTP date: fall back to our own schedule
        delay = min(self.config.backoff_s * 2**retry, self.config.max_backoff_s)
        return delay * (0.5 + 0.5 * self._rng.random())  # jitter: concurrent retries spread out

    def _client(self) -> tuple[openai.AsyncOpenAI, asyncio.Semaphore]:
        # An async client and its connections belong to one event loop: one pair per running loop.
        loop = asyncio.get_running_loop()
        if loop not in self._clients:
            client = openai.AsyncOpenAI(base_url=self.config.base_url, api_key=self._api_key,
                                        timeout=self.config.timeout_s, max_retries=0)  # retries are ours
            self._clients[loop] = (client, asyncio.Semaphore(self.config.max_concurrency))
        return self._clients[loop]

    def _shown_frames(self, clip: ClipAnnotation) -> list[int]:
        """Indices of the clip frames sent with a chain-of-thought request (at most max_video_frames)."""
        return spread_indices(len(clip.frame_paths), self.config.max_video_frames).tolist()

    def _image_part(self, path: str | Path) -> dict:
        return {"type": "image_url", "image_url": {"url": self._images.data_url(path)}}

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        with self._loop_lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                threading.Thread(target=self._loop.run_forever, name="openai-writer", daemon=True).start()
            loop = self._loop
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result()


# --- prompts (REFERENCE-SPEC §3.5, §2.2 step 4; our wording) -------------------------------------

_IDENTIFY_INSTRUCTION = (
    "These frames come from one video, in time order. Name one object that clearly moves or changes "
    "during the video (the dynamic object) and one prominent object that stays still (the static "
    "object). Both must be clearly visible. Use short labels of at most 8 words with a colour or shape "
    'cue, e.g. "a red car". Reply with JSON only: {"dynamic_object": "label", "static_object": "label"}, '
    "using null for an object that does not exist."
)

_CHECK_INSTRUCTION = (
    "Each of these {n} images highlights a region with a red overlay and outline; it should be the "
    "{subject}. Check every image: is the highlighted region the same {subject} in all of them (the same "
    "object, not another one of its kind), is the highlight consistent across the images, does it "
    "reasonably cover that object, and is the object clearly visible? Answer only YES if all of this "
    "holds in every image, otherwise only NO."
)

_COMMON_RULES = (
    "The highlighted key frames are mental images the reasoning produces, not inputs it was given: write "
    "as if you picture them. Insert exactly {n} {tag} placeholders, one per key frame, in time order, all "
    'together in a single sentence (for example "... going from {tag} to {tag}."). Do not write {tag} '
    'anywhere else; afterwards refer to the pictures in words ("the first view", "the final view").\n'
    "Reply with exactly <thinking>your reasoning, at least three sentences</thinking><answer>{gold}</answer>."
)


def _video_header(clip: ClipAnnotation, shown: Sequence[int], images: Sequence[MentalImage], question: str,
                  options: dict[str, str], letter: str) -> str:
    times = ", ".join(format_seconds(clip.frame_times[i]) for i in shown)
    key_times = ", ".join(format_seconds(image.time_s) for image in images)
    return (
        "You write training data for a video model that reasons with imagined pictures.\n"
        f"Below are {len(shown)} frames of a video, taken at {times}. After them come "
        f"{len(images)} key frames (at {key_times}) in which the {images[0].subject} is highlighted with a "
        "red overlay and outline.\n"
        f"Question:\n{question}\n{options_block(options)}\n"
        f"Correct answer: {answer_option(options, letter)}\n"
        f"Number of mental images: {len(images)}\n"
        "Write the reasoning that reaches the correct answer from what the frames show.\n"
    )


def _camera_instruction(clip: ClipAnnotation, shown: Sequence[int], images: Sequence[MentalImage],
                        question: str, options: dict[str, str], letter: str, times: tuple[str, str]) -> str:
    subject = images[0].subject
    steps = (
        f"Reasoning steps: (1) narrow the whole video down to {times[0]}-{times[1]}; (2) describe the scene; "
        f"(3) explain that the camera's motion is read from something fixed in the scene, the {subject}; "
        f"(4) the sentence that pictures the highlighted {subject}; (5) how the {subject} shifts, grows, "
        "shrinks or turns in the image between the views, in words only; (6) which camera movement causes "
        "that, matching the correct option.\n"
    )
    return _video_header(clip, shown, images, question, options, letter) + steps + _COMMON_RULES.format(
        n=len(images), tag=OUTPUT_IMAGE, gold=answer_option(options, letter))


def _dynamic_instruction(clip: ClipAnnotation, shown: Sequence[int], track: ObjectTrack,
                         images: Sequence[MentalImage], question: str, options: dict[str, str], letter: str,
                         times: tuple[str, str]) -> str:
    camera = [f"{format_seconds(clip.frame_times[s])}-{format_seconds(clip.frame_times[e])}: "
              f"{format_movement(labels)}" for s, e, labels in clip.camera_segments if labels]
    camera_note = (f"For reference, the camera itself moves as follows (not the object's motion): "
                   f"{'; '.join(camera)}.\n" if camera else "")
    steps = (
        f"{camera_note}Reasoning steps: (1) give an overview of the scene; (2) narrow the video down to "
        f"{times[0]}-{times[1]}; (3) explain that you follow the {track.name}; (4) the sentence that pictures "
        f"the highlighted {track.name}; (5) how its position in the image and its apparent size change "
        "between the views; (6) separate the camera's own motion from the object's; (7) conclude with the "
        "correct option, described from the camera's viewpoint.\n"
    )
    return _video_header(clip, shown, images, question, options, letter) + steps + _COMMON_RULES.format(
        n=len(images), tag=OUTPUT_IMAGE, gold=answer_option(options, letter))


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


# --- reply parsing -------------------------------------------------------------------------------


def _cot_from_reply(reply: str, num_images: int, gold: str) -> tuple[str | None, str]:
    """(text_output, "") for a valid reply, else (None, reason). Accepts <thinking> (asked for) and
    <think>, and normalises the layout to the training format."""
    match = _REPLY.search(reply)
    if match is None:
        return None, "no <thinking>...</thinking><answer>...</answer> in the reply"
    if reply[match.end():].strip() or reply[: match.start()].strip():
        return None, "text outside <thinking>...</thinking><answer>...</answer>"
    cot = assemble_cot(match["think"], match["answer"])
    reason = validate_text_output(cot, num_images, gold)
    return (cot, "") if reason is None else (None, reason)


def _parse_objects(reply: str) -> tuple[tuple[str | None, str | None] | None, str]:
    text = reply.strip()
    if fenced := _FENCE.match(text):
        text = fenced[1]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        return None, f"reply is not JSON ({err})"
    if not isinstance(data, dict) or not {"dynamic_object", "static_object"} <= data.keys():
        return None, "reply lacks dynamic_object / static_object"
    labels = []
    for key in ("dynamic_object", "static_object"):
        value = data[key]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "null", "none")):
            labels.append(None)
        elif isinstance(value, str) and len(value.split()) <= MAX_LABEL_WORDS:
            labels.append(value.strip())
        else:
            return None, f"{key} {value!r} is not a label of at most {MAX_LABEL_WORDS} words"
    return (labels[0], labels[1]), ""


def _describe(err: Exception) -> str:
    status = getattr(err, "status_code", None)
    return f"{type(err).__name__}" + (f" (HTTP {status})" if status else "") + f": {err}"


# --- images and cache ----------------------------------------------------------------------------


class _ImageEncoder:
    """Data URLs of images shrunk to a pixel budget, each encoded once (LRU over paths)."""

    def __init__(self, max_pixels: int):
        self.max_pixels = max_pixels
        self._urls: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()  # the sync facade's loop and a caller's loop may share it

    def data_url(self, path: str | Path) -> str:
        key = str(path)
        with self._lock:
            if key in self._urls:
                self._urls.move_to_end(key)
                return self._urls[key]
        try:
            with Image.open(path) as image:
                fitted = fit_to_pixel_budget(image, self.max_pixels)
        except (OSError, ValueError) as err:
            raise QuestionDropped(f"image {path} cannot be read ({type(err).__name__}: {err})") from None
        buffer = io.BytesIO()
        fitted.save(buffer, format="JPEG", quality=_JPEG_QUALITY)
        url = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        with self._lock:
            self._urls[key] = url
            while len(self._urls) > _ENCODED_IMAGE_CACHE:
                self._urls.popitem(last=False)
        return url


class _ReplyCache:
    """One JSON file per request key; written atomically so concurrent writers never see a torn file."""

    def __init__(self, root: Path):
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        try:
            return json.loads(self._path(key).read_text())["reply"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return None

    def put(self, key: str, reply: str) -> None:
        atomic_write_json(self._path(key), {"reply": reply}, indent=None)

