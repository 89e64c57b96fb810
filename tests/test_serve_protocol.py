"""Request parsing and media confinement of the Serve app, without Ray or an engine."""

from __future__ import annotations

import asyncio
import base64

import pytest

from serve.media import MediaPolicy, decode_data_url, media_bytes
from serve.protocol import ApiError, MediaRef, parse_chat_request, parse_json

MODEL = "tiny"


def _user(content) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}]}


def _error(body, status: int, needle: str, param: str | None = None) -> ApiError:
    with pytest.raises(ApiError) as err:
        parse_chat_request(body, MODEL, max_n=4)
    assert err.value.status == status and needle in err.value.message, err.value.message
    if param is not None:
        assert err.value.param == param
    return err.value


def test_a_video_question_with_sampling_options_and_the_extension():
    body = _user([{"type": "video_url", "video_url": {"url": "clips/a.mp4"}}, {"type": "text", "text": "Which way?"}])
    body.update(temperature=0.5, top_p=0.9, max_tokens=32, seed=3, n=2, stream=True, ignore_eos=True,
                fourdthinker={"return_latents": True, "force_latent_steps": [0, 4]})
    chat = parse_chat_request(body, MODEL, max_n=4)
    assert (chat.text, chat.temperature, chat.top_p, chat.max_tokens, chat.seed, chat.n, chat.stream) == \
        ("Which way?", 0.5, 0.9, 32, 3, 2, True)
    assert [(m.kind, m.url, m.param) for m in chat.media] == [("video", "clips/a.mp4", "messages[0].content[0]")]
    assert chat.return_latents and not chat.return_token_ids and chat.force_latent_steps == [0, 4]
    assert chat.ignore_eos


def test_frames_as_image_parts_or_a_video_list_keep_their_order():
    chat = parse_chat_request(_user([{"type": "image_url", "image_url": {"url": "f0.png"}},
                                     {"type": "image_url", "image_url": "f1.png"},
                                     {"type": "text", "text": "q"}]), MODEL, 4)
    assert [(m.kind, m.url) for m in chat.media] == [("image", "f0.png"), ("image", "f1.png")]
    chat = parse_chat_request(_user([{"type": "video", "video": ["a.png", "b.png", "c.png"]},
                                     {"type": "text", "text": "q"}]), MODEL, 4)
    assert [m.url for m in chat.media] == ["a.png", "b.png", "c.png"] and chat.media[2].param.endswith("video[2]")
    assert parse_chat_request({**_user("plain text"), "max_completion_tokens": 9}, MODEL, 4).max_tokens == 9


@pytest.mark.parametrize("body, status, needle, param", [
    ({"messages": []}, 400, "model is required", "model"),
    ({"model": "other", "messages": [{"role": "user", "content": "q"}]}, 404, "does not exist", "model"),
    ({"model": MODEL}, 400, "messages is required", "messages"),
    ({"model": MODEL, "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}, 400,
     "role 'system' is not supported", "messages[0].role"),
    (_user([{"type": "audio", "audio": "x"}]), 400, "unsupported content part type 'audio'", "messages[0].content[0]"),
    (_user([{"type": "video_url", "video_url": {"url": "a.mp4"}}, {"type": "video_url", "video_url": {"url": "b"}},
            {"type": "text", "text": "q"}]), 400, "one clip per request", None),
    (_user([{"type": "image_url", "image_url": {}}, {"type": "text", "text": "q"}]), 400, "image_url", None),
    (_user([{"type": "video_url", "video_url": {"url": "a.mp4"}}]), 400, "no text", None),
    ({**_user("q"), "temperature": "hot"}, 400, "temperature must be a number", "temperature"),
    ({**_user("q"), "temperature": 3}, 400, "temperature must be <= 2", "temperature"),
    ({**_user("q"), "top_p": 0}, 400, "top_p must be > 0", "top_p"),
    ({**_user("q"), "n": 5}, 400, "n must be <= 4", "n"),
    ({**_user("q"), "max_tokens": 0}, 400, "max_tokens must be >= 1", "max_tokens"),
    ({**_user("q"), "max_tokens": True}, 400, "max_tokens must be an integer", "max_tokens"),
    ({**_user("q"), "stream": "yes"}, 400, "stream must be true or false", "stream"),
    ({**_user("q"), "fourdthinker": {"eval": "1"}}, 400, "unknown option(s) ['eval']", "fourdthinker"),
    ({**_user("q"), "fourdthinker": {"force_latent_steps": [-1]}}, 400, "non-negative", None),
])
def test_bad_requests_name_the_field(body, status, needle, param):
    _error(body, status, needle, param)


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_a_body_that_is_not_a_json_object_is_refused(raw):
    with pytest.raises(ApiError, match="JSON") as err:
        parse_json(raw)
    assert err.value.status == 400 and err.value.body()["error"]["code"] == "invalid_json"


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "root"
    (root / "clips").mkdir(parents=True)
    (root / "clips" / "a.mp4").write_bytes(b"video")
    (tmp_path / "secret.txt").write_text("do not read")
    (root / "out").symlink_to(tmp_path / "secret.txt")
    (root / "clips" / "in").symlink_to(root / "clips" / "a.mp4")  # a link that stays inside is fine
    (root / "dirlink").symlink_to(tmp_path, target_is_directory=True)
    return root


def _resolve(policy: MediaPolicy, url: str):
    return asyncio.run(media_bytes(MediaRef("video", url, "p"), policy, 1.0))


@pytest.mark.parametrize("url", ["clips/a.mp4", "./clips/../clips/a.mp4", "clips/in"])
def test_paths_inside_the_media_root_resolve(tree, url):
    policy = MediaPolicy.from_config(str(tree), [], 1 << 20)
    assert _resolve(policy, url) == (tree / "clips" / "a.mp4").resolve()


def test_absolute_and_file_urls_inside_the_root_resolve(tree):
    policy = MediaPolicy.from_config(str(tree), [], 1 << 20)
    target = (tree / "clips" / "a.mp4").resolve()
    assert _resolve(policy, str(target)) == target
    assert _resolve(policy, f"file://{target}") == target


@pytest.mark.parametrize("url", ["../secret.txt", "clips/../../secret.txt", "/etc/passwd", "out", "dirlink/secret.txt",
                                 "file:///etc/passwd", "file://localhost/../secret.txt"])
def test_paths_that_leave_the_media_root_are_refused(tree, url):
    policy = MediaPolicy.from_config(str(tree), [], 1 << 20)
    with pytest.raises(ApiError, match="outside the media root") as err:
        _resolve(policy, url)
    assert err.value.status == 403


def test_without_a_media_root_no_local_path_is_read(tree):
    policy = MediaPolicy.from_config("", [], 1 << 20)
    with pytest.raises(ApiError, match="local media paths are disabled"):
        _resolve(policy, "clips/a.mp4")


def test_remote_media_needs_an_allowed_host(tree):
    policy = MediaPolicy.from_config(str(tree), ["media.example.org"], 1 << 20)
    with pytest.raises(ApiError, match="evil.example.com.* is not allowed") as err:
        _resolve(policy, "https://evil.example.com/a.mp4")
    assert err.value.status == 403
    assert policy.check_remote(MediaRef("video", "https://MEDIA.example.org/a.mp4", "p")) == "media.example.org"
    with pytest.raises(ApiError, match="unsupported URL scheme 'ftp'"):
        _resolve(policy, "ftp://media.example.org/a.mp4")


def test_data_urls_must_be_valid_base64_under_the_size_cap():
    payload = base64.b64encode(b"0123456789").decode()
    assert decode_data_url(MediaRef("image", f"data:image/png;base64,{payload}", "p"), 100) == b"0123456789"
    with pytest.raises(ApiError, match="corrupt base64"):
        decode_data_url(MediaRef("image", "data:image/png;base64,ab$c", "p"), 100)
    with pytest.raises(ApiError, match="data:<mime>;base64"):
        decode_data_url(MediaRef("image", "data:image/png,rawtext", "p"), 100)
    with pytest.raises(ApiError, match="larger than 4 bytes") as err:
        decode_data_url(MediaRef("image", f"data:image/png;base64,{payload}", "p"), 4)
    assert err.value.status == 413
