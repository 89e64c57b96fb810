"""The Ray Serve application: an OpenAI-compatible chat endpoint on a latent-decoding vLLM engine.

    serve run serve.app:app model_dir=DIR [config=configs/tiny/serve.yaml] [key=value ...]
    serve deploy serve/config.yaml

Each replica owns one `AsyncLatentGenerator` (vLLM's async engine with the project's plugin):
requests are not serialised, the engine batches all in flight. Routes: POST /v1/chat/completions,
GET /v1/models, GET /healthz. See serve/protocol.py for what a request may carry and serve/media.py
for the media rules.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from fourdthinker.config import ConfigError, from_dict, load_config, to_dict
from fourdthinker.generation import GenerationRequest, SamplingConfig
from fourdthinker.prompts import question_prompt
from fourdthinker.reply import ReplyStream, latent_blocks, render_reply
from fourdthinker.serve_config import ServeConfig
from serve import media
from serve.protocol import (
    DONE,
    ApiError,
    ChatRequest,
    bad,
    chat_response,
    chunk,
    completion_id,
    parse_chat_request,
    parse_json,
)

logger = logging.getLogger("ray.serve")
api = FastAPI(title="fourdthinker", docs_url=None, redoc_url=None)


@api.exception_handler(ApiError)
async def _api_error(request: Request, err: ApiError):
    return JSONResponse(err.body(), status_code=err.status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, err: StarletteHTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
    return JSONResponse(ApiError(err.status_code, f"{request.method} {request.url.path}: {err.detail}",
                                 code=code).body(), status_code=err.status_code)


@api.exception_handler(Exception)
async def _unexpected(request: Request, err: Exception):
    logger.exception("unhandled error in %s", request.url.path)
    return JSONResponse(ApiError(500, f"internal error: {type(err).__name__}: {err}", code="internal_error").body(),
                        status_code=500)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes is over this server's limit of {limit} bytes",
                       code="request_too_large")
    data = bytearray()
    async for piece in request.stream():
        data += piece
        if len(data) > limit:
            raise ApiError(413, f"request body is over this server's limit of {limit} bytes", code="request_too_large")
    return bytes(data)


@serve.deployment
@serve.ingress(api)
class LatentChatServer:
    async def __init__(self, config: dict[str, Any]):
        from fourdthinker.vllm_plugin.async_generate import AsyncLatentGenerator

        self.cfg = from_dict(ServeConfig, config)
        self.token = None
        if self.cfg.auth_token_env:
            self.token = os.environ.get(self.cfg.auth_token_env)
            if not self.token:
                raise ConfigError(f"auth_token_env: the environment variable {self.cfg.auth_token_env} is "
                                  "empty or unset on the replica; set it (runtime_env env_vars) or clear the key")
        self.media = media.MediaPolicy.from_config(self.cfg.media_root, self.cfg.allowed_media_hosts,
                                                   self.cfg.max_media_bytes)
        self.generator = await AsyncLatentGenerator.from_model_dir(
            self.cfg.model_dir, max_model_len=self.cfg.max_model_len, max_num_seqs=self.cfg.max_num_seqs,
            **self.cfg.engine)
        self.model = self.cfg.served_name
        self.started = time.time()

    async def check_health(self) -> None:
        """Ray Serve's periodic replica health check: an engine whose core died fails it (and the
        replica is replaced)."""
        await self.generator.engine.check_health()

    def __del__(self):
        generator = getattr(self, "generator", None)
        if generator is not None:
            generator.shutdown()

    def _authorize(self, request: Request) -> None:
        if self.token is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), self.token.encode()):
            raise ApiError(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>'",
                           code="invalid_api_key", type="authentication_error")

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self.model, "uptime_s": round(time.time() - self.started, 1)}

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._authorize(request)
        return {"object": "list", "data": [{"id": self.model, "object": "model", "created": int(self.started),
                                            "owned_by": "fourdthinker", "max_model_len": self.cfg.max_model_len}]}

    # -- chat -----------------------------------------------------------------------------------
    async def _frames(self, chat: ChatRequest):
        """The clip of the request: decoded frames, or None for a text-only question."""
        if not chat.media:
            return None
        gen = self.generator
        timeout = self.cfg.request_timeout_s
        if chat.media[0].kind == "video":
            ref = chat.media[0]
            source = await media.media_bytes(ref, self.media, timeout)
            return await asyncio.to_thread(media.decode_video_frames, source, ref, gen.max_frames, gen.max_pixels)
        sources = [await media.media_bytes(ref, self.media, timeout) for ref in chat.media]
        return await asyncio.to_thread(lambda: [media.open_image(s, r) for s, r in zip(sources, chat.media)])

    async def _prepare(self, chat: ChatRequest):
        frames = await self._frames(chat)
        text = question_prompt(chat.text) if self.cfg.add_format_suffix else chat.text
        req = GenerationRequest(text, frames=frames, force_latent_steps=chat.force_latent_steps)
        prep = await self.generator.prepare_async(req)
        if prep.prompt is None:
            raise bad(f"messages: {prep.error}", "messages", "prompt_too_long" if "context" in prep.error else
                      "invalid_media")
        room = self.generator.max_model_len - prep.num_prompt_tokens
        if chat.max_tokens is not None and chat.max_tokens > room:
            raise bad(f"max_tokens={chat.max_tokens} does not fit: the prompt has {prep.num_prompt_tokens} tokens "
                      f"and the context is {self.generator.max_model_len}; ask for at most {room}", "max_tokens",
                      "context_length_exceeded")
        sampling = SamplingConfig(n=chat.n, max_tokens=chat.max_tokens or min(self.cfg.default_max_tokens, room),
                                  temperature=chat.temperature, top_p=chat.top_p, seed=chat.seed,
                                  ignore_eos=chat.ignore_eos)
        return req, prep, sampling

    async def _extension(self, chat: ChatRequest, prep, completions: dict[int, Any]) -> list[dict] | None:
        if not (chat.return_latents or chat.return_token_ids):
            return None
        from fourdthinker.latent_viewer import block_summaries

        features = grid = None
        ids = self.generator.latent_ids
        if chat.return_latents and prep.frames and any(c.latents is not None for c in completions.values()):
            features, grid = await self.generator.video_features(prep.frames)
        out = []
        for index, c in sorted(completions.items()):
            entry: dict[str, Any] = {"index": index}
            if chat.return_latents:
                entry["latents"] = block_summaries(latent_blocks(c.token_ids, ids), c.latent_positions, c.latents,
                                                   features, grid, self.cfg.nearest_patches,
                                                   len(prep.frames) if prep.frames else None)
            if chat.return_token_ids:
                entry["token_ids"] = c.token_ids
            out.append(entry)
        return out

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        self._authorize(request)
        chat = parse_chat_request(parse_json(await read_body(request, self.cfg.max_body_bytes)), self.model,
                                  self.cfg.max_n)
        deadline = time.monotonic() + self.cfg.request_timeout_s
        try:
            req, prep, sampling = await asyncio.wait_for(self._prepare(chat), self.cfg.request_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(504, f"preparing the request's media took longer than {self.cfg.request_timeout_s} s",
                           code="timeout") from None
        if chat.stream:
            return StreamingResponse(self._stream(chat, req, prep, sampling, deadline), media_type="text/event-stream")
        try:
            completions = await asyncio.wait_for(self.generator.generate(req, sampling, prep),
                                                 max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise ApiError(504, f"the request took longer than {self.cfg.request_timeout_s} s (request_timeout_s); "
                           "ask for fewer max_tokens", code="timeout") from None
        tokenizer, ids = self.generator.processor.tokenizer, self.generator.latent_ids
        choices = [{"index": j, "content": render_reply(c.token_ids, tokenizer, ids), "finish_reason": c.finish_reason}
                   for j, c in enumerate(completions)]
        extension = await self._extension(chat, prep, dict(enumerate(completions)))
        return chat_response(completion_id(), self.model, choices, prep.num_prompt_tokens,
                             sum(len(c.token_ids) for c in completions), extension)

    async def _stream(self, chat: ChatRequest, req, prep, sampling, deadline: float):
        rid = completion_id()
        tokenizer, ids = self.generator.processor.tokenizer, self.generator.latent_ids
        renderers = [ReplyStream(tokenizer, ids) for _ in range(sampling.n)]
        for j in range(sampling.n):
            yield chunk(rid, self.model, j, {"role": "assistant", "content": ""})
        done: dict[int, Any] = {}
        updates = self.generator.stream(prep, req, sampling)
        try:
            while True:
                try:
                    update = await asyncio.wait_for(updates.__anext__(), max(0.0, deadline - time.monotonic()))
                except StopAsyncIteration:
                    break
                delta = renderers[update.index].update(update.token_ids, final=update.done is not None)
                if delta:
                    yield chunk(rid, self.model, update.index, {"content": delta})
                if update.done is not None:
                    done[update.index] = update.done
                    yield chunk(rid, self.model, update.index, {}, update.done.finish_reason)
        except asyncio.TimeoutError:
            err = ApiError(504, f"the request took longer than {self.cfg.request_timeout_s} s", code="timeout")
            yield f"data: {json.dumps(err.body())}\n\n"
            return
        finally:
            await updates.aclose()
        extension = await self._extension(chat, prep, done)
        if extension is not None:
            yield chunk(rid, self.model, 0, {}, None, {"choices": [], "fourdthinker": {"choices": extension}})
        yield DONE


def deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    """Ray Serve options from the config: autoscaling on ongoing requests, resources per replica."""
    return {
        "autoscaling_config": {"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                               "initial_replicas": max(cfg.min_replicas, 1),
                               "target_ongoing_requests": cfg.target_ongoing_requests},
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "ray_actor_options": {"num_gpus": cfg.num_gpus, "num_cpus": cfg.num_cpus, "resources": dict(cfg.resources)},
        # An engine start takes minutes on a cold GPU node (compile, CUDA graphs).
        "health_check_timeout_s": 120.0,
        "graceful_shutdown_timeout_s": cfg.request_timeout_s,
    }


def build(cfg: ServeConfig):
    return LatentChatServer.options(**deployment_options(cfg)).bind(to_dict(cfg))


def app(args: dict[str, str]):
    """`serve run serve.app:app [config=FILE] key=value ...`: the typed config from the optional YAML
    plus the other arguments as overrides."""
    args = dict(args)
    path = args.pop("config", None)
    from fourdthinker.paths import resolve_config_paths

    cfg = load_config(ServeConfig, path, [f"{k}={v}" for k, v in args.items()])
    resolve_config_paths(cfg, ServeConfig.PATH_KEYS)
    return build(cfg)
