"""A model's weight loaders, recorded once and replayed as one batched copy per bucket.

vLLM's `load_weights` walks every checkpoint tensor through Python: name mapping, the fused-layer
loader (q/k/v into one `qkv_proj`, gate/up into `gate_up_proj`), a narrow and a `copy_`. For a 3B
model that is some 400 loader calls per sync, host time the broadcasts wait on. Where the loaders
write in place (an unquantized model on CUDA keeps the checkpoint layout), what they do to a bucket
of a given layout is the same every sync: copy fixed byte ranges of the bucket into fixed views
of the parameters. So the first load of a layout runs the loaders under a dispatch mode that
records every `copy_`; later loads of that layout replay the copies with one `_foreach_copy_`.

A recording is kept only when it provably is the whole load: every write into model memory was a
`copy_` whose source is a view of the bucket, no parameter was re-allocated, and no two
destinations overlap (a dtype conversion inside `copy_` is part of the copy, so of the replay).
Anything else (arithmetic on the loaded tensor, a conversion before the copy, another in-place op on
a parameter, a bucket tensor copied outside the parameters) leaves that layout on the loaders, with
the reason logged once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fourdthinker.weights import BucketLayout, unpack

log = logging.getLogger(__name__)

Loader = Callable[[list[tuple[str, torch.Tensor]]], object]


def _storage_ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _written(func, args, kwargs) -> list[torch.Tensor]:
    """The tensors an aten op writes to (its mutable and out= arguments)."""
    out = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        out += [value] if isinstance(value, torch.Tensor) else [v for v in value or () if isinstance(v, torch.Tensor)]
    return out


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) bytes of the storage a strided view can touch."""
    if t.numel() == 0:
        return (0, 0)
    extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    start = t.storage_offset() * t.element_size()
    return start, start + (extent + 1) * t.element_size()


@dataclass(frozen=True)
class _Source:
    dtype: torch.dtype
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int  # bytes from the start of the bucket buffer


@dataclass
class CopyPlan:
    """The copies one bucket layout's load amounts to: `sources[i]` of the bucket into `targets[i]`."""

    targets: list[torch.Tensor]
    sources: list[_Source]
    fills: list[tuple[torch.Tensor, float]]  # constant writes (e.g. a padded vocabulary's spare rows)
    # each destination parameter and its address at recording: a re-allocated parameter voids the plan
    anchors: list[tuple[torch.Tensor, int]]

    def still_valid(self) -> bool:
        return all(p.data_ptr() == ptr for p, ptr in self.anchors)

    def apply(self, flat: torch.Tensor) -> None:
        views = {}
        srcs = []
        for s in self.sources:
            base = views.get(s.dtype)
            if base is None:
                base = views[s.dtype] = flat.view(s.dtype)
            srcs.append(base.as_strided(s.size, s.stride, base.storage_offset() + s.offset // s.dtype.itemsize))
        torch._foreach_copy_(self.targets, srcs)
        for target, value in self.fills:
            target.fill_(value)


class _CopyRecorder(TorchDispatchMode):
    """Watches one load: keeps its copies from the bucket into model memory and notes the first thing
    that makes the load more than such copies."""

    def __init__(self, flat: torch.Tensor, model_storages: dict[int, torch.Tensor]):
        super().__init__()
        self.flat_ptr = _storage_ptr(flat)
        self.flat_start = flat.storage_offset() * flat.element_size()
        self.model_storages = model_storages
        self.targets: list[torch.Tensor] = []
        self.sources: list[_Source] = []
        self.fills: list[tuple[torch.Tensor, float]] = []
        self.touched: dict[int, torch.Tensor] = {}
        self.reason: str | None = None

    def _refuse(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.copy_.default:
            dst, src = args[0], args[1]
            owner = self.model_storages.get(_storage_ptr(dst))
            if owner is not None:
                if not isinstance(src, torch.Tensor) or _storage_ptr(src) != self.flat_ptr:
                    self._refuse(f"a parameter is written from a computed tensor ({tuple(dst.shape)})")
                else:  # a dtype conversion is part of copy_, so of the replay too
                    self.targets.append(dst)
                    self.sources.append(_Source(src.dtype, tuple(src.shape), tuple(src.stride()),
                                                src.storage_offset() * src.element_size() - self.flat_start))
                    self.touched[_storage_ptr(dst)] = owner
            elif isinstance(src, torch.Tensor) and _storage_ptr(src) == self.flat_ptr:
                # into memory that is no parameter or buffer: a weight kept elsewhere, which a
                # replay would miss
                self._refuse(f"a bucket tensor is copied outside the model's parameters ({tuple(dst.shape)})")
        elif func is torch.ops.aten.fill_.Scalar and _storage_ptr(args[0]) in self.model_storages:
            self.fills.append((args[0], args[1]))
            self.touched[_storage_ptr(args[0])] = self.model_storages[_storage_ptr(args[0])]
        elif any(_storage_ptr(t) in self.model_storages for t in _written(func, args, kwargs)):
            self._refuse(f"{func} writes into a parameter")
        return func(*args, **kwargs)


def _overlapping(targets: Sequence[torch.Tensor]) -> bool:
    """Whether two destinations may share bytes (by the byte ranges their views span): replayed
    copies run in parallel, so their order must not matter."""
    reach: dict[int, int] = {}  # storage -> furthest byte reached so far
    for storage, start, end in sorted((_storage_ptr(t), *_byte_span(t)) for t in targets):
        if start < end and start < reach.get(storage, -1):
            return True
        reach[storage] = max(reach.get(storage, -1), end)
    return False


def record_load(load: Loader, layout: BucketLayout, flat: torch.Tensor,
                model_tensors: Iterable[torch.Tensor]) -> tuple[CopyPlan | None, str | None]:
    """Run `load` on the bucket once (it loads for real) and return its copy plan, or None and why."""
    tensors = list(model_tensors)
    storages = {_storage_ptr(t): t for t in tensors}
    before = {id(t): t.data_ptr() for t in tensors}
    recorder = _CopyRecorder(flat, storages)
    with recorder:
        load(unpack(layout, flat))
    reason = recorder.reason
    if reason is None and any(t.data_ptr() != before[id(t)] for t in tensors):
        reason = "a parameter was re-allocated while loading"
    if reason is None and not recorder.targets:
        reason = "the load wrote nothing into the model"
    if reason is None and _overlapping(recorder.targets + [t for t, _ in recorder.fills]):
        reason = "two writes reach the same parameter bytes"
    if reason is not None:
        return None, reason
    anchors = [(t, t.data_ptr()) for t in recorder.touched.values()]
    return CopyPlan(recorder.targets, recorder.sources, recorder.fills, anchors), None


def _layout_key(layout: BucketLayout) -> tuple:
    return tuple(layout.names), tuple(map(tuple, layout.shapes)), tuple(layout.dtypes)


class ReplayingLoader:
    """`load(layout, flat)` for one model: the loaders the first time a layout comes, its copy plan
    every time after. `enabled=False` always runs the loaders (kernels that repack weights)."""

    def __init__(self, model: torch.nn.Module, enabled: bool = True):
        self.model = model
        self.enabled = enabled
        self.plans: dict[tuple, CopyPlan | None] = {}  # None: this layout stays on the loaders
        self.replayed = 0

    def __call__(self, layout: BucketLayout, flat: torch.Tensor) -> None:
        key = _layout_key(layout)
        if not self.enabled or (key in self.plans and self.plans[key] is None):
            self.model.load_weights(unpack(layout, flat))
            return
        plan = self.plans.get(key)
        if plan is not None and plan.still_valid():
            plan.apply(flat)
            self.replayed += 1
            return
        tensors = [*self.model.parameters(), *self.model.buffers()]
        plan, reason = record_load(self.model.load_weights, layout, flat, tensors)
        if reason is not None:
            log.warning("weight loads of a %d-tensor bucket stay on the model's loaders: %s",
                        len(layout.names), reason)
        self.plans[key] = plan
