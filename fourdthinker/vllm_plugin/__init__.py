"""Latent-aware decoding inside vLLM 0.26 without a fork.

On vLLM's V1 runner (the CPU build; custom logits processors select it), three pieces, wired by
`latent_attach` (a worker-extension RPC) after the engine starts: the model subclass (`model.py`:
inject vectors / stash hidden states), the logits processor (`logits.py`: per-request pad x K then
end forcing, records the vectors) and the shared per-worker `LatentState` (`state.py`). On the V2
runner (CUDA's default), the model subclass brings `runner_v2.LatentModelState`, which does all of
it on the device (`engine.latent_runner` picks). `register` is the `vllm.general_plugins` entry
point, so every vLLM process (engine core, workers, Ray actors) knows the architecture name.
"""

from __future__ import annotations

ARCHITECTURE = "LatentQwen2_5_VLForConditionalGeneration"
LOGITS_PROCESSOR = "fourdthinker.vllm_plugin.logits:LatentLogitsProcessor"
WORKER_EXTENSION = "fourdthinker.vllm_plugin.extension.LatentWorkerExtension"  # dotted: vLLM qualname


def register() -> None:
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(
            ARCHITECTURE, "fourdthinker.vllm_plugin.model:LatentQwen2_5_VLForConditionalGeneration")
