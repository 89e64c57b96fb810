"""The engine's worker extension: attach the latent machinery and hand latent vectors out; new weights
come in through the `WeightReceiver` half (`weight_receiver.py`). vLLM takes one worker-extension class,
so this one combines the two.

Called through `LLM.collective_rpc` (in-process, multiprocess and Ray executors alike).
"""

from __future__ import annotations

import torch

from fourdthinker.vllm_plugin.weight_receiver import WeightReceiver

SUPPORTED_VLLM = ("0.26.",)


class LatentWorkerExtension(WeightReceiver):
    def latent_attach(self) -> int:
        """V1 runner: connect model and logits processor through one LatentState. V2 runner: check
        that the model brought its LatentModelState (nothing to connect). Returns the latent size."""
        import vllm

        from fourdthinker.tokens import LatentIds
        from fourdthinker.vllm_plugin.logits import LatentLogitsProcessor
        from fourdthinker.vllm_plugin.model import LatentQwen2_5_VLForConditionalGeneration
        from fourdthinker.vllm_plugin.state import LatentState

        if not vllm.__version__.startswith(SUPPORTED_VLLM):
            raise RuntimeError(f"latent decoding reads vLLM {SUPPORTED_VLLM} runner internals; "
                               f"found vLLM {vllm.__version__}")
        runner = self.model_runner
        cfg = runner.vllm_config
        if cfg.parallel_config.pipeline_parallel_size != 1 or cfg.speculative_config is not None:
            raise RuntimeError("latent decoding supports neither pipeline parallelism nor speculative decoding")
        model = runner.get_model()
        if not isinstance(model, LatentQwen2_5_VLForConditionalGeneration):
            raise RuntimeError(f"engine runs {type(model).__name__}; build it with "
                               "fourdthinker.vllm_plugin.engine.llm_kwargs(latent=True)")
        model_state = getattr(runner, "model_state", None)  # V2 runners have one
        if model_state is not None:
            from fourdthinker.vllm_plugin.runner_v2 import latent_model_state_cls

            if not isinstance(model_state, latent_model_state_cls()):
                raise RuntimeError(f"V2 runner with {type(model_state).__name__}, not the latent model state")
            return model_state.latent_size
        processors = [lp for lp in runner.input_batch.logitsprocs.all
                      if isinstance(lp, LatentLogitsProcessor)]
        if len(processors) != 1:
            raise RuntimeError("the latent logits processor is not installed in this engine")
        ids = LatentIds.from_config(cfg.model_config.hf_config)
        state = LatentState(runner, ids.pad, ids.start, ids.end, ids.latent_size)
        model.latent_state = state
        processors[0].attach(state)
        return ids.latent_size

    def _latent_state(self):
        model = self.model_runner.get_model()
        state = getattr(model, "latent_state", None) or getattr(model, "latent_sampling", None)
        if state is None:
            raise RuntimeError("latent decoding is not attached: call latent_attach first")
        return state

    def latent_pop(self, keys: list[str]) -> dict:
        """The vectors fed to each request key, all keys in one blob: `{"keys", "positions" (token
        positions per key), "counts" (vectors per key), "dtype", "hidden", "data"}`, where data is
        the raw bytes of every key's [n, H] vectors back to back, in the engine's dtype (what was
        fed; bf16 on a GPU). One device-to-host copy for the whole batch, not one per request, and
        raw bytes because vLLM's multi-process RPC encodes tensors as nested lists.
        `decode_latents` turns it back into tensors."""
        return encode_latents(self._latent_state().pop(list(keys)))

    def latent_video_features(self, wire: dict) -> dict:
        """The model's merged vision features of one clip (`encode_video_inputs`'s wire form), as
        `encode_tensor` of [tokens, hidden] float32: what the video's placeholders are replaced
        with in the prompt, and the space DIFT pulls latent vectors towards (the latent viewer)."""
        model = self.model_runner.get_model()
        device = self.model_runner.device
        pixels = decode_tensor(wire["pixel_values_videos"]).to(device=device, dtype=model.visual.dtype)
        grid = torch.tensor(wire["video_grid_thw"], dtype=torch.long, device=device)
        with torch.inference_mode():
            features = model.embed_multimodal(pixel_values_videos=pixels, video_grid_thw=grid)
        return encode_tensor(torch.cat(list(features)).float())


def encode_latents(popped: dict[str, tuple[list[int], torch.Tensor | None]]) -> dict:
    """`latent_pop`'s wire format of key -> (positions, [n, H] vectors or None)."""
    parts = [vectors for _, vectors in popped.values() if vectors is not None]
    flat = torch.cat(parts).cpu() if parts else torch.zeros(0, 0)
    return {"keys": list(popped), "positions": [list(pos) for pos, _ in popped.values()],
            "counts": [0 if v is None else int(v.shape[0]) for _, v in popped.values()],
            "dtype": str(flat.dtype).removeprefix("torch."), "hidden": int(flat.shape[-1]),
            "data": flat.contiguous().view(torch.uint8).numpy().tobytes() if parts else b""}


def decode_latents(popped: dict) -> dict[str, tuple[list[int], torch.Tensor | None]]:
    """The inverse of `latent_pop`'s wire format: key -> (positions, [n, H] in the engine's dtype, or None)."""
    flat = torch.zeros(0)
    if popped["data"]:
        raw = torch.frombuffer(bytearray(popped["data"]), dtype=torch.uint8)
        flat = raw.view(getattr(torch, popped["dtype"])).view(-1, popped["hidden"])
    out, row = {}, 0
    for key, pos, n in zip(popped["keys"], popped["positions"], popped["counts"]):
        out[key] = (list(pos), flat[row: row + n] if n else None)
        row += n
    return out


def encode_tensor(tensor: torch.Tensor) -> dict:
    """A CPU copy of `tensor` as raw bytes + dtype + shape (vLLM's multi-process RPC would encode a
    tensor as nested lists)."""
    t = tensor.detach().to("cpu").contiguous()
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
            "data": t.view(torch.uint8).numpy().tobytes() if t.numel() else b""}


def decode_tensor(wire: dict) -> torch.Tensor:
    dtype = getattr(torch, wire["dtype"])
    if not wire["data"]:
        return torch.zeros(wire["shape"], dtype=dtype)
    return torch.frombuffer(bytearray(wire["data"]), dtype=torch.uint8).view(dtype).view(wire["shape"])


def encode_video_inputs(inputs: dict[str, torch.Tensor]) -> dict:
    """`LatentPrompter.video_inputs` in the wire form `latent_video_features` reads."""
    return {"pixel_values_videos": encode_tensor(inputs["pixel_values_videos"]),
            "video_grid_thw": inputs["video_grid_thw"].tolist()}
