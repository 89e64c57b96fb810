"""Worker extension: attach the latent machinery, hand latent vectors out, take new weights.

Called through `LLM.collective_rpc` (in-process, multiprocess and Ray executors alike).
"""

from __future__ import annotations

import os
import time

import torch

SUPPORTED_VLLM = ("0.26.",)


class LatentWorkerExtension:
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

    # -- weights: checkpoint-format buckets, loaded in place or through vLLM's layerwise reload ---
    # Kernels may repack weights after loading (the CPU backend does, for oneDNN; quantized kernels
    # do), so there a plain load_weights on a running model can miss: vLLM's layerwise reload
    # restores the checkpoint layout first and re-processes each layer once its weights are in, as
    # its own NCCL weight-transfer engine does. An unquantized model on CUDA keeps the checkpoint
    # layout (processing after loading is a no-op there), and its weight loaders copy into the
    # running parameters in place (CUDA graphs keep their addresses): the layerwise machinery's
    # per-layer wrapping, second copy and finalize are skipped.
    def _loads_in_place(self) -> bool:
        from vllm.platforms import current_platform

        if os.environ.get("FOURDTHINKER_LAYERWISE_RELOAD") == "1":  # force the general path
            return False
        return current_platform.is_cuda() and self.model_runner.vllm_config.model_config.quantization is None

    def _bucket_loader(self):
        """`load(layout, flat)`: the model's loaders, replayed as recorded copies where they load in
        place (`fourdthinker.weight_replay`)."""
        from fourdthinker.weight_replay import ReplayingLoader

        loader = getattr(self, "_replaying_loader", None)
        if loader is None:
            loader = self._replaying_loader = ReplayingLoader(self.model_runner.get_model())
        # FOURDTHINKER_WEIGHT_REPLAY=0 keeps the loaders on every sync (to measure what replay saves)
        loader.enabled = self._loads_in_place() and os.environ.get("FOURDTHINKER_WEIGHT_REPLAY") != "0"
        return loader

    def bucket_update_begin(self, names: list[str] | None = None) -> float:
        """Start a reload of the sub-models that own `names` (checkpoint names; None: the whole
        model). A frozen vision tower is never sent, and so never torn down and rebuilt either.
        Returns the seconds it took in this worker."""
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        start = time.perf_counter()
        self._reloading = [] if self._loads_in_place() else self._modules_owning(names)
        for module in self._reloading:
            initialize_layerwise_reload(module)
        return time.perf_counter() - start

    def _modules_owning(self, names: list[str] | None) -> list[torch.nn.Module]:
        model = self.model_runner.get_model()
        mapper = getattr(model, "hf_to_vllm_mapper", None)
        if names is None or mapper is None:
            return [model]
        roots = sorted({name.split(".", 1)[0] for name in mapper.apply_list(list(names))})
        children = dict(model.named_children())
        if not roots or any(root not in children for root in roots):
            return [model]
        return [children[root] for root in roots]

    def load_weight_bucket(self, names, shapes, dtypes, data: bytes) -> int:
        """Load one `WeightBucket` (in its wire form): one buffer copy, then the model's own loader."""
        from fourdthinker.weights import WeightBucket

        bucket = WeightBucket.from_wire(names, shapes, dtypes, data)
        self._bucket_loader()(bucket.layout, bucket.flat.to(self.model_runner.device))
        return len(names)

    def load_weight_bucket_ipc(self, layout, handle: bytes) -> int:
        """Load one bucket that lives in another process's GPU memory (`CudaIpcWeightSync`)."""
        from fourdthinker.weight_sync import open_ipc_bucket
        from fourdthinker.weights import BucketLayout

        flat = open_ipc_bucket(handle, self.model_runner.device)
        self._bucket_loader()(BucketLayout.from_wire(*layout), flat)
        torch.cuda.synchronize(self.model_runner.device)  # copied out before the sender frees it
        return flat.numel()

    # -- weights over a broadcast group of their own (`CollectiveWeightSync`) ---------------------
    def weight_group_join(self, host: str, port: int, rank_offset: int, world_size: int, backend: str) -> int:
        from fourdthinker.weight_sync import open_group

        self._weight_group = None  # a group from before a restart of the learner side is gone
        rank = rank_offset + self.rank
        self._weight_group = open_group(host, port, rank, world_size, backend)
        return rank

    def weight_group_receive(self, layouts) -> dict[str, float]:
        """Receive every bucket of one sync (call between bucket_update_begin and _end).
        Returns bytes and this worker's split: waiting on the broadcasts vs loading."""
        from fourdthinker.weight_sync import receive_buckets
        from fourdthinker.weights import BucketLayout

        return receive_buckets(self._joined_group(), [BucketLayout.from_wire(*w) for w in layouts],
                               self.model_runner.device, self._bucket_loader())

    def weight_group_update(self, names: list[str] | None, layouts) -> dict[str, float]:
        """A whole sync in one RPC: begin, every bucket of the broadcast, end (one round trip into the
        engine instead of three). Returns `weight_group_receive`'s figures with begin_s and end_s."""
        begin = self.bucket_update_begin(names)
        out = self.weight_group_receive(layouts)
        return {**out, "begin_s": begin, "end_s": self.bucket_update_end()}

    def weight_group_probe(self, sizes: list[int]) -> int:
        """Receive plain buffers of these sizes and drop them: the bandwidth probe's far end."""
        from fourdthinker.weight_sync import broadcast

        group, device = self._joined_group(), self.model_runner.device
        for size in sizes:
            broadcast(group, torch.empty(size, dtype=torch.uint8, device=device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return sum(sizes)

    def _joined_group(self):
        group = getattr(self, "_weight_group", None)
        if group is None:
            raise RuntimeError("this worker has not joined a weight group: call weight_group_join first")
        return group

    def bucket_update_end(self) -> float:
        """Finish the reload; returns the seconds it took in this worker."""
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        start = time.perf_counter()
        reloading = getattr(self, "_reloading", None)
        for module in [self.model_runner.get_model()] if reloading is None else reloading:
            finalize_layerwise_reload(module, self.model_runner.vllm_config.model_config)
        self._reloading = None
        if self.model_runner.device.type == "cuda":
            torch.cuda.synchronize(self.model_runner.device)
        return time.perf_counter() - start

    def weights_checksums(self) -> dict[str, float]:
        """float64 sum per parameter (vLLM names): to check a sync landed everywhere."""
        model = self.model_runner.get_model()
        return {n: float(p.detach().double().sum()) for n, p in model.named_parameters()}


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
