"""Weight buckets: a model's tensors travel in a few flat buffers and come back bit-exact."""

from __future__ import annotations

import torch

from fourdthinker.weights import WeightBucket, pack_buckets, unpack_bucket


def test_pack_then_unpack_is_bit_exact_and_respects_the_bucket_size():
    g = torch.Generator().manual_seed(0)
    named = [(f"w{i}", torch.randn(7, 3 + i, generator=g)) for i in range(6)]
    named.append(("half", torch.randn(5, generator=g).to(torch.bfloat16)))
    named.append(("ids", torch.arange(4)))
    bucket_bytes = 200
    buckets = list(pack_buckets(named, bucket_bytes=bucket_bytes))
    assert len(buckets) > 1
    for b in buckets:  # a bucket only exceeds the size when it holds one large tensor
        assert b.nbytes <= bucket_bytes or len(b.names) == 1
    back = [pair for b in buckets for pair in unpack_bucket(WeightBucket.from_wire(*b.to_wire()))]
    assert [n for n, _ in back] == [n for n, _ in named]
    for (_, a), (_, b) in zip(named, back):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
