"""Build a vLLM engine for a fourdthinker checkpoint, latent decoding on or off.

Defaults differ by platform (../shared/ENVIRONMENT.md): on CPU the KV cache is carved out of host
RAM (a few GiB, not 92% of it), attention has no CUDA graphs, and fp32 is the dtype that works in
the multi-process engine.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fourdthinker.vllm_plugin import ARCHITECTURE, LOGITS_PROCESSOR, WORKER_EXTENSION


def _on_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


RUNNER_ENV = "FOURDTHINKER_LATENT_RUNNER"  # v1 | v2: which vLLM model runner decodes latents


def latent_runner(runner: str | None = None) -> str:
    """`v2` (vLLM's own default runner; `runner_v2.py`) on CUDA, `v1` (logits processor,
    `logits.py`) elsewhere: the V2 runner needs Triton, which a CPU build lacks."""
    runner = runner or os.environ.get(RUNNER_ENV) or ("v2" if _on_cuda() else "v1")
    if runner not in ("v1", "v2"):
        raise ValueError(f"{RUNNER_ENV}: v1 or v2, got {runner!r}")
    if runner == "v2" and not _on_cuda():
        raise ValueError(f"{RUNNER_ENV}=v2 needs CUDA (vLLM's V2 runner needs Triton); use v1 on CPU")
    return runner


def llm_kwargs(model_dir: str | Path, *, latent: bool = True, max_model_len: int = 4096,
               max_num_seqs: int = 64, enforce_eager: bool | None = None, seed: int = 0,
               runner: str | None = None, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM` / `EngineArgs`. `runner`: see `latent_runner`."""
    cuda = _on_cuda()
    kwargs: dict[str, Any] = dict(
        model=str(model_dir), tokenizer=str(model_dir), max_model_len=max_model_len,
        max_num_seqs=max_num_seqs, seed=seed,
        limit_mm_per_prompt={"image": 4, "video": 1},
        enforce_eager=(not cuda) if enforce_eager is None else enforce_eager,
        dtype="bfloat16" if cuda else "float32",
        worker_extension_cls=WORKER_EXTENSION,
    )
    # The caller may already hold a CUDA context (a learner, a benchmark): forked engine
    # processes cannot re-initialise CUDA, spawned ones can.
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    if not cuda:
        # vLLM-CPU reads its KV-cache size (GiB) from the environment.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    if latent:
        kwargs["hf_overrides"] = {"architectures": [ARCHITECTURE]}
        if latent_runner(runner) == "v2":  # the model brings its ModelState; no logits processor
            os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"
        else:  # the logits processor, which selects the V1 runner anyway
            os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
            kwargs["logits_processors"] = [LOGITS_PROCESSOR]
    kwargs.update(overrides)
    return kwargs


def make_llm(model_dir: str | Path, *, latent: bool = True, **kwargs: Any):
    """A `vllm.LLM`; with latent decoding attached in every worker when `latent` is on."""
    from vllm import LLM

    llm = LLM(**llm_kwargs(model_dir, latent=latent, **kwargs))
    if latent:
        llm.collective_rpc("latent_attach")
    return llm
