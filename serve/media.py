"""Media of a request, loaded under the server's rules.

Nothing a request sends can make the server read a file outside its media root: a local path is
joined to the root, fully resolved (`..` collapsed, every symlink followed) and must still lie
inside the resolved root; with no media root configured, local paths are refused outright.
`file:` URLs are local paths. Remote `http(s)` media is refused unless its host is on the
configured allow list (and then fetched without following redirects, size-capped). `data:` URLs
must be base64. Bytes are only ever decoded as images or videos (PIL, PyAV), never evaluated.
"""

from __future__ import annotations

import base64
import binascii
import io
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from serve.protocol import ApiError, MediaRef, bad


@dataclass
class MediaPolicy:
    root: Path | None  # resolved media root, or None (no local paths)
    allowed_hosts: frozenset[str]
    max_bytes: int

    @classmethod
    def from_config(cls, media_root: str, allowed_hosts, max_bytes: int) -> "MediaPolicy":
        root = Path(media_root).resolve(strict=True) if media_root else None
        return cls(root, frozenset(h.lower() for h in allowed_hosts), max_bytes)

    def local_path(self, ref: MediaRef) -> Path:
        """The file a local path (or `file:` URL) names, confined to the media root."""
        raw = ref.url
        if raw.startswith("file:"):
            raw = unquote(urlparse(raw).path)
        if self.root is None:
            raise ApiError(403, f"{ref.param}: local media paths are disabled on this server (no media_root); "
                           "send the media inline as a data: URL", ref.param, "media_path_forbidden")
        if "\x00" in raw:
            raise bad(f"{ref.param}: the path contains a NUL byte", ref.param, "invalid_media_path")
        path = (self.root / raw).resolve()  # an absolute raw path replaces the root, then must fall inside it
        if not path.is_relative_to(self.root):
            raise ApiError(403, f"{ref.param}: {ref.url!r} resolves outside the media root; paths must stay "
                           "inside it (no '..', absolute paths elsewhere or symlinks out)", ref.param,
                           "media_path_forbidden")
        if not path.is_file():
            raise bad(f"{ref.param}: {ref.url!r} is not a file under the media root", ref.param, "media_not_found")
        if path.stat().st_size > self.max_bytes:
            raise ApiError(413, f"{ref.param}: {ref.url!r} is larger than {self.max_bytes} bytes", ref.param,
                           "media_too_large")
        return path

    def check_remote(self, ref: MediaRef) -> str:
        host = (urlparse(ref.url).hostname or "").lower()
        if host not in self.allowed_hosts:
            raise ApiError(403, f"{ref.param}: remote media from {host or ref.url!r} is not allowed on this server; "
                           "send it as a data: URL" + (f" or from {sorted(self.allowed_hosts)}"
                                                       if self.allowed_hosts else ""),
                           ref.param, "remote_media_forbidden")
        return host


def decode_data_url(ref: MediaRef, max_bytes: int) -> bytes:
    header, sep, payload = ref.url.partition(",")
    if not sep or ";base64" not in header:
        raise bad(f"{ref.param}: a data: URL must be 'data:<mime>;base64,<data>'", ref.param, "invalid_data_url")
    if len(payload) > max_bytes * 4 // 3 + 4:
        raise ApiError(413, f"{ref.param}: inline media larger than {max_bytes} bytes", ref.param, "media_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise bad(f"{ref.param}: corrupt base64 in the data: URL ({err})", ref.param, "invalid_base64") from None


async def fetch_remote(ref: MediaRef, policy: MediaPolicy, timeout_s: float) -> bytes:
    import httpx

    policy.check_remote(ref)
    try:
        async with httpx.AsyncClient(follow_redirects=False, timeout=timeout_s) as client:
            async with client.stream("GET", ref.url) as response:
                if response.status_code != 200:
                    raise bad(f"{ref.param}: fetching {ref.url} gave HTTP {response.status_code}", ref.param,
                              "media_fetch_failed")
                data = bytearray()
                async for piece in response.aiter_bytes():
                    data += piece
                    if len(data) > policy.max_bytes:
                        raise ApiError(413, f"{ref.param}: {ref.url} is larger than {policy.max_bytes} bytes",
                                       ref.param, "media_too_large")
                return bytes(data)
    except httpx.HTTPError as err:
        raise bad(f"{ref.param}: cannot fetch {ref.url}: {err}", ref.param, "media_fetch_failed") from None


async def media_bytes(ref: MediaRef, policy: MediaPolicy, timeout_s: float) -> bytes | Path:
    """A media item's bytes (data: and remote URLs) or its confined local path."""
    scheme = urlparse(ref.url).scheme.lower() if ":" in ref.url[:8] else ""
    if scheme == "data":
        return decode_data_url(ref, policy.max_bytes)
    if scheme in ("http", "https"):
        return await fetch_remote(ref, policy, timeout_s)
    if scheme in ("", "file"):
        return policy.local_path(ref)
    raise bad(f"{ref.param}: unsupported URL scheme {scheme!r}; use data:, http(s) or a path", ref.param,
              "invalid_media_url")


def open_image(source: bytes | Path, ref: MediaRef) -> Image.Image:
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise bad(f"{ref.param}: not a readable image ({type(err).__name__}: {err})", ref.param,
                  "invalid_image") from None


def decode_video_frames(source: bytes | Path, ref: MediaRef, max_frames: int, max_pixels: int) -> list[Image.Image]:
    """The clip's frames under the one video policy (`data.video.decode_video`: 1 fps, pixel budget)."""
    from fourdthinker.data.video import VIDEO_FPS, decode_video
    from fourdthinker.errors import UsageError

    try:
        if isinstance(source, Path):
            return decode_video(source, VIDEO_FPS, max_frames, max_pixels)
        with tempfile.NamedTemporaryFile(suffix=".video") as tmp:  # PyAV probes the container from a file
            tmp.write(source)
            tmp.flush()
            return decode_video(tmp.name, VIDEO_FPS, max_frames, max_pixels)
    except UsageError as err:
        reason = getattr(err, "reason", str(err))
        raise bad(f"{ref.param}: cannot decode the video ({reason})", ref.param, "invalid_video") from None
