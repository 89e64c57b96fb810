"""How learner rank 0's full parameters reach every rollout engine after an optimizer step.

Three transports behind one `push(named, rollouts, version) -> SyncStats`:

- `CollectiveWeightSync` (default): a broadcast group of its own between learner rank 0 and every
  vLLM worker of every rollout actor: NCCL on GPU, gloo on CPU. It is built with vLLM's stateless
  process-group helper, so it lives beside (not inside) the learner's DeepSpeed world and the
  engines' own groups. The bucket layouts travel through Ray (a few KB); the bytes go through the
  group, bucket by bucket, straight into a buffer the receiving worker allocated on its device.
- `CudaIpcWeightSync`: learner and engine share one GPU (colocated mode), where NCCL refuses two
  ranks on one device. Rank 0 packs a bucket on the GPU and hands the engine a CUDA IPC handle to
  it; the engine's worker copies from that memory directly: device-to-device, no host hop.
- `ObjectStoreWeightSync`: buckets packed in host memory, one `ray.put`, read by every actor.
  Needs nothing but Ray: the fallback for rollouts no group can reach.

Every receiver loads through `LatentWorkerExtension.bucket_update_*`: in place where the kernels keep
the checkpoint layout (unquantized, CUDA), else through vLLM's layerwise reload, so kernels that
repack weights after loading see checkpoint-format tensors. A restarted rollout
actor has lost its group membership; `CollectiveWeightSync` notices (each actor reports the token
of the group it joined) and forms a new group before it sends.
"""

from __future__ import annotations

import pickle
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Protocol, Sequence, get_args

import torch

from fourdthinker.weights import BucketLayout, pack, pack_buckets, plan_named

TransportName = Literal["auto", "collective", "cuda_ipc", "object_store"]
TRANSPORTS: tuple[str, ...] = get_args(TransportName)


@dataclass
class SyncStats:
    bytes: int
    seconds: float
    num_buckets: int
    # the slowest receiver's split: buckets in (transfer + load) and the close (reload end, caches)
    receiver_load_s: float = float("nan")
    receiver_finish_s: float = float("nan")
    # finer split: "sender/<phase>" on learner rank 0, "receiver/<phase>" of that slowest receiver
    # (`RolloutWorker.finish_weight_update`'s "phases")
    phases: dict[str, float] = field(default_factory=dict)


class WeightSync(Protocol):
    def push(self, named: Iterable[tuple[str, torch.Tensor]], rollouts: Sequence[Any], version: int) -> SyncStats:
        ...


def _stats(receipts: Sequence[dict], version: int, nbytes: int, start: float, num_buckets: int,
           sender: dict[str, float] | None = None) -> SyncStats:
    """Check every rollout took `version`; the sync's figures with the slowest receiver's split."""
    versions = [r["version"] for r in receipts]
    if any(v != version for v in versions):
        raise RuntimeError(f"rollout actors report weight versions {versions}, expected {version}")
    slowest = max(receipts, key=lambda r: r["load_s"] + r["finish_s"])
    return SyncStats(nbytes, time.perf_counter() - start, num_buckets,
                     max(r["load_s"] for r in receipts), max(r["finish_s"] for r in receipts),
                     {**{f"sender/{k}": v for k, v in (sender or {}).items()},
                      **{f"receiver/{k}": v for k, v in slowest.get("phases", {}).items()}})


# -- process groups of their own ---------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def open_group(host: str, port: int, rank: int, world_size: int, backend: str):
    """A torch ProcessGroup outside the global torch.distributed state (vLLM's stateless helper),
    so a process that already belongs to a DeepSpeed world or a vLLM engine can join it too."""
    from vllm.distributed.utils import stateless_init_torch_distributed_process_group

    return stateless_init_torch_distributed_process_group(host, port, rank, world_size, backend)


def broadcast_async(group, tensor: torch.Tensor, src: int = 0):
    """Start a broadcast on a stateless group; returns its work (`.wait()` orders the current stream,
    or on CPU the host, after it). `torch.distributed.broadcast` maps `src` through the global
    ranks, which such a group has none of, so call the ProcessGroup itself."""
    opts = torch.distributed.BroadcastOptions()
    opts.rootRank = src
    opts.rootTensor = 0
    return group.broadcast([tensor], opts)


def broadcast(group, tensor: torch.Tensor, src: int = 0) -> None:
    broadcast_async(group, tensor, src).wait()


def _mark(cuda: bool):
    """A point in time: a CUDA event recorded on the current stream, or the host clock."""
    if not cuda:
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _seconds(a, b) -> float:
    return a.elapsed_time(b) / 1e3 if isinstance(a, torch.cuda.Event) else b - a


def receive_buckets(group, layouts: Sequence[BucketLayout], device: torch.device, load) -> dict[str, float]:
    """Receiver side of `CollectiveWeightSync`: per layout, a buffer on `device`, the broadcast into
    it, and `load(layout, flat)` (a `ReplayingLoader`). Returns the bytes received and the seconds spent
    in the broadcasts (waiting for the sender included) and in loading.

    On a GPU each load runs on a side stream: a broadcast waits for the current stream only, so the
    next bucket's transfer overlaps this bucket's copies, and the host never waits between buckets
    (the split comes from CUDA events; one synchronize at the end). The two sums can then exceed
    the wall time."""
    cuda = device.type == "cuda"
    loading = torch.cuda.Stream(device) if cuda else None
    total, marks = 0, []
    for layout in layouts:
        start = _mark(cuda)
        flat = torch.empty(layout.total_bytes, dtype=torch.uint8, device=device)
        broadcast(group, flat)
        received = _mark(cuda)
        if cuda:
            loading.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(loading):
                load(layout, flat)
                flat.record_stream(loading)  # its memory is reused only once the copies have read it
                loaded = _mark(cuda)
        else:
            load(layout, flat)
            loaded = _mark(cuda)
        marks.append((start, received, loaded))
        total += flat.numel()
    if cuda:
        torch.cuda.synchronize(device)
    return {"bytes": float(total), "transfer_s": sum(_seconds(a, b) for a, b, _ in marks),
            "load_s": sum(_seconds(b, c) for _, b, c in marks)}


# -- the transports ----------------------------------------------------------------------------------
class ObjectStoreWeightSync:
    """Bucketed copies through the Ray object store: packed once, `ray.put` once, read by every
    rollout actor (no per-tensor round trips, one object for all receivers)."""

    def __init__(self, bucket_bytes: int):
        self.bucket_bytes = bucket_bytes

    def push(self, named, rollouts, version):
        import ray

        start = time.perf_counter()
        buckets = list(pack_buckets(named, self.bucket_bytes))
        ref = ray.put(buckets)
        receipts = ray.get([r.update_weights.remote(ref, version) for r in rollouts])
        return _stats(receipts, version, sum(b.nbytes for b in buckets), start, len(buckets))


class CollectiveWeightSync:
    """Broadcast from learner rank 0 to every rollout worker over a group of their own."""

    def __init__(self, bucket_bytes: int, device: torch.device):
        self.bucket_bytes = bucket_bytes
        self.device = torch.device(device)
        self.backend = "nccl" if self.device.type == "cuda" else "gloo"
        self.group = None
        self.token: str | None = None
        self.members: tuple = ()

    def _ensure_group(self, rollouts: Sequence[Any], token_refs: list | None = None) -> None:
        """(Re)form the group when the receivers changed or one of them lost it (a restart).
        `token_refs`: the receivers' `weight_group_token` calls, if already in flight."""
        import ray

        members = tuple(r._actor_id.hex() for r in rollouts)
        tokens = ray.get(token_refs or [r.weight_group_token.remote() for r in rollouts])
        if self.group is not None and members == self.members and all(t == self.token for t in tokens):
            return
        self.group = None
        token = uuid.uuid4().hex
        receivers = ray.get([r.num_weight_receivers.remote() for r in rollouts])
        offsets = [1 + sum(receivers[:i]) for i in range(len(rollouts))]
        world_size = 1 + sum(receivers)
        host, port = ray.util.get_node_ip_address(), free_port()
        joined = [r.join_weight_group.remote(host, port, offset, world_size, self.backend, token)
                  for r, offset in zip(rollouts, offsets)]
        self.group = open_group(host, port, 0, world_size, self.backend)
        ray.get(joined)
        self.token, self.members = token, members

    def push(self, named, rollouts, version):
        import ray

        start = time.perf_counter()
        tokens = [r.weight_group_token.remote() for r in rollouts]  # asked while the layouts are planned
        layouts, tensors = plan_named(named, self.bucket_bytes)
        planned = time.perf_counter()
        self._ensure_group(rollouts, tokens)
        checked = time.perf_counter()
        received = [r.receive_weights.remote([layout.to_wire() for layout in layouts], version) for r in rollouts]
        sender = {"plan_s": planned - start, "check_s": checked - planned,
                  "issue_s": time.perf_counter() - checked, "pack_s": 0.0, "send_s": 0.0}
        nbytes, in_flight = 0, []
        for layout in layouts:
            t0 = time.perf_counter()
            flat = pack(layout, [tensors[n] for n in layout.names], self.device)
            t1 = time.perf_counter()
            # The next bucket packs while this one's broadcast runs (a wait orders the current
            # stream after the previous broadcast only): one extra bucket of memory.
            in_flight.append((broadcast_async(self.group, flat), flat))
            if len(in_flight) > 1:
                in_flight.pop(0)[0].wait()
            sender["pack_s"] += t1 - t0
            sender["send_s"] += time.perf_counter() - t1
            nbytes += flat.numel()
        for work, _ in in_flight:
            work.wait()
        t2 = time.perf_counter()
        receipts = ray.get(received)
        sender["wait_s"] = time.perf_counter() - t2
        return _stats(receipts, version, nbytes, start, len(layouts), sender)

    def probe(self, rollouts: Sequence[Any], nbytes: int, bucket_bytes: int | None = None) -> float:
        """Seconds for a plain broadcast of `nbytes` (in buckets of `bucket_bytes`) over the same
        group, nothing packed or loaded: the interconnect's own figure, to compare a sync with."""
        import ray

        self._ensure_group(rollouts)
        size = bucket_bytes or self.bucket_bytes
        sizes = [min(size, nbytes - o) for o in range(0, nbytes, size)]
        buffers = [torch.empty(s, dtype=torch.uint8, device=self.device) for s in sizes]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        received = [r.probe_weight_group.remote(sizes) for r in rollouts]
        for buf in buffers:
            broadcast(self.group, buf)
        ray.get(received)
        return time.perf_counter() - start


class CudaIpcWeightSync:
    """Same-GPU transport: each bucket is packed on the GPU once and mapped by every engine's worker
    through a CUDA IPC handle. One bucket is in flight at a time, so the extra memory is one bucket."""

    def __init__(self, bucket_bytes: int, device: torch.device):
        if torch.device(device).type != "cuda":
            raise ValueError("weight_sync=cuda_ipc needs the learner on a GPU")
        self.bucket_bytes = bucket_bytes
        self.device = torch.device(device)

    def push(self, named, rollouts, version):
        import ray
        from torch.multiprocessing.reductions import reduce_tensor

        start = time.perf_counter()
        layouts, tensors = plan_named(named, self.bucket_bytes)
        t0 = time.perf_counter()
        ray.get([r.begin_weight_update.remote(list(tensors)) for r in rollouts])
        sender = {"plan_s": t0 - start, "begin_s": time.perf_counter() - t0, "pack_s": 0.0, "load_s": 0.0}
        nbytes = 0
        for layout in layouts:
            t0 = time.perf_counter()
            flat = pack(layout, [tensors[n] for n in layout.names], self.device)
            torch.cuda.synchronize(self.device)  # the bytes are there before another process reads them
            _, args = reduce_tensor(flat)
            handle = pickle.dumps(args)
            t1 = time.perf_counter()
            ray.get([r.load_bucket_ipc.remote(layout.to_wire(), handle) for r in rollouts])
            sender["pack_s"] += t1 - t0
            sender["load_s"] += time.perf_counter() - t1
            nbytes += flat.numel()
            del flat  # the receivers have copied out of it
        t0 = time.perf_counter()
        receipts = ray.get([r.finish_weight_update.remote(version) for r in rollouts])
        torch.cuda.ipc_collect()  # give back the blocks other processes mapped
        sender["finish_s"] = time.perf_counter() - t0
        return _stats(receipts, version, nbytes, start, len(layouts), sender)


def open_ipc_bucket(handle: bytes, device: torch.device) -> torch.Tensor:
    """Receiver side of `CudaIpcWeightSync`: the sender's bucket buffer, mapped on this process's
    view of the same GPU (device indices differ between processes, the memory does not)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    args = list(pickle.loads(handle))
    args[6] = device.index if device.index is not None else torch.cuda.current_device()
    return rebuild_cuda_tensor(*args)


def resolve_transport(name: TransportName, device: torch.device, colocated: bool) -> str:
    """`auto`: CUDA IPC for a learner sharing its GPU with the engines, else the collective group."""
    if name == "auto":
        return "cuda_ipc" if colocated and torch.device(device).type == "cuda" else "collective"
    return name


def make_weight_sync(name: TransportName, bucket_bytes: int, device: torch.device, colocated: bool) -> WeightSync:
    name = resolve_transport(name, device, colocated)
    if name == "collective":
        return CollectiveWeightSync(bucket_bytes, device)
    if name == "cuda_ipc":
        return CudaIpcWeightSync(bucket_bytes, device)
    if name == "object_store":
        return ObjectStoreWeightSync(bucket_bytes)
    raise ValueError(f"weight_sync: one of {TRANSPORTS}, got {name!r}")
