"""Take new weights inside a vLLM worker: checkpoint-format buckets (from bytes, a CUDA IPC handle or a
broadcast group of their own), loaded in place or through vLLM's layerwise reload. The sender side is
`fourdthinker/weight_sync.py`; `LatentWorkerExtension` mixes this in, as vLLM takes one extension class.
"""

from __future__ import annotations

import os
import time

import torch


class WeightReceiver:
    """RPCs of the receiving end of a weight sync (`self.model_runner`, `self.rank`: the vLLM worker's)."""

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
