"""Text-prompted video segmentation (SAM3) behind one interface, and the Ray Data actor that runs it.

Backends, chosen by `SegmenterConfig.backend`; the pipeline code is the same for all of them:
- `sam3`: the `sam3` package's video predictor on GPU (the production path);
- `transformers`: transformers' `Sam3Model`, sized by config, on CPU (tests, demo, CPU clusters);
- `ground_truth`: the synthetic world's exact masks (label-quality tests and the offline demo).

`SegmentClips` is the callable class given to `Dataset.map_batches`: each actor builds its backend
once, reads a clip's frames from disk, segments every concept, keeps the tracks found often enough,
and writes their masks as 1-bit PNGs with per-frame boxes and areas. Rows carry paths, not pixels.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
from PIL import Image

from fourdthinker.preprocess.config import PreprocessConfig, SegmenterConfig
from fourdthinker.preprocess.frames import load_frame_arrays
from fourdthinker.preprocess.index import STATUS_DROPPED, STATUS_OK
from fourdthinker.preprocess.object_motion import mask_statistics

MASKS_DIR = "masks"


@dataclass(frozen=True)
class ClipFrames:
    """A clip as the segmenter sees it: RGB frames (T, H, W, 3) uint8 and their times in seconds."""

    clip_id: str
    frames: np.ndarray
    times: np.ndarray


@dataclass
class Track:
    """One prompt's object over the clip: a boolean (H, W) mask per frame (None where not found)."""

    prompt: str
    masks: list[np.ndarray | None]
    score: float

    def stacked(self, height: int, width: int) -> np.ndarray:
        """(T, H, W) bool, empty where the object was not found."""
        empty = np.zeros((height, width), dtype=bool)
        return np.stack([empty if m is None else m for m in self.masks])


class Segmenter(Protocol):
    def segment(self, clip: ClipFrames, prompts: Sequence[str]) -> list[Track]:
        """One track per prompt, in prompt order; masks have the frames' height and width."""
        ...


class GroundTruthSegmenter:
    """Exact masks of a synthetic world (`fourdthinker.data.synth`): a prompt names an object
    ("red box"); an object that is not in the clip gives an empty track with score 0."""

    def __init__(self, world_root: str | Path):
        self.root = Path(world_root)
        if not (self.root / "ground_truth").is_dir():
            raise FileNotFoundError(f"segmenter.world_root {self.root}: no ground_truth/ directory; "
                                    "point it at a world built by `fourdthinker synth`")

    def segment(self, clip: ClipFrames, prompts: Sequence[str]) -> list[Track]:
        truth = self.root / "ground_truth" / clip.clip_id
        if not (truth / "tracks.json").is_file():
            raise FileNotFoundError(f"no ground truth for {clip.clip_id} under {self.root}")
        tracks = json.loads((truth / "tracks.json").read_text())
        with np.load(truth / "masks.npz") as data:
            ids = data["instance_ids"]
        source = np.clip(np.round(np.asarray(clip.times) * tracks["fps"]).astype(int), 0, len(ids) - 1)
        _, height, width = clip.frames.shape[:3]
        # Nearest-neighbour resize by index maps at pixel centres.
        rows = np.minimum(((np.arange(height) + 0.5) * ids.shape[1] / height).astype(int), ids.shape[1] - 1)
        cols = np.minimum(((np.arange(width) + 0.5) * ids.shape[2] / width).astype(int), ids.shape[2] - 1)
        frames = ids[source][:, rows][:, :, cols]
        by_name = {o["name"]: o["id"] for o in tracks["objects"]}
        result = []
        for prompt in prompts:
            if prompt not in by_name:
                result.append(Track(prompt, [None] * len(source), 0.0))
                continue
            masks = frames == by_name[prompt]
            result.append(Track(prompt, [m if m.any() else None for m in masks], 1.0))
        return result


def build_segmenter(cfg: SegmenterConfig, input_root: str = "") -> Segmenter:
    """The configured backend, loaded (model weights included): call once per actor."""
    if cfg.backend == "ground_truth":
        return GroundTruthSegmenter(cfg.world_root or input_root)
    if cfg.backend == "transformers":
        return TransformersSam3Segmenter(cfg)
    if cfg.backend == "sam3":
        return Sam3PackageSegmenter(cfg)
    raise ValueError(f"segmenter.backend={cfg.backend!r}: use sam3, transformers or ground_truth")


def save_mask(mask: np.ndarray, path: Path) -> None:
    """A boolean mask as a 1-bit PNG (a few hundred bytes for a blob)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(mask, dtype=bool)).save(path, optimize=True)


def keep_objects(tracks: Sequence[Track], min_visible_fraction: float, max_objects: int) -> list[Track]:
    """Tracks found in at least `min_visible_fraction` of the frames, best scores first, at most
    `max_objects`; prompts that found nothing or flicker in and out are not objects of the clip."""
    found = [t for t in tracks if t.masks and
             sum(m is not None for m in t.masks) >= min_visible_fraction * len(t.masks)]
    return sorted(found, key=lambda t: -t.score)[:max_objects]


def track_record(track: Track, mask_dir: Path, height: int, width: int) -> dict:
    """Write a track's masks and return its JSON-able summary (paths, boxes, areas, centroids)."""
    stacked = track.stacked(height, width)
    centroids, areas, boxes = mask_statistics(stacked)
    paths: list[str | None] = []
    for frame, mask in enumerate(track.masks):
        if mask is None:
            paths.append(None)
            continue
        path = mask_dir / f"frame_{frame:04d}.png"
        save_mask(mask, path)
        paths.append(str(path))

    def listed(array: np.ndarray) -> list:
        return [None if not np.isfinite(row).all() else [float(v) for v in row] for row in array]
    return {"name": track.prompt, "score": float(track.score), "mask_paths": paths,
            "boxes": listed(boxes), "centroids": listed(centroids), "areas": areas.tolist()}


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_") or "object"


class SegmentClips:
    """Ray Data callable class: one segmenter per actor, loaded in `__init__`.

    Input batches are pandas frames of clip rows (frames on disk); output rows gain a `tracks` column
    holding the JSON list of kept tracks (see `track_record`). Dropped rows pass through untouched.
    A row's `concepts` column (the objects an LLM named in that clip), when present, prompts its
    segmentation instead of the config's vocabulary.
    """

    def __init__(self, cfg: PreprocessConfig):
        self.cfg = cfg
        self.segmenter = build_segmenter(cfg.segmenter, cfg.input_root)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        # Ray Data needs a row count per batch on GPUs and then fills batches across its input
        # blocks, so a batch can reach over a bucket boundary: each bucket's rows go to the
        # segmenter as a batch of their own, in order.
        rows = [r for _, group in batch.groupby("bucket", sort=False) for r in self._segment_bucket(group)]
        return pd.DataFrame(rows, columns=list(batch.columns) + ["tracks"])

    def _segment_bucket(self, rows: pd.DataFrame) -> list[dict]:
        """Rows of one bucket (uniform duration x resolution) through the segmenter."""
        return [self._process(row) for row in rows.to_dict("records")]

    def _process(self, row: dict) -> dict:
        if row["status"] != STATUS_OK:
            return {**row, "tracks": "[]"}
        try:
            return {**row, "tracks": self._segment_row(row)}
        except Exception as err:  # one bad clip must not abort the job: it is dropped with the cause
            return {**row, "tracks": "[]", "status": STATUS_DROPPED,
                    "reason": f"segmentation failed: {type(err).__name__}: {err}"}

    def _segment_row(self, row: dict) -> str:
        frames = load_frame_arrays(list(row["frame_paths"]))
        clip = ClipFrames(row["clip_id"], frames, np.asarray(row["frame_times"], dtype=np.float64))
        concepts = row.get("concepts")
        tracks = self.segmenter.segment(clip, self.cfg.concepts if concepts is None else list(concepts))
        kept = keep_objects(tracks, self.cfg.min_visible_fraction, self.cfg.max_objects)
        clip_dir = Path(self.cfg.output_dir) / MASKS_DIR / row["clip_id"]
        height, width = frames.shape[1:3]
        records = [track_record(t, clip_dir / f"{i:02d}_{_slug(t.prompt)}", height, width)
                   for i, t in enumerate(kept)]
        return json.dumps(records)


def tiny_sam3_config(image_size: int = 112, hidden: int = 32):
    """A random-weight `Sam3Config` small enough for CPU tests (~0.26M parameters)."""
    from transformers import Sam3Config

    patches = image_size // 14
    grid = [[patches * 4] * 2, [patches * 2] * 2, [patches] * 2]  # the FPN's x4, x2, x1 levels
    layer = {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_attention_heads": 2}
    return Sam3Config(
        vision_config={"backbone_config": {**layer, "num_hidden_layers": 2, "image_size": image_size,
                                           "patch_size": 14, "window_size": patches // 2,
                                           "global_attn_indexes": [1], "pretrain_image_size": image_size // 2},
                       "fpn_hidden_size": hidden, "backbone_feature_sizes": grid},
        text_config={**layer, "num_hidden_layers": 1, "vocab_size": 512, "max_position_embeddings": 16,
                     "projection_dim": hidden, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        geometry_encoder_config={**layer, "num_layers": 1},
        detr_encoder_config={**layer, "num_layers": 1},
        detr_decoder_config={**layer, "num_layers": 1, "num_queries": 8},
        mask_decoder_config={"hidden_size": hidden, "num_attention_heads": 2},
    )


class TransformersSam3Segmenter:
    """transformers' `Sam3Model` run per frame, text-prompted, on CPU (or any torch device).

    `Sam3Model` (image) per frame plus greedy mask-IoU linking, not `Sam3VideoModel`: the video
    model's memory-attention tracker is far slower on CPU and ties a clip to one inference session;
    per-frame concept detection is what the text prompt drives anyway. Per prompt and frame the
    detections scoring above `score_threshold` are candidates; the track takes, on its first frame,
    the best-scoring one and afterwards the one overlapping the previous mask most.

    `model_dir` holds a saved `Sam3Model` + `Sam3Processor`. Without one, a random model of
    `tiny_sam3_config()` is built, and since no CLIP tokenizer exists offline its prompts are
    encoded as UTF-8 bytes (fine for random weights, which read no meaning into text).
    """

    def __init__(self, cfg: SegmenterConfig):
        import torch
        from transformers import Sam3ImageProcessor, Sam3Model, Sam3Processor

        self.device = torch.device(cfg.device or "cpu")
        self.threshold = cfg.score_threshold
        if cfg.model_dir:
            self.model = Sam3Model.from_pretrained(cfg.model_dir)
            processor = Sam3Processor.from_pretrained(cfg.model_dir)
            self.image_processor, self.tokenizer = processor.image_processor, processor.tokenizer
        else:
            torch.manual_seed(0)
            config = tiny_sam3_config()
            self.model = Sam3Model(config)
            side = config.vision_config.backbone_config.image_size
            self.image_processor = Sam3ImageProcessor(size={"height": side, "width": side})
            self.tokenizer = None
            self.text_length = config.text_config.max_position_embeddings
            self.vocab_size = config.text_config.vocab_size
        self.model.to(self.device).eval()

    def _encode_prompts(self, prompts: Sequence[str]):
        import torch

        if self.tokenizer is not None:
            encoded = self.tokenizer(list(prompts), padding="max_length", truncation=True, return_tensors="pt")
            return encoded["input_ids"], encoded["attention_mask"]
        ids = torch.ones((len(prompts), self.text_length), dtype=torch.long)  # pad id 1
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            codes = [2 + b % (self.vocab_size - 2) for b in prompt.encode()][: self.text_length]
            ids[row, : len(codes)] = torch.tensor(codes)
            mask[row, : len(codes)] = 1
        return ids, mask

    def segment(self, clip: ClipFrames, prompts: Sequence[str]) -> list[Track]:
        import torch

        frames = clip.frames
        height, width = frames.shape[1:3]
        pixels = self.image_processor(images=list(frames), return_tensors="pt")["pixel_values"].to(self.device)
        input_ids, attention = (t.to(self.device) for t in self._encode_prompts(prompts))
        with torch.inference_mode():
            vision = self.model.get_vision_features(pixel_values=pixels)  # once per frame, reused per prompt
            scores, masks = [], []
            for p in range(len(prompts)):
                out = self.model(vision_embeds=vision, input_ids=input_ids[p:p + 1].expand(len(frames), -1),
                                 attention_mask=attention[p:p + 1].expand(len(frames), -1))
                score = out.pred_logits.sigmoid() * out.presence_logits.sigmoid()  # (T, Q)
                logits = torch.nn.functional.interpolate(out.pred_masks, size=(height, width), mode="bilinear")
                scores.append(score.float().cpu().numpy())
                masks.append((logits > 0).cpu().numpy())  # (T, Q, H, W)
        return [Track(prompt, link_detections(s, m, self.threshold), float(s.max(axis=1).mean()))
                for prompt, s, m in zip(prompts, scores, masks)]


def link_detections(scores: np.ndarray, masks: np.ndarray, threshold: float) -> list[np.ndarray | None]:
    """Greedy per-frame linking: scores (T, Q), masks (T, Q, H, W) -> one mask per frame or None.
    The first found frame takes its best-scoring candidate, later frames the candidate with the
    largest IoU with the last kept mask (score breaks ties)."""
    track: list[np.ndarray | None] = []
    last = None
    for frame_scores, frame_masks in zip(scores, masks):
        candidates = np.flatnonzero((frame_scores > threshold) & frame_masks.any(axis=(1, 2)))
        if not candidates.size:
            track.append(None)
            continue
        if last is None:
            best = candidates[np.argmax(frame_scores[candidates])]
        else:
            inter = (frame_masks[candidates] & last).sum(axis=(1, 2))
            union = (frame_masks[candidates] | last).sum(axis=(1, 2))
            best = candidates[np.lexsort((-frame_scores[candidates], -(inter / union)))[0]]
        last = frame_masks[best]
        track.append(last)
    return track


def write_byte_level_bpe(path: str | Path) -> Path:
    """Write a CLIP-format BPE vocabulary (a gzipped merges list under one header line) holding no
    merges, so the `sam3` tokenizer encodes text byte by byte: 256 byte symbols, their 256
    end-of-word forms and the two special tokens, all ids below the text encoder's vocabulary size.
    A stand-in for random weights, which read no meaning into tokens; trained weights need the
    vocabulary they were trained with."""
    path = Path(path)
    with gzip.open(path, "wt", encoding="utf-8") as vocab:
        vocab.write("#version: 0.2")  # the header line the tokenizer skips; no merge lines follow
    return path


class Sam3PackageSegmenter:
    """The `sam3` package's video model on GPU: concept (text) detection on the first frame, then
    SAM3's memory tracker propagates every detected instance through the clip. Of the instances a
    prompt finds, the track keeps the one with the highest mean probability over the clip.

    `checkpoint` is a local file; "" builds random weights at the real size (benchmarks only: the
    package would otherwise download from the Hub), tokenising prompts with `write_byte_level_bpe`'s
    vocabulary unless `bpe_path` names the real one. The package hard-codes CUDA, so this backend
    runs only where a GPU is visible; `benchmarks/gpu/sam3_smoke.py` exercises it there.
    """

    def __init__(self, cfg: SegmenterConfig):
        import tempfile

        import torch
        from sam3.model_builder import build_sam3_video_model

        if not torch.cuda.is_available():
            raise RuntimeError("segmenter.backend=sam3 needs a CUDA GPU (the sam3 package hard-codes cuda); "
                               "use backend=transformers on CPU")
        if cfg.bpe_path and not Path(cfg.bpe_path).is_file():
            raise FileNotFoundError(f"segmenter.bpe_path {cfg.bpe_path}: no such file; point it at CLIP's "
                                    "bpe_simple_vocab_16e6.txt.gz")
        self.threshold = cfg.score_threshold
        # The tokenizer reads its vocabulary once, while the model is built: a stand-in may be temporary.
        with tempfile.TemporaryDirectory(prefix="sam3-bpe-") as scratch:
            if cfg.bpe_path:
                bpe_path = cfg.bpe_path
            elif cfg.checkpoint:
                bpe_path = None  # the package's default: its assets/ folder, present in source checkouts
            else:
                bpe_path = str(write_byte_level_bpe(Path(scratch) / "byte_level_bpe.txt.gz"))
            try:
                model = build_sam3_video_model(checkpoint_path=cfg.checkpoint or None, load_from_HF=False,
                                               bpe_path=bpe_path, device=cfg.device or "cuda")
            except FileNotFoundError as err:
                if bpe_path is not None:
                    raise
                raise FileNotFoundError(f"{err}. Trained SAM3 weights need CLIP's BPE vocabulary, which the "
                                        "PyPI sam3 wheel does not ship: set segmenter.bpe_path to "
                                        "bpe_simple_vocab_16e6.txt.gz") from err
        self.model = model.eval()

    def segment(self, clip: ClipFrames, prompts: Sequence[str]) -> list[Track]:
        import tempfile

        import torch

        with tempfile.TemporaryDirectory(prefix=f"sam3-{clip.clip_id}-") as frames_dir:
            # The package reads a JPEG folder whose file stems are frame numbers.
            for index, frame in enumerate(clip.frames):
                Image.fromarray(frame).save(Path(frames_dir) / f"{index:05d}.jpg", quality=95)
            # The package computes in bf16 autocast, which its tracker enters when built, for that thread
            # only: entering it here keeps calls from any other thread (an actor's executor) in bf16 too.
            with torch.inference_mode(), torch.autocast(device_type="cuda", dtype=torch.bfloat16):
                state = self.model.init_state(resource_path=frames_dir)
                tracks = []
                for prompt in prompts:
                    # A text prompt starts the state over (add_prompt resets it), keeping the loaded frames.
                    self.model.add_prompt(inference_state=state, frame_idx=0, text_str=prompt)
                    per_frame = {index: outputs for index, outputs in self.model.propagate_in_video(
                        inference_state=state, start_frame_idx=0, max_frame_num_to_track=None, reverse=False)}
                    tracks.append(self._best_instance(prompt, per_frame, len(clip.frames)))
        return tracks

    def _best_instance(self, prompt: str, per_frame: dict, num_frames: int) -> Track:
        """The instance with the highest mean probability (absent frames count 0) as one track."""
        probs: dict[int, np.ndarray] = {}
        masks: dict[int, list[np.ndarray | None]] = {}
        for index, outputs in per_frame.items():
            ids = np.asarray(outputs["out_obj_ids"]).tolist()
            frame_probs = np.asarray(outputs["out_probs"], dtype=np.float64)
            frame_masks = outputs["out_binary_masks"]
            frame_masks = frame_masks.cpu().numpy() if hasattr(frame_masks, "cpu") else np.asarray(frame_masks)
            for slot, obj_id in enumerate(ids):
                probs.setdefault(obj_id, np.zeros(num_frames))[index] = frame_probs[slot]
                masks.setdefault(obj_id, [None] * num_frames)[index] = frame_masks[slot].astype(bool)
        if not probs:
            return Track(prompt, [None] * num_frames, 0.0)
        best = max(probs, key=lambda obj_id: probs[obj_id].mean())
        kept = [m if m is not None and probs[best][i] >= self.threshold else None
                for i, m in enumerate(masks[best])]
        return Track(prompt, kept, float(probs[best].mean()))
