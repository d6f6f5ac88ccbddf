"""Several members in one torch.distributed world, each in its own tensor-parallel
DeepSpeed-Inference group (docs/design.md has the picture of one step).

Ranks are assigned to members in config order with the main member first: main gets ranks
0..tp0-1, the next member the following tp1 ranks, and so on. The first rank of each member is
its leader. Every rank loads every member's tokenizer (cheap) but only its own member's model,
so all ranks can commit text and finish rows identically from the broadcast tokens.

One step:
  control   rank 0 decides which prompts enter which slots; a msgpack message (never pickle)
            broadcast to every rank as uint8 bytes
  forward   every member group runs its forward pass (sharded: AutoTP all-reduces in-group)
  relative  each leader turns its logits into relative vectors r_i
  gather    all-gather of r_i over the leaders' group (B x |A| fp32 per member)
  search    the main leader aggregates and runs the inverse search
  broadcast chosen tokens + fused flags, from rank 0 to every rank
  resync    every rank commits the text and updates its own member's ids and KV cache
"""
from __future__ import annotations

import importlib
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta

import msgpack
import torch
import torch.distributed as dist

from .engine import Engine, Request
from .lanes import Lane


class LayoutError(ValueError):
    pass


@dataclass(frozen=True)
class Layout:
    names: tuple[str, ...]        # main first
    ranks: tuple[tuple[int, ...], ...]

    @property
    def world_size(self) -> int:
        return sum(len(r) for r in self.ranks)

    @property
    def leaders(self) -> list[int]:
        return [r[0] for r in self.ranks]

    def member_of(self, rank: int) -> int:
        return next(i for i, ranks in enumerate(self.ranks) if rank in ranks)

    def describe(self, rank: int) -> str:
        i = self.member_of(rank)
        role = "leader" if rank == self.ranks[i][0] else f"tp rank {self.ranks[i].index(rank)}"
        return f"rank {rank} (member {self.names[i]!r}, {role})"


def layout_for(config) -> Layout:
    names, ranks, start = [], [], 0
    for m in config.ordered_members:
        names.append(m.name)
        ranks.append(tuple(range(start, start + m.tp_size)))
        start += m.tp_size
    return Layout(tuple(names), tuple(ranks))


def check_world(layout: Layout, world_size: int):
    if world_size != layout.world_size:
        sizes = " + ".join(f"{n} tp_size {len(r)}" for n, r in zip(layout.names, layout.ranks))
        raise LayoutError(f"the world has {world_size} ranks but the config needs "
                          f"{layout.world_size} ({sizes}, main first)")


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

    @property
    def is_leader(self) -> bool:
        return self.rank == self.layout.ranks[self.member][0]

    @property
    def describe(self) -> str:
        return self.layout.describe(self.rank)


def init_world(layout: Layout, timeout_s: float) -> World:
    """The process groups: one per member, one for the leaders; every rank creates every group,
    in the same order."""
    import deepspeed
    disable_shm_allreduce()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))
    check_world(layout, dist.get_world_size())
    rank = dist.get_rank()
    member_groups = [dist.new_group(list(r)) for r in layout.ranks]
    leaders_group = dist.new_group(layout.leaders)
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return World(layout, rank, layout.member_of(rank), member_groups, leaders_group, device)


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
    except Exception as e:  # AutoTP has no policy for this architecture, or shapes don't split
        raise LayoutError(f"{world.describe}: DeepSpeed AutoTP could not shard "
                          f"{type(model).__name__} over tp_size {tp}: {e}") from e
    if tp == 1 and any(len(r) > 1 for r in world.layout.ranks):
        from deepspeed.accelerator import get_accelerator
        state = get_accelerator().get_rng_state()
        dist.broadcast(state, 0)
    return engine.module


# ---- control messages ---------------------------------------------------------------------

def broadcast_message(message: dict | None, src: int = 0) -> dict:
    """msgpack bytes in a uint8 tensor: the length first, then the bytes (never pickle)."""
    if dist.get_rank() == src:
        payload = msgpack.packb(message, use_bin_type=True)
        size = torch.tensor([len(payload)], dtype=torch.long)
    else:
        size = torch.zeros(1, dtype=torch.long)
    dist.broadcast(size, src)
    data = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if dist.get_rank() == src \
        else torch.empty(int(size), dtype=torch.uint8)
    dist.broadcast(data, src)
    return msgpack.unpackb(data.numpy().tobytes(), raw=False)


def gather_messages(message: dict) -> list[dict]:
    """Every rank's message, on every rank (msgpack over all_gather, padded to the longest)."""
    payload = msgpack.packb(message, use_bin_type=True)
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([len(payload)], dtype=torch.long))
    longest = int(max(sizes))
    mine = torch.zeros(longest, dtype=torch.uint8)
    mine[:len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    parts = [torch.empty(longest, dtype=torch.uint8) for _ in sizes]
    dist.all_gather(parts, mine)
    return [msgpack.unpackb(t[:int(n)].numpy().tobytes(), raw=False) for t, n in zip(parts, sizes)]


# ---- the distributed engine ---------------------------------------------------------------

class DistributedEngine(Engine):
    """Engine whose members live on different ranks. Every rank runs `run` in lock-step; rank 0
    (the main member's leader) owns the queue of requests and the results."""

    def __init__(self, members, fuser, world: World, max_batch: int = 8):
        super().__init__(members, fuser, max_batch, lanes=[Lane(members[world.member])])
        self.world = world
        self.gathered_bytes = 0       # relative vectors gathered to each leader, summed over steps
        self.row_steps = 0            # rows x steps

    def breakdown(self) -> dict[str, float]:
        """Seconds per part on this rank: forward/prefill of its member, resync, control, and on
        leaders relative, gather, (main) search, broadcast."""
        return dict(self.seconds)

    def admit_from(self, waiting: list[Request] | None) -> bool:
        """Rank 0 decides admissions and broadcasts them. Returns False when the job is over."""
        if self.world.rank == 0:
            free = sum(r is None for r in self.slots) + self.max_batch - len(self.slots)
            take = waiting[:free]
            del waiting[:len(take)]
            running = any(r is not None for r in self.slots)
            message = {"admit": [[r.id, r.prompt, r.max_new_tokens, list(r.stop), r.extra] for r in take],
                       "done": not take and not running, "drop": not waiting}
        else:
            message = None
        message = self._timed("control", broadcast_message, message)
        if message["done"]:
            return False
        requests = [Request(i, p, n, tuple(s), e) for i, p, n, s, e in message["admit"]]
        if requests:
            self.admit(requests)
        if message["drop"]:
            self.drop_free_slots()
        return True

    def step(self):
        active = [i for i, r in enumerate(self.slots) if r is not None]
        rows = [self.slots[i] for i in active]
        lane = self.lanes[0]
        w = self.world
        tokens = torch.zeros(2, len(active), dtype=torch.long)
        if w.is_leader:
            logits = lane.logits[active]
            t0 = time.perf_counter()
            r_i, _ = self.fuser.member_relative(w.member, logits)
            self.seconds["relative"] += time.perf_counter() - t0
            gathered = [torch.empty_like(r_i) for _ in w.layout.leaders]
            t0 = time.perf_counter()
            dist.all_gather(gathered, r_i.contiguous(), group=w.leaders_group)
            self.seconds["gather"] += time.perf_counter() - t0
            self.gathered_bytes += sum(g.numel() * g.element_size() for g in gathered)
            self.row_steps += len(active)
            if w.member == 0:
                t0 = time.perf_counter()
                skip = self.skip_mask(rows, logits)
                fuse = self.fuser.rows_to_fuse(logits, skip)
                r = None
                if fuse.any():
                    r = sum(wt * g[fuse] for wt, g in zip(self.fuser.weights, gathered))
                result = self.fuser.decide(logits, r, fuse)
                tokens[0], tokens[1] = result.tokens, result.fused.long()
                self.seconds["search"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        dist.broadcast(tokens, 0)
        self.seconds["broadcast"] += time.perf_counter() - t0
        self.steps += 1
        finished, keep_slots, texts = self.commit(active, tokens[0].tolist(), tokens[1].bool().tolist())
        if w.member == 0:  # the main member keeps its own ids; only assists resync from the text
            pending = self._timed("resync", lane.append, keep_slots, [self.slots[s].ids[-1] for s in keep_slots])
        else:
            pending = self._timed("resync", lane.sync, keep_slots, texts)
        if keep_slots:
            self._timed(f"forward:{lane.member.name}", lane.forward, keep_slots, pending)
        return finished

    def run(self, requests, on_result=None):
        waiting = list(requests) if self.world.rank == 0 else None
        results = []
        while self.admit_from(waiting):
            for result in self.step():
                if self.world.rank == 0:
                    results.append(result)
                    if on_result is not None:
                        on_result(result)
        return results


# ---- failure reports ----------------------------------------------------------------------

class Heartbeat:
    """Liveness of the ranks, through the job's rendezvous store (hosted by rank 0).

    A thread on every rank bumps its own counter every `every` seconds and watches the others'
    counters (counters, not timestamps: hosts' clocks differ). A rank whose counter has not moved
    for `stale` seconds is declared dead: `on_dead` is called (the runner prints who and exits),
    even when the main thread is stuck in a collective. When a collective fails, `identify`
    watches a few more seconds to name the rank that stopped beating."""

    def __init__(self, world: World, every: float = 0.25, stale: float = 10.0, on_dead=None):
        import threading
        self.world, self.every, self.stale = world, every, stale
        self.on_dead = on_dead
        self.store = dist.distributed_c10d._get_default_store()
        self.seen: dict[int, tuple[int, float]] = {}   # rank -> (last counter, when it changed)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)
        self.thread.start()

    def _beat(self):
        count = 0
        while not self.stop.is_set():
            try:
                count += 1
                self.store.set(f"deepen/beat/{self.world.rank}", str(count))
                dead = self.quiet(self.stale)
            except Exception:  # the store's host, rank 0, is gone
                dead = f"{self.world.layout.describe(0)} is unreachable (it hosts the job's store)"
            if dead and self.on_dead is not None and not self.stop.is_set():
                self.on_dead(dead)
                return
            self.stop.wait(self.every)

    def close(self):
        self.stop.set()
        self.thread.join(timeout=5 * self.every + 1)

    def quiet(self, stale: float) -> str:
        with self.lock:
            now = time.monotonic()
            names = []
            for rank in range(self.world.layout.world_size):
                key = f"deepen/beat/{rank}"
                if rank == self.world.rank or not self.store.check([key]):
                    continue
                value = int(self.store.get(key))
                last, since = self.seen.get(rank, (None, now))
                if value != last:
                    self.seen[rank] = (value, now)
                elif now - since > stale:
                    names.append(self.world.layout.describe(rank))
            return ("no heartbeat from " + "; ".join(names)) if names else ""

    def identify(self, wait: float = 4.0, stale: float = 1.5) -> str:
        """After a failed collective: who stopped beating (watching up to `wait` seconds)."""
        deadline = time.monotonic() + wait
        try:
            while time.monotonic() < deadline:
                found = self.quiet(stale)
                if found:
                    return found
                time.sleep(self.every)
            return "every other rank is still beating (a stalled or failed collective?)"
        except Exception:
            return f"{self.world.layout.describe(0)} is unreachable (it hosts the job's store)"
