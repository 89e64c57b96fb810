"""Latent-aware generation on vLLM's asynchronous engine (`AsyncLLM`): the serving replica's engine.

Every sample is its own engine request (n=1, keyed by a `latent_key`), submitted as soon as it
arrives: the engine batches whatever is in flight (continuous batching), so concurrent callers
share its steps and nothing here serialises them. Prompts, sampling parameters and completions
come from the same `LatentPrompter` the synchronous `LatentGenerator` uses; only the engine calls
differ. A sample's latent vectors are popped when it finishes, or when its caller goes away
(cancellation aborts the engine request, and the popped vectors are dropped), so none leak.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from fourdthinker.data.video import MAX_FRAMES, MAX_PIXELS
from fourdthinker.generation import Completion, GenerationRequest, SamplingConfig
from fourdthinker.tokens import LatentIds
from fourdthinker.vllm_plugin.generate import LatentPrompter, Prepared


@dataclass
class SampleUpdate:
    """A sample in flight: its token ids so far; `done` is set on the last update."""

    index: int
    token_ids: list[int]
    done: Completion | None = None


class AsyncLatentGenerator(LatentPrompter):
    def __init__(self, engine, processor, latent_ids: LatentIds, max_frames: int = MAX_FRAMES,
                 max_pixels: int = MAX_PIXELS):
        super().__init__(processor, latent_ids, engine.model_config.max_model_len, max_frames, max_pixels)
        self.engine = engine

    @classmethod
    async def from_model_dir(cls, model_dir: str | Path, **engine_kwargs) -> "AsyncLatentGenerator":
        """Start an `AsyncLLM` with the latent plugin (`engine.llm_kwargs`) and attach latent
        decoding in its workers, as `make_llm` does for the synchronous engine."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from fourdthinker.vllm_plugin.engine import llm_kwargs

        processor, ids = cls.load_processor(model_dir)
        kwargs = llm_kwargs(model_dir, latent=True, **engine_kwargs)
        kwargs.setdefault("disable_log_stats", True)
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        try:
            await engine.collective_rpc("latent_attach")
        except BaseException:
            engine.shutdown()
            raise
        return cls(engine, processor, ids)

    def shutdown(self) -> None:
        self.engine.shutdown()

    async def prepare_async(self, req: GenerationRequest) -> Prepared:
        """`prepare` off the event loop (video decoding and tokenising block)."""
        return await asyncio.to_thread(self.prepare, req)

    async def pop_latents(self, keys: list[str]) -> dict[str, tuple[list[int], torch.Tensor | None]]:
        from fourdthinker.vllm_plugin.extension import decode_latents

        if not keys:
            return {}
        return decode_latents((await self.engine.collective_rpc("latent_pop", args=(list(keys),)))[0])

    async def video_features(self, frames: Sequence[Image.Image]):
        """The engine's merged vision features of a clip ([tokens, hidden], float32) and their
        layout (`latent_viewer.VideoGrid`)."""
        from fourdthinker.vllm_plugin.extension import decode_tensor, encode_video_inputs

        inputs = await asyncio.to_thread(self.video_inputs, frames)
        wire = await self.engine.collective_rpc("latent_video_features", args=(encode_video_inputs(inputs),))
        return decode_tensor(wire[0]), self.video_grid(inputs)

    async def stream_sample(self, prep: Prepared, req: GenerationRequest, sampling: SamplingConfig,
                            index: int = 0) -> AsyncIterator[SampleUpdate]:
        """One sample of a prepared request: an update per engine step, the last with its Completion."""
        if prep.prompt is None:
            yield SampleUpdate(index, [], self.failed(prep))
            return
        key = uuid.uuid4().hex
        params = self.sampling_params(prep, req, sampling, key, seed_offset=index + 1)
        final = None
        try:
            async for out in self.engine.generate(prep.prompt, params, request_id=key):
                if out.finished:
                    final = out
                    break
                yield SampleUpdate(index, list(out.outputs[0].token_ids))
        finally:
            # Finished or abandoned (an exception, a cancelled caller): the vectors were kept for
            # this key until popped, so pop them either way.
            latents = await asyncio.shield(self.pop_latents([key]))
        if final is not None:
            yield SampleUpdate(index, list(final.outputs[0].token_ids),
                               self.completion(final, latents.get(key, ([], None))))

    async def stream(self, prep: Prepared, req: GenerationRequest,
                     sampling: SamplingConfig) -> AsyncIterator[SampleUpdate]:
        """All `sampling.n` samples of a request, their updates interleaved as they come."""
        if sampling.n == 1:
            async for update in self.stream_sample(prep, req, sampling, 0):
                yield update
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(j: int) -> None:
            try:
                async for update in self.stream_sample(prep, req, sampling, j):
                    await queue.put(update)
            except BaseException as err:  # noqa: BLE001 - handed to the consumer below
                await queue.put(err)
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(pump(j)) for j in range(sampling.n)]
        try:
            running = len(tasks)
            while running:
                item = await queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def generate(self, req: GenerationRequest, sampling: SamplingConfig,
                       prep: Prepared | None = None) -> list[Completion]:
        """The `sampling.n` completions of one request (a failed request: n error completions)."""
        prep = prep if prep is not None else await self.prepare_async(req)
        done: dict[int, Completion] = {}
        async for update in self.stream(prep, req, sampling):
            if update.done is not None:
                done[update.index] = update.done
        return [done[j] for j in range(sampling.n)]
