"""The OpenAI chat-completions request and response, as this server reads and writes them.

Parsing is by hand, not by a schema library, so each refusal is a 4xx in OpenAI's error shape
whose message names the offending field and what to send instead. Supported: one user turn whose
content parts are `text`, `image_url` (frames of one clip, in order, one per second), `video_url`
(one video file), or `video` (a list of frame URLs); `temperature`, `top_p`, `max_tokens`
(`max_completion_tokens`), `seed`, `n`, `stream`; vLLM's `ignore_eos`; and this project's
extension `"fourdthinker": {"return_latents", "return_token_ids", "force_latent_steps"}`.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field


class ApiError(Exception):
    """An error returned to the client as `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param, code)


@dataclass
class MediaRef:
    """One media item of the user turn: `url` is a `data:` URL, an http(s) URL or a local path."""

    kind: str  # "image" (one frame) | "video" (a video file)
    url: str
    param: str  # where it was in the request, for error messages


@dataclass
class ChatRequest:
    model: str
    text: str
    media: list[MediaRef]
    stream: bool = False
    n: int = 1
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    return_latents: bool = False
    return_token_ids: bool = False
    force_latent_steps: list[int] = field(default_factory=list)


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise bad(f"the request body is not valid JSON ({err}); send a JSON object", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", code="invalid_json")
    return body


def _number(body: dict, name: str, kind: type, default, low=None, high=None, low_open: bool = False):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise bad(f"{name} must be {'a number' if kind is float else 'an integer'}, got {value!r}", name)
    if low is not None and (value <= low if low_open else value < low):
        raise bad(f"{name} must be {'>' if low_open else '>='} {low}, got {value}", name)
    if high is not None and value > high:
        raise bad(f"{name} must be <= {high}, got {value}", name)
    return kind(value)


def _flag(body: dict, name: str, param: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise bad(f"{param} must be true or false, got {value!r}", param)
    return value


def _url_of(part: dict, key: str, param: str) -> str:
    value = part.get(key)
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise bad(f"{param}.{key}: expected {{\"url\": \"...\"}} with a data: URL, an http(s) URL or a path "
                  "under the server's media root", param)
    return url


def _content(message: dict, where: str) -> tuple[str, list[MediaRef]]:
    content = message.get("content")
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise bad(f"{where}.content must be a string or a list of content parts", f"{where}.content")
    texts, media = [], []
    for i, part in enumerate(content):
        param = f"{where}.content[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise bad(f"{param}.text must be a string", param)
            texts.append(part["text"])
        elif kind == "image_url":
            media.append(MediaRef("image", _url_of(part, "image_url", param), param))
        elif kind == "video_url":
            media.append(MediaRef("video", _url_of(part, "video_url", param), param))
        elif kind == "video":  # a clip given as its frames (Qwen's chat format: a list of image URLs)
            frames = part.get("video")
            if not isinstance(frames, list) or not frames or not all(isinstance(f, str) and f for f in frames):
                raise bad(f"{param}.video must be a non-empty list of frame image URLs", param)
            media.extend(MediaRef("image", f, f"{param}.video[{j}]") for j, f in enumerate(frames))
        else:
            raise bad(f"{param}: unsupported content part type {kind!r}; use text, image_url, video_url "
                      "or video", param)
    return "\n".join(texts), media


def parse_chat_request(body: dict, served_model: str, max_n: int) -> ChatRequest:
    """A `ChatRequest` from the decoded JSON body, or an `ApiError` naming what is wrong."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model is required: the id from GET /v1/models", "model", "missing_required_parameter")
    if model != served_model:
        raise ApiError(404, f"model {model!r} does not exist; this server hosts {served_model!r}",
                       "model", "model_not_found")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages is required: a non-empty list of chat messages", "messages",
                  "missing_required_parameter")
    user = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role != "user":
            raise bad(f"messages[{i}]: role {role!r} is not supported; send one user message (the model was "
                      "trained on single-turn questions with the default system prompt)", f"messages[{i}].role")
        user.append(i)
    if len(user) != 1:
        raise bad(f"send exactly one user message, got {len(user)}", "messages")
    text, media = _content(messages[0], "messages[0]")
    videos = [m for m in media if m.kind == "video"]
    if len(videos) > 1 or (videos and len(media) > 1):
        raise bad("one clip per request: either one video_url or a list of frame images, not both or several",
                  "messages[0].content")
    if not text.strip():
        raise bad("messages[0] has no text: ask a question", "messages[0].content")
    stream = _flag(body, "stream", "stream")
    ext = body.get("fourdthinker") or {}
    if not isinstance(ext, dict):
        raise bad("fourdthinker must be an object", "fourdthinker")
    unknown = sorted(set(ext) - {"return_latents", "return_token_ids", "force_latent_steps"})
    if unknown:
        raise bad(f"fourdthinker: unknown option(s) {unknown}", "fourdthinker")
    steps = ext.get("force_latent_steps", [])
    if not isinstance(steps, list) or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 1 << 20
                                              for s in steps):
        raise bad("fourdthinker.force_latent_steps must be a list of non-negative output step numbers",
                  "fourdthinker.force_latent_steps")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    return ChatRequest(
        model=model, text=text, media=media, stream=stream,
        n=_number(body, "n", int, 1, 1, max_n),
        max_tokens=None if max_tokens is None else _number({"max_tokens": max_tokens}, "max_tokens", int, None, 1),
        temperature=_number(body, "temperature", float, 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", float, 1.0, 0.0, 1.0, low_open=True),
        seed=_number(body, "seed", int, None),
        ignore_eos=_flag(body, "ignore_eos", "ignore_eos"),
        return_latents=_flag(ext, "return_latents", "fourdthinker.return_latents"),
        return_token_ids=_flag(ext, "return_token_ids", "fourdthinker.return_token_ids"),
        force_latent_steps=list(steps))


# -- responses ---------------------------------------------------------------------------------
def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def chat_response(rid: str, model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int,
                  extension: list[dict] | None) -> dict:
    body = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": c["index"], "message": {"role": "assistant", "content": c["content"]},
                         "logprobs": None, "finish_reason": c["finish_reason"]} for c in choices],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}
    if extension is not None:
        body["fourdthinker"] = {"choices": extension}
    return body


def chunk(rid: str, model: str, index: int, delta: dict, finish_reason: str | None = None,
          extra: dict | None = None) -> str:
    body = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    if extra:
        body.update(extra)
    return f"data: {json.dumps(body)}\n\n"


DONE = "data: [DONE]\n\n"
