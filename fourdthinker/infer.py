"""One question about one video, answered by a checkpoint: `fourdthinker infer`.

In-process (the synchronous `LatentGenerator`, latent decoding on) or against a running Serve app
(`--url`, through the `openai` client; the video travels inline as a data: URL). Either way the
result is the reply with its latent blocks as markers, the option letter by the DSR rule
(`rewards.extract_choice`), the time taken, and, on request, the latent viewer's nearest patches
per block and a contact sheet PNG.
"""

from __future__ import annotations

import base64
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from fourdthinker.errors import UsageError
from fourdthinker.prompts import OPTION_LETTERS, question_prompt
from fourdthinker.rewards import extract_choice

_LETTERED = re.compile(r"^[A-Z][.)]\s")
DEFAULT_K = 5


@dataclass
class InferResult:
    reply: str  # the model's text, latent blocks shown as ⟨latent n⟩
    answer: str  # the option letter ('' when none)
    seconds: float  # the question's own time (engine start excluded)
    startup_seconds: float = 0.0
    latents: list[dict] = field(default_factory=list)  # per block: position, norms, nearest patches
    contact_sheet: str | None = None

    def as_dict(self) -> dict:
        return dict(vars(self))


def user_text(question: str, options: Sequence[str] | None) -> str:
    """The question with its options: lettered A., B., ... unless they already carry letters."""
    if not options:
        return question
    if len(options) > len(OPTION_LETTERS) and not all(_LETTERED.match(o) for o in options):
        raise UsageError(f"--options: at most {len(OPTION_LETTERS)} options, got {len(options)}")
    if all(_LETTERED.match(o) for o in options):
        return f"{question}\n\n" + "\n".join(options)
    return f"{question}\n\n" + "\n".join(f"{letter}. {o}" for letter, o in zip(OPTION_LETTERS, options))


def _check_video(video: str | Path) -> Path:
    path = Path(video)
    if not path.is_file():
        raise UsageError(f"--video {video}: no such file")
    return path


def _sheet(path: str | Path, frames, summaries: list[dict]) -> str | None:
    """The contact sheet written to `path`; None, with a note on stderr, when the reply has no latent
    block to draw (the answer still stands: not an error)."""
    from fourdthinker.latent_viewer import write_contact_sheet

    if not any(s["nearest"] for s in summaries):
        print(f"--show-latents: the reply has no latent block, so {path} was not written", file=sys.stderr)
        return None
    return str(write_contact_sheet(path, frames, summaries))


def infer_local(model_dir: str | Path, video: str | Path, question: str, options: Sequence[str] | None = None,
                max_tokens: int = 512, show_latents: str | Path | None = None, k: int = DEFAULT_K,
                force_latent_steps: Sequence[int] = (), **engine_kwargs) -> InferResult:
    from fourdthinker.generation import GenerationRequest, SamplingConfig
    from fourdthinker.latent_viewer import block_summaries
    from fourdthinker.reply import latent_blocks, render_reply
    from fourdthinker.vllm_plugin.generate import LatentGenerator

    video = _check_video(video)
    if not Path(model_dir).is_dir():
        raise UsageError(f"--model {model_dir}: not a directory")
    start = time.perf_counter()
    generator = LatentGenerator.from_model_dir(model_dir, **engine_kwargs)
    startup = time.perf_counter() - start
    start = time.perf_counter()
    req = GenerationRequest(question_prompt(user_text(question, options)), video_path=str(video),
                            force_latent_steps=tuple(force_latent_steps))
    (completion,) = generator.generate([req], SamplingConfig(max_tokens=max_tokens, temperature=0.0))[0]
    if completion.error:
        raise UsageError(completion.error)
    reply = render_reply(completion.token_ids, generator.processor.tokenizer, generator.latent_ids)
    seconds = time.perf_counter() - start
    result = InferResult(reply, extract_choice(reply), seconds, startup)
    blocks = latent_blocks(completion.token_ids, generator.latent_ids)
    if show_latents is not None or blocks:
        frames = generator.prepare(req).frames
        features, grid = generator.video_features(frames) if blocks else (None, None)
        result.latents = block_summaries(blocks, completion.latent_positions, completion.latents, features, grid,
                                         k, len(frames))
        if show_latents is not None:
            result.contact_sheet = _sheet(show_latents, frames, result.latents)
    return result


def infer_remote(url: str, video: str | Path, question: str, options: Sequence[str] | None = None,
                 max_tokens: int = 512, show_latents: str | Path | None = None, model: str | None = None,
                 api_key: str | None = None, force_latent_steps: Sequence[int] = ()) -> InferResult:
    from openai import OpenAI

    video = _check_video(video)
    base = url.rstrip("/")
    client = OpenAI(base_url=base if base.endswith("/v1") else f"{base}/v1", api_key=api_key or "none",
                    max_retries=0, timeout=600)
    model = model or client.models.list().data[0].id
    data = base64.b64encode(video.read_bytes()).decode()
    extension = {"return_latents": True}
    if force_latent_steps:
        extension["force_latent_steps"] = list(force_latent_steps)
    start = time.perf_counter()
    reply = client.chat.completions.create(
        model=model, max_tokens=max_tokens, temperature=0.0, extra_body={"fourdthinker": extension},
        messages=[{"role": "user", "content": [{"type": "video_url", "video_url": {"url": f"data:video/mp4;base64,{data}"}},
                                               {"type": "text", "text": user_text(question, options)}]}])
    seconds = time.perf_counter() - start
    text = reply.choices[0].message.content or ""
    latents = (reply.model_dump().get("fourdthinker") or {}).get("choices", [{}])[0].get("latents", [])
    result = InferResult(text, extract_choice(text), seconds, latents=latents)
    if show_latents is not None:
        from fourdthinker.data.video import decode_video

        result.contact_sheet = _sheet(show_latents, decode_video(video), latents)
    return result


def format_result(result: InferResult) -> str:
    lines = [result.reply.strip(), "", f"answer: {result.answer or '(none)'}",
             f"time: {result.seconds:.2f} s" + (f" (engine start {result.startup_seconds:.1f} s)"
                                                if result.startup_seconds else "")]
    for block in result.latents:
        near = ", ".join(f"f{m['frame']} r{m['row']} c{m['col']} cos {m['cosine']:.3f}" for m in block["nearest"])
        lines.append(f"latent {block['block']}: nearest {near or '-'}")
    if result.contact_sheet:
        lines.append(f"contact sheet: {result.contact_sheet}")
    return "\n".join(lines)
