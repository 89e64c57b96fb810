"""Weights in flight: named tensors packed into a few flat buckets, and back.

A weight sync moves a whole model every RL step. Sending tensor by tensor costs one round trip
(and one RPC into every vLLM worker) per parameter; packing them into ~hundreds-of-MB byte buffers
makes it a handful of large copies, which is what the interconnect is good at.

A `BucketLayout` is the metadata alone (names, shapes, dtypes, byte offsets): it is planned from
the parameters' shapes before any byte moves, so a receiver can allocate the buffer a collective
broadcast writes into. A `WeightBucket` is a layout with its bytes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch

DEFAULT_BUCKET_BYTES = 256 * 1024 * 1024
# Each tensor starts at a multiple of this many bytes, so it can be viewed in place as any dtype.
ALIGN = 16


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _nbytes(shape: Sequence[int], dtype: str) -> int:
    return torch.Size(shape).numel() * getattr(torch, dtype).itemsize


@dataclass
class BucketLayout:
    names: list[str]
    shapes: list[tuple[int, ...]]
    dtypes: list[str]  # torch dtype names, e.g. "float32"

    @property
    def slot_bytes(self) -> list[int]:
        """Bytes each tensor takes in the buffer: its own, padded to ALIGN."""
        return [_aligned(_nbytes(s, d)) for s, d in zip(self.shapes, self.dtypes)]

    @property
    def offsets(self) -> list[int]:
        return [0, *itertools.accumulate(self.slot_bytes)][:-1]

    @property
    def total_bytes(self) -> int:
        return sum(self.slot_bytes)

    def to_wire(self) -> tuple[list[str], list[list[int]], list[str]]:
        """Plain Python values: what any RPC layer (vLLM's msgpack included) carries unchanged."""
        return list(self.names), [list(s) for s in self.shapes], list(self.dtypes)

    @classmethod
    def from_wire(cls, names, shapes, dtypes) -> "BucketLayout":
        return cls(list(names), [tuple(s) for s in shapes], list(dtypes))


def plan_buckets(specs: Iterable[tuple[str, Sequence[int], torch.dtype | str]],
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[BucketLayout]:
    """Group (name, shape, dtype) in order into buckets of about `bucket_bytes`; a larger tensor
    gets a bucket of its own."""
    layouts: list[BucketLayout] = []
    current, size = BucketLayout([], [], []), 0
    for name, shape, dtype in specs:
        dtype = dtype if isinstance(dtype, str) else _dtype_name(dtype)
        nbytes = _aligned(_nbytes(shape, dtype))
        if current.names and size + nbytes > bucket_bytes:
            layouts.append(current)
            current, size = BucketLayout([], [], []), 0
        current.names.append(name)
        current.shapes.append(tuple(shape))
        current.dtypes.append(dtype)
        size += nbytes
    if current.names:
        layouts.append(current)
    return layouts


def pack(layout: BucketLayout, tensors: Sequence[torch.Tensor], device: torch.device | str | None = None) -> torch.Tensor:
    """The layout's tensors, back to back, in one uint8 buffer on `device` (default: the first
    tensor's). On a GPU the copies are device-to-device kernels, no host round trip."""
    device = tensors[0].device if device is None else torch.device(device)
    flat = torch.empty(layout.total_bytes, dtype=torch.uint8, device=device)
    with torch.no_grad():  # no autograd views of parameters: a few fewer host steps per tensor
        raws = [t.reshape(-1).view(torch.uint8) for t in tensors]
        # every destination view from one split (the pads between tensors are the odd pieces)
        sizes = [n for r, a in zip(raws, layout.slot_bytes) for n in (r.numel(), a - r.numel())]
        # one multi-tensor copy (a single kernel on a GPU where all are there), not a launch per tensor
        torch._foreach_copy_(flat.split(sizes)[::2], raws, non_blocking=True)
    return flat



def unpack(layout: BucketLayout, flat: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Views into `flat`, one (name, tensor) per entry of the layout."""
    out = []
    for name, shape, dtype, offset in zip(layout.names, layout.shapes, layout.dtypes, layout.offsets):
        out.append((name, flat[offset: offset + _nbytes(shape, dtype)].view(getattr(torch, dtype)).view(shape)))
    return out


@dataclass
class WeightBucket:
    layout: BucketLayout
    flat: torch.Tensor  # uint8, the tensors' bytes back to back (CPU)

    @property
    def names(self) -> list[str]:
        return self.layout.names

    @property
    def nbytes(self) -> int:
        return int(self.flat.numel())

    def to_wire(self) -> tuple[list[str], list[list[int]], list[str], bytes]:
        return (*self.layout.to_wire(), self.flat.cpu().numpy().tobytes())

    @classmethod
    def from_wire(cls, names, shapes, dtypes, data: bytes) -> "WeightBucket":
        return cls(BucketLayout.from_wire(names, shapes, dtypes), torch.frombuffer(bytearray(data), dtype=torch.uint8))


def plan_named(named: Iterable[tuple[str, torch.Tensor]],
               bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> tuple[list[BucketLayout], dict[str, torch.Tensor]]:
    """The bucket layouts of named tensors, and the tensors by name to pack them from."""
    tensors = dict(named)
    return plan_buckets(((n, t.shape, t.dtype) for n, t in tensors.items()), bucket_bytes), tensors


def pack_buckets(named: Iterable[tuple[str, torch.Tensor]],
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> Iterator[WeightBucket]:
    """Host-memory buckets of about `bucket_bytes` (the object-store transport)."""
    layouts, tensors = plan_named(named, bucket_bytes)
    for layout in layouts:
        yield WeightBucket(layout, pack(layout, [tensors[n] for n in layout.names], "cpu"))


def unpack_bucket(bucket: WeightBucket, device: torch.device | str | None = None) -> list[tuple[str, torch.Tensor]]:
    """Views into the bucket's buffer (moved to `device` once), one per tensor."""
    flat = bucket.flat if device is None else bucket.flat.to(device, non_blocking=True)
    return unpack(bucket.layout, flat)
