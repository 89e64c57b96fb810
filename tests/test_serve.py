"""The Serve app over real HTTP on 127.0.0.1: one Ray Serve app (tiny model, latent decoding on, auth
on, a media root) serves the whole module; clients are the `openai` package and httpx."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import socket
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
TOKEN_ENV = "FOURDTHINKER_TEST_SERVE_TOKEN"
TOKEN = "s3cret-token"
MAX_NEW = 16
FORCE = [1, 8]
QUESTION = "Which way does the camera pan?"
BODY_LIMIT = 1 << 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def media_root(tmp_path_factory):
    from fourdthinker.data.synth.clip import encode_mp4

    base = tmp_path_factory.mktemp("media")
    root = base / "root"
    rng = np.random.default_rng(3)
    encode_mp4(root / "clip.mp4", rng.integers(0, 255, (12, 56, 84, 3), dtype=np.uint8), fps=4)
    (base / "secret.mp4").write_bytes((root / "clip.mp4").read_bytes())  # outside the root
    (root / "link.mp4").symlink_to(base / "secret.mp4")
    return root


@pytest.fixture(scope="module")
def server(tiny_model_dir, media_root):
    import ray
    from ray import serve

    from fourdthinker.config import load_config
    from fourdthinker.serve_config import ServeConfig
    from serve.app import build

    os.environ[TOKEN_ENV] = TOKEN
    port = _free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), TOKEN_ENV: TOKEN}})
    cfg = load_config(ServeConfig, ROOT / "configs/tiny/serve.yaml",
                      [f"model_dir={tiny_model_dir}", f"media_root={media_root}", f"auth_token_env={TOKEN_ENV}",
                       f"max_body_bytes={BODY_LIMIT}", "max_model_len=1024", "nearest_patches=3"])
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build(cfg), name="fourdthinker-test", route_prefix="/")
        yield f"http://127.0.0.1:{port}", cfg
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server[0]}/v1", api_key=TOKEN, timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from fourdthinker.tokens import LatentIds

    processor = AutoProcessor.from_pretrained(tiny_model_dir, local_files_only=True)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, local_files_only=True).eval()
    return processor, model, LatentIds.from_config(model.config)


def _video_message(url: str, question: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                         {"type": "text", "text": question}]}]


def _greedy(**extra) -> dict:
    return dict(max_tokens=MAX_NEW, temperature=0.0, extra_body={"ignore_eos": True, **extra})


def _model(server) -> str:
    return server[1].served_name


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [_model(server)]
    assert httpx.get(f"{server[0]}/healthz").json()["status"] == "ok"


def test_a_greedy_video_answer_equals_the_hf_reference_with_latent_blocks(server, client, hf, media_root):
    """Latent decoding is really on through Serve: the tokens, the rendered markers and the latent
    viewer's patches all equal what the HF reference computes for the same prompt."""
    from fourdthinker.data.collate import prompt_batch
    from fourdthinker.data.video import decode_video
    from fourdthinker.latent_viewer import VideoGrid, nearest_patches
    from fourdthinker.model import generate_latent
    from fourdthinker.prompts import question_prompt
    from fourdthinker.reply import render_reply

    processor, model, ids = hf
    reply = client.chat.completions.create(
        model=_model(server), messages=_video_message("clip.mp4"),
        **_greedy(fourdthinker={"force_latent_steps": FORCE, "return_latents": True, "return_token_ids": True}))
    frames = decode_video(media_root / "clip.mp4")
    inputs = prompt_batch(processor, [(question_prompt(QUESTION), frames)])
    ref = generate_latent(model, inputs, ids, MAX_NEW, forced_latent_steps=[FORCE], eos_token_ids=[])
    ext = reply.model_dump()["fourdthinker"]["choices"][0]
    assert ext["token_ids"] == ref.sequences[0]
    content = reply.choices[0].message.content
    assert content == render_reply(ref.sequences[0], processor.tokenizer, ids)
    assert "⟨latent 1⟩" in content and "⟨latent 2⟩" in content and "<|latent" not in content
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == MAX_NEW

    blocks = ext["latents"]
    assert [b["block"] for b in blocks] == [1, 2] and [b["start"] for b in blocks] == FORCE
    ref_vectors = ref.latents[0].view(2, ids.latent_size, -1)
    with torch.no_grad():
        features = torch.cat(model.model.get_video_features(
            inputs["pixel_values_videos"], inputs["video_grid_thw"]).pooler_output)
    grid = VideoGrid.from_grid_thw(inputs["video_grid_thw"][0].tolist(), processor.video_processor)
    for block, vectors in zip(blocks, ref_vectors):
        np.testing.assert_allclose(block["norms"], vectors.norm(dim=-1).numpy(), rtol=1e-3)
        expected = nearest_patches(vectors, features, grid, 3, len(frames))
        assert [(m["frame"], m["row"], m["col"]) for m in block["nearest"]] == \
            [(m.frame, m.row, m.col) for m in expected]
        np.testing.assert_allclose([m["cosine"] for m in block["nearest"]], [m.cosine for m in expected], atol=1e-3)


def test_streaming_gives_the_same_text_as_the_plain_reply(server, client, media_root):
    data = base64.b64encode((media_root / "clip.mp4").read_bytes()).decode()
    messages = _video_message(f"data:video/mp4;base64,{data}")
    plain = client.chat.completions.create(model=_model(server), messages=messages,
                                           **_greedy(fourdthinker={"force_latent_steps": FORCE}))
    pieces, finish = [], None
    for part in client.chat.completions.create(model=_model(server), messages=messages, stream=True,
                                               **_greedy(fourdthinker={"force_latent_steps": FORCE})):
        for choice in part.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert len([p for p in pieces if p]) >= 2  # really streamed, not one blob
    assert "".join(pieces) == plain.choices[0].message.content
    assert finish == "length" and "⟨latent 2⟩" in plain.choices[0].message.content


def test_the_stream_is_sse_chunks_then_the_extension_then_done(server):
    body = {"model": _model(server), "messages": _video_message("clip.mp4"), "stream": True, "max_tokens": MAX_NEW,
            "temperature": 0.0, "ignore_eos": True,
            "fourdthinker": {"force_latent_steps": FORCE, "return_latents": True}}
    with httpx.stream("POST", f"{server[0]}/v1/chat/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {TOKEN}"}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert [b["block"] for b in chunks[-1]["fourdthinker"]["choices"][0]["latents"]] == [1, 2]


def test_streaming_n_samples_interleaves_choices_that_equal_the_plain_ones(server, client):
    kw = dict(model=_model(server), messages=_video_message("clip.mp4"), max_tokens=10, temperature=1.0, seed=11, n=2)
    plain = client.chat.completions.create(**kw)
    pieces: dict[int, list[str]] = {0: [], 1: []}
    for part in client.chat.completions.create(stream=True, **kw):
        for choice in part.choices:
            pieces[choice.index].append(choice.delta.content or "")
    assert ["".join(pieces[j]) for j in (0, 1)] == [c.message.content for c in plain.choices]


def test_frames_as_images_n_and_seed(server, client, media_root):
    from PIL import Image

    rng = np.random.default_rng(0)
    parts = []
    for _ in range(3):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(buf, format="PNG")
        parts.append({"type": "image_url",
                      "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}})
    messages = [{"role": "user", "content": [*parts, {"type": "text", "text": "What moves?"}]}]
    kw = dict(model=_model(server), messages=messages, max_tokens=8, temperature=1.0, seed=7, n=3)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # seeded
    assert a.usage.prompt_tokens > 3 * 4  # the frames' video tokens are in the prompt


def test_concurrent_requests_are_batched(server, media_root):
    from openai import AsyncOpenAI

    aclient = AsyncOpenAI(base_url=f"{server[0]}/v1", api_key=TOKEN, timeout=300, max_retries=0)
    kw = dict(model=_model(server), messages=_video_message("clip.mp4"), max_tokens=16, temperature=0.0,
              extra_body={"ignore_eos": True})

    async def both():
        start = time.perf_counter()
        together = await asyncio.gather(*[aclient.chat.completions.create(**kw) for _ in range(32)])
        concurrent_s = time.perf_counter() - start
        start = time.perf_counter()
        one_by_one = [await aclient.chat.completions.create(**kw) for _ in range(32)]
        return together, concurrent_s, one_by_one, time.perf_counter() - start

    together, concurrent_s, one_by_one, sequential_s = asyncio.run(both())
    assert len(together) == 32 and all(r.usage.completion_tokens == 16 for r in together)
    assert {r.choices[0].message.content for r in together} == {one_by_one[0].choices[0].message.content}
    assert concurrent_s < sequential_s, (concurrent_s, sequential_s)


def _post(server, body=None, raw: bytes | None = None, token: str | None = TOKEN) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(f"{server[0]}/v1/chat/completions", content=content, headers=headers, timeout=120)


def _ok_body(server) -> dict:
    return {"model": _model(server), "max_tokens": 2, "messages": [{"role": "user", "content": "Hi?"}]}


def _bad_cases(server):
    model = _model(server)
    video = lambda url: {"model": model, "messages": _video_message(url)}  # noqa: E731
    return [
        ("malformed JSON", None, b'{"model": ', TOKEN, 400, "not valid JSON"),
        ("unknown model", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, None, TOKEN, 404,
         "does not exist"),
        ("missing messages", {"model": model}, None, TOKEN, 400, "messages is required"),
        ("body over the limit", {"model": model, "messages": [{"role": "user", "content": "x" * (BODY_LIMIT + 10)}]},
         None, TOKEN, 413, "limit"),
        ("parent path", video("../secret.mp4"), None, TOKEN, 403, "outside the media root"),
        ("absolute path", video(str(Path("/etc/hostname"))), None, TOKEN, 403, "outside the media root"),
        ("symlink out", video("link.mp4"), None, TOKEN, 403, "outside the media root"),
        ("remote URL", video("https://example.com/a.mp4"), None, TOKEN, 403, "not allowed"),
        ("corrupt base64", video("data:video/mp4;base64,@@@notbase64"), None, TOKEN, 400, "base64"),
        ("undecodable video", video("data:video/mp4;base64," + base64.b64encode(b"not a video").decode()), None,
         TOKEN, 400, "cannot decode the video"),
        ("missing token", {"model": model, "messages": [{"role": "user", "content": "hi"}]}, None, None, 401,
         "bearer token"),
        ("wrong token", {"model": model, "messages": [{"role": "user", "content": "hi"}]}, None, "nope", 401,
         "bearer token"),
        ("max_tokens beyond the context", {"model": model, "max_tokens": 5000,
                                           "messages": [{"role": "user", "content": "hi"}]}, None, TOKEN, 400,
         "max_tokens=5000 does not fit"),
    ]


def test_bad_requests_get_a_named_4xx_and_the_server_keeps_serving(server):
    for name, body, raw, token, status, needle in _bad_cases(server):
        response = _post(server, body, raw, token)
        assert response.status_code == status, (name, response.text)
        error = response.json()["error"]
        assert needle in error["message"], (name, error)
        assert set(error) == {"message", "type", "param", "code"}
        good = _post(server, _ok_body(server))
        assert good.status_code == 200, (name, good.text)
        assert good.json()["usage"]["completion_tokens"] >= 1
    assert httpx.get(f"{server[0]}/v1/nope").json()["error"]["code"] == "not_found"


def test_infer_with_url_asks_the_running_server(server, media_root, tmp_path, capsys, monkeypatch):
    from PIL import Image

    from fourdthinker.cli import main

    monkeypatch.setenv("FOURDTHINKER_API_TOKEN", TOKEN)
    png = tmp_path / "sheet.png"
    assert main(["infer", "--url", server[0], "--video", str(media_root / "clip.mp4"), "--question", QUESTION,
                 "--options", "left", "right", "--max-tokens", str(MAX_NEW), "--force-latent-steps", *map(str, FORCE),
                 "--show-latents", str(png), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "⟨latent 2⟩" in out["reply"] and [b["block"] for b in out["latents"]] == [1, 2]
    assert Image.open(png).size[1] > 2 * 224  # two panels of enlarged frames
