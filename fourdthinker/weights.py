"""Weights in flight: named tensors packed into a few flat buckets, and back.

A weight sync moves a whole model every RL step. Sending tensor by tensor costs one round trip
(and one RPC into every vLLM worker) per parameter; packing them into ~hundreds-of-MB byte buffers
makes it a handful of large copies, which is what the interconnect is good at.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

DEFAULT_BUCKET_BYTES = 256 * 1024 * 1024
# Each tensor starts at a multiple of this many bytes, so it can be viewed in place as any dtype.
ALIGN = 16


@dataclass
class WeightBucket:
    names: list[str]
    shapes: list[tuple[int, ...]]
    dtypes: list[str]  # torch dtype names, e.g. "float32"
    flat: torch.Tensor  # uint8, the tensors' bytes back to back

    @property
    def nbytes(self) -> int:
        return int(self.flat.numel())

    def to_wire(self) -> tuple[list[str], list[list[int]], list[str], bytes]:
        """Plain Python values: what any RPC layer (vLLM's msgpack included) carries unchanged."""
        return self.names, [list(s) for s in self.shapes], self.dtypes, self.flat.numpy().tobytes()

    @classmethod
    def from_wire(cls, names, shapes, dtypes, data: bytes) -> "WeightBucket":
        flat = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return cls(list(names), [tuple(s) for s in shapes], list(dtypes), flat)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def pack_buckets(named: Iterable[tuple[str, torch.Tensor]],
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> Iterator[WeightBucket]:
    """Group tensors (in order) into buckets of about `bucket_bytes`; a larger tensor gets its own."""
    batch: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named:
        nbytes = _aligned(tensor.numel() * tensor.element_size())
        if batch and size + nbytes > bucket_bytes:
            yield _pack(batch)
            batch, size = [], 0
        batch.append((name, tensor))
        size += nbytes
    if batch:
        yield _pack(batch)


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _pack(batch: list[tuple[str, torch.Tensor]]) -> WeightBucket:
    sizes = [t.numel() * t.element_size() for _, t in batch]
    flat = torch.zeros(sum(_aligned(n) for n in sizes), dtype=torch.uint8)
    offset = 0
    for (_, t), n in zip(batch, sizes):
        flat[offset: offset + n] = t.detach().contiguous().reshape(-1).view(torch.uint8).cpu()
        offset += _aligned(n)
    return WeightBucket([n for n, _ in batch], [tuple(t.shape) for _, t in batch],
                        [_dtype_name(t.dtype) for _, t in batch], flat)


def unpack_bucket(bucket: WeightBucket, device: torch.device | str | None = None) -> list[tuple[str, torch.Tensor]]:
    """Views into the bucket's buffer (moved to `device` once), one per tensor."""
    flat = bucket.flat if device is None else bucket.flat.to(device, non_blocking=True)
    out, offset = [], 0
    for name, shape, dtype in zip(bucket.names, bucket.shapes, bucket.dtypes):
        dt = getattr(torch, dtype)
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dt).element_size()
        out.append((name, flat[offset: offset + nbytes].view(dt).view(shape)))
        offset += _aligned(nbytes)
    return out
