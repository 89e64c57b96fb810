"""The installed stack works together: torchvision ops, the Qwen2.5-VL video processor, vLLM."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def test_torchvision_nms_and_roi_align_run_and_compute_the_right_values():
    from torchvision.ops import nms, roi_align

    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], dtype=torch.float32)
    keep = nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)
    assert keep.tolist() == [0, 2]  # the second box overlaps the first with IoU 0.68
    feature = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    pooled = roi_align(feature, [torch.tensor([[0.0, 0.0, 4.0, 4.0]])], output_size=1, aligned=True)
    assert pooled.item() == pytest.approx(feature.mean().item())


@pytest.mark.parametrize("frames,height,width", [(4, 56, 84), (6, 300, 500)])
def test_video_processor_returns_the_expected_grid(tiny_model_dir, frames, height, width):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir, local_files_only=True)
    rng = np.random.default_rng(0)
    clip = rng.integers(0, 255, (frames, height, width, 3), dtype=np.uint8)
    out = processor.video_processor(videos=[list(clip)], return_tensors="pt")
    # Sides round to the nearest multiple of 28 (patch 14 x merge 2); time pairs frames (temporal patch 2).
    expected = [frames // 2, round(height / 28) * 2, round(width / 28) * 2]
    assert out["video_grid_thw"].tolist() == [expected]
    assert out["pixel_values_videos"].shape == (int(np.prod(expected)), 3 * 2 * 14 * 14)


@pytest.mark.slow
def test_vllm_engine_starts_on_the_tiny_model_and_matches_transformers_greedy(tiny_model_dir, plain_llm):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_model_dir, local_files_only=True)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "Which way does the camera pan?"}]}],
        add_generation_prompt=True)
    prompt_ids = processor.tokenizer(prompt).input_ids

    from vllm import SamplingParams

    out = plain_llm.generate([{"prompt_token_ids": prompt_ids}], SamplingParams(max_tokens=12, temperature=0.0,
                                                                         ignore_eos=True))
    vllm_ids = list(out[0].outputs[0].token_ids)

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, local_files_only=True).eval()
    hf = model.generate(torch.tensor([prompt_ids]), max_new_tokens=12, do_sample=False,
                        eos_token_id=None, min_new_tokens=12)
    assert vllm_ids == hf[0, len(prompt_ids):].tolist()
