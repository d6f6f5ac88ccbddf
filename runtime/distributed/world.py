"""Several members in one torch.distributed world, each in its own tensor-parallel
DeepSpeed-Inference group (docs/design.md has the picture of one step).

Ranks are assigned to members in config order with the main member first: main gets ranks
0..tp0-1, the next member the following tp1 ranks, and so on. The first rank of each member is
its leader. Every rank loads every member's tokenizer (cheap) but only its own member's model,
so all ranks can commit text and finish rows identically from the broadcast tokens. What a step
sends between ranks is runtime/distributed/exchange.py.
"""
from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist



class LayoutError(ValueError):
    pass


@dataclass(frozen=True)
class Layout:
    """One replica's ranks per member (global ranks); a world of k x `size` ranks runs k
    independent replicas of the ensemble, replica r on ranks r*size .. (r+1)*size - 1."""
    names: tuple[str, ...]        # main first
    ranks: tuple[tuple[int, ...], ...]
    replica: int = 0
    replicas: int = 1

    @property
    def size(self) -> int:
        """Ranks of one replica."""
        return sum(len(r) for r in self.ranks)

    @property
    def world_size(self) -> int:
        return self.size * self.replicas

    @property
    def leaders(self) -> list[int]:
        return [r[0] for r in self.ranks]

    @property
    def root(self) -> int:
        """The replica's main leader: it schedules, fuses and decides the replica's tokens."""
        return self.ranks[0][0]

    def for_replica(self, replica: int, replicas: int | None = None) -> "Layout":
        shift = (replica - self.replica) * self.size
        return Layout(self.names, tuple(tuple(r + shift for r in rs) for rs in self.ranks), replica,
                      self.replicas if replicas is None else replicas)

    def member_of(self, rank: int) -> int:
        """The member index of a rank of any replica."""
        local, start = rank % self.size, self.ranks[0][0]
        return next(i for i, ranks in enumerate(self.ranks) if local in (r - start for r in ranks))

    def describe(self, rank: int) -> str:
        i = self.member_of(rank)
        local = [r - self.ranks[0][0] for r in self.ranks[i]]
        role = "leader" if rank % self.size == local[0] else f"tp rank {local.index(rank % self.size)}"
        where = f", replica {rank // self.size}" if self.replicas > 1 else ""
        return f"rank {rank} (member {self.names[i]!r}, {role}{where})"


def local_world_size() -> int:
    """Ranks on this node, from whichever launcher started us: deepspeed (LOCAL_SIZE), torchrun
    (LOCAL_WORLD_SIZE), Open MPI, MVAPICH or SLURM; 1 when none says."""
    for key in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE",
                "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(key, "").split("(")[0]  # SLURM may say "4(x2)"
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def global_rank() -> int:
    """This process's rank, before the world exists (deepspeed/torchrun, Open MPI, SLURM)."""
    for key in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def threads_per_rank(threads: int | None = None) -> int:
    """torch threads for one rank: `threads` if given, else this node's cores shared among its
    ranks (so two ranks on two cores do not each start two threads)."""
    return threads or max(1, (os.cpu_count() or 1) // local_world_size())


def layout_for(config) -> Layout:
    names, ranks, start = [], [], 0
    for m in config.ordered_members:
        names.append(m.name)
        ranks.append(tuple(range(start, start + m.tp_size)))
        start += m.tp_size
    return Layout(tuple(names), tuple(ranks))


def check_world(layout: Layout, world_size: int) -> int:
    """The number of replicas: the world must be a multiple of the ensemble's ranks."""
    if world_size < layout.size or world_size % layout.size:
        sizes = " + ".join(f"{n} tp_size {len(r)}" for n, r in zip(layout.names, layout.ranks))
        raise LayoutError(f"the world has {world_size} ranks but the config needs "
                          f"{layout.size} ({sizes}, main first), or a multiple of it (replicas)")
    return world_size // layout.size


def disable_shm_allreduce():
    """On CPU, DeepSpeed's shared-memory all-reduce is initialised with the world and ignores
    process groups: with two members on disjoint groups it silently returns wrong logits. Replace
    its builder before `deepspeed.init_distributed()`, so inference all-reduces go through the
    process group (see ../shared/spec/DISTRIBUTED-NOTES.md)."""
    module = sys.modules.get("deepspeed.comm.torch") or importlib.import_module("deepspeed.comm.torch")
    module.build_shm_op = lambda: None


class GroupMPU:
    """The `mpu` DeepSpeed-Inference asks for: without one it replaces the group we give it with
    ranks 0..tp-1 and caches that on the class, so every member would land on the same ranks."""

    def __init__(self, group):
        self.group = group

    def get_model_parallel_group(self):
        return self.group

    def get_model_parallel_rank(self):
        return dist.get_rank(group=self.group)

    def get_model_parallel_world_size(self):
        return dist.get_world_size(group=self.group)


@dataclass
class World:
    layout: Layout
    rank: int
    member: int                   # index of this rank's member (0 = main)
    member_groups: list
    leaders_group: object
    device: torch.device
    replica_group: object = None  # this replica's ranks (None: the whole world, one replica)

    @property
    def is_leader(self) -> bool:
        return self.rank == self.layout.ranks[self.member][0]

    @property
    def describe(self) -> str:
        return self.layout.describe(self.rank)


def local_rank() -> int | None:
    """This process's index on its node, from the launcher (deepspeed/torchrun LOCAL_RANK, Open
    MPI, MVAPICH, SLURM); None when no launcher says."""
    for key in ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return None


def rank_device(cuda: bool | None = None) -> torch.device:
    """A rank's device: cuda:LOCAL_RANK where CUDA is present (LOCAL_RANK is then required: a
    default of 0 would put every rank of a node on one GPU), else the CPU."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not cuda:
        return torch.device("cpu")
    local = local_rank()
    if local is None:
        raise LayoutError("CUDA is present but the launcher set no LOCAL_RANK (nor OMPI_COMM_WORLD_LOCAL_RANK, "
                          "MV2_COMM_WORLD_LOCAL_RANK, SLURM_LOCALID): start the job with `deepspeed` or "
                          "`torchrun`, or set LOCAL_RANK for each process")
    if local >= torch.cuda.device_count():
        raise LayoutError(f"LOCAL_RANK {local} but this node has {torch.cuda.device_count()} visible GPUs "
                          "(CUDA_VISIBLE_DEVICES): one rank per GPU")
    return torch.device("cuda", local)


def connect(timeout_s: float) -> torch.device:
    """The default process group (the whole world), with torch alone: started from the
    launcher's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so that the ranks can
    agree on start-up problems (runtime/distributed/startup.py) even on a host whose DeepSpeed is
    missing. A launcher that sets none of them (Open MPI, SLURM without torchrun) is left to
    DeepSpeed's discovery in `init_world`. With CUDA the world is `cpu:gloo,cuda:nccl`: tensors
    on a GPU go over NCCL, the msgpack control bytes (CPU tensors) over gloo, in the same groups."""
    device = rank_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before any CUDA work (NCCL: one GPU per rank)
    if not dist.is_initialized() and all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=timeout_s), init_method="env://")
    return device


def init_world(layout: Layout, timeout_s: float) -> World:
    """The process groups: one per member, one for the leaders; every rank creates every group,
    in the same order. DeepSpeed adopts the world `connect` started (or starts it itself)."""
    import deepspeed
    disable_shm_allreduce()
    device = connect(timeout_s)
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    replicas = check_world(layout, dist.get_world_size())
    rank = dist.get_rank()
    # every rank creates every replica's groups, in the same order; new_group does not inherit
    # the world's timeout: give it to every group
    mine = None
    for r in range(replicas):
        rl = layout.for_replica(r, replicas)
        member_groups = [dist.new_group(list(ranks), timeout=timeout) for ranks in rl.ranks]
        leaders_group = dist.new_group(rl.leaders, timeout=timeout)
        replica_group = dist.new_group(list(range(rl.root, rl.root + rl.size)), timeout=timeout) \
            if replicas > 1 else None
        if rank // layout.size == r:
            mine = World(rl, rank, rl.member_of(rank), member_groups, leaders_group, device, replica_group)
    return mine


def shard_member(model, world: World, dtype: torch.dtype):
    """Wrap this rank's member with DeepSpeed-Inference AutoTP over its own group (tp = 1
    included). With any tp > 1 member, DeepSpeed broadcasts an RNG state over the *world* during
    init_inference: ranks of tp = 1 members post the same broadcast so nobody waits forever."""
    import deepspeed
    group = world.member_groups[world.member]
    tp = len(world.layout.ranks[world.member])
    try:
        engine = deepspeed.init_inference(
            model, tensor_parallel={"tp_size": tp, "tp_group": group, "mpu": GroupMPU(group)},
            dtype=dtype, replace_with_kernel_inject=False)
    except Exception as e:  # noqa: BLE001 - said for what it is (init_inference_error)
        raise init_inference_error(e, world.describe, type(model).__name__, tp) from e
    if tp == 1 and any(len(r) > 1 for r in world.layout.ranks):
        from deepspeed.accelerator import get_accelerator  # the same tensor DeepSpeed sends
        state = get_accelerator().get_rng_state().to(get_accelerator().current_device_name())
        dist.broadcast(state, 0)
    return engine.module



def init_inference_error(error: BaseException, who: str, model: str, tp: int) -> Exception:
    """What went wrong in `deepspeed.init_inference`, said for what it is: out of memory, a
    collective that failed (another rank stopped; NCCL), AutoTP unable to split this model, or
    anything else under its own name. Only the third is about the model's shapes."""
    text = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300] if str(error).strip() else ''}"
    lower = str(error).lower()
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in lower \
            or "can't allocate memory" in lower:
        return MemoryError(f"{who}: out of memory while DeepSpeed-Inference placed {model} (tp_size {tp}) on its "
                           f"device: {text}")
    dist_errors = tuple(e for e in (getattr(dist, "DistError", None),) if e)
    if isinstance(error, dist_errors) or any(w in lower for w in ("nccl", "gloo", "connection", "peer", "timed out",
                                                                  "broken pipe")):
        return RuntimeError(f"{who}: a collective failed while DeepSpeed-Inference sharded {model} over tp_size "
                            f"{tp} (a rank of the world stopped, or the network between them failed): {text}")
    if isinstance(error, (AssertionError, NotImplementedError, ValueError, KeyError, IndexError, AttributeError,
                          TypeError)):
        return LayoutError(f"{who}: DeepSpeed AutoTP could not shard {model} over tp_size {tp}: {text}")
    return RuntimeError(f"{who}: DeepSpeed-Inference failed on {model} (tp_size {tp}): {text}")
