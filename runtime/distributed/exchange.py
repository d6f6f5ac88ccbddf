"""What crosses between ranks in one decoding step: the distributed side of `Fuser.step`.

Per step, in order (B = rows in the batch, |A| = anchors):
  control   rank 0's admission plan, msgpack bytes (never pickle) broadcast to every rank,
            only when it changes something (new prompts, dropped slots, the end)
  keys      (only with skip_agreeing) each leader's argmax as an anchor column (B int64),
            gathered to the main leader before it picks the rows
  rows      the main leader's fuse mask (B bytes), broadcast over the leaders' group
  gather    each leader's relative vectors for the fused rows + fast mode's neglected mass,
            (F x (|A| + 1)) fp32, gathered to the main leader
  tokens    the chosen tokens and fused flags (2 x B int64), broadcast from the root to every rank
With split_fusion (fast mode, several leaders; deepen/split.py) rows and gather become:
  rows      each row's owner among the leaders (B bytes), broadcast over the leaders' group
  gather    each leader's member's summaries of the fused rows (F x at most 5k + C + 1 fp32,
            k = max_support, C = clusters), all-gathered: every leader gets every member's
  merge     each owner's (token, neglected mass per member) rows, summed onto the main leader
The step's phases (deepen/protocol.py) group these: begin = keys, rows/owners, summaries;
finish = gather or merge, tokens. Pipelined (engine/pipeline.py), one micro-batch's begin comes
right before another's finish; every rank calls them in the same order.
With replicas, all of this stays inside one replica: its root (main leader) plays rank 0's part.
Ranks of a tensor-parallel member that are not its leader take part in control and tokens only.
The control bytes are CPU tensors (gloo); the rest stays on the rank's device (NCCL on GPUs).
"""
from __future__ import annotations

from contextlib import nullcontext

import msgpack
import torch
import torch.distributed as dist

from ..deepen.protocol import StepResult
from ..engine.scheduler import Plan
from ..engine.sequence import Request


def broadcast_message(message: dict | None, src: int = 0, group=None) -> dict:
    """msgpack bytes in a uint8 tensor: the length first, then the bytes (never pickle).
    `src` is a global rank; `group` (default: the world) must hold it."""
    if dist.get_rank() == src:
        payload = msgpack.packb(message, use_bin_type=True)
        size = torch.tensor([len(payload)], dtype=torch.long)
    else:
        size = torch.zeros(1, dtype=torch.long)
    dist.broadcast(size, src, group=group)
    data = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if dist.get_rank() == src \
        else torch.empty(int(size), dtype=torch.uint8)
    dist.broadcast(data, src, group=group)
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


class GroupExchange:
    """The exchange of a rank in a World (runtime/distributed/world.py)."""

    def __init__(self, world, phase=None):
        self.world = world
        self.device = world.device
        self.phase = phase or (lambda name: nullcontext())  # the heartbeat: which collective we wait in
        self.root = world.layout.root      # the replica's main leader (rank 0 with one replica)
        self.group = world.replica_group   # the replica's ranks (None: the world)
        self.is_root = world.rank == self.root
        self.leads = world.is_leader
        self.is_main = world.member == 0 and world.is_leader
        self.leaders = len(world.layout.leaders)
        self.position = world.member      # a leader's place among the leaders (member order)
        self.gathered_bytes = 0      # relative vectors received by the main leader, over the run
        self.row_steps = 0           # rows x steps

    def share_plan(self, plan: Plan | None) -> Plan:
        """Rank 0's plan, on every rank. A quiet step (engine/scheduler.py) sends one byte (the
        message's length is its flag)."""
        quiet = plan is not None and plan.quiet
        with self.phase("plan"):
            flag = torch.tensor([0 if quiet else 1], dtype=torch.uint8)
            dist.broadcast(flag, self.root, group=self.group)
            if (quiet if self.is_root else not int(flag)):   # the root knows its own flag: no read
                return plan if plan is not None else Plan([], False, False)
            message = None if plan is None else {"admit": [r.pack() for r in plan.admit], "drop": plan.drop,
                                                 "done": plan.done, "closes": plan.closes}
            message = broadcast_message(message, self.root, self.group)
        return Plan([Request.unpack(r) for r in message["admit"]], message["drop"], message["done"],
                    message["closes"])

    def foreseen_plan(self):
        """A plan every rank knows is quiet (engine/scheduler.py, Plans): nothing is sent, but
        the heartbeat counts the step, as every rank's does."""
        with self.phase("plan"):
            pass

    def share_rows(self, fuse: torch.Tensor | None, batch: int) -> torch.Tensor:
        """The main leader's fuse mask, on every leader."""
        if len(self.world.layout.leaders) == 1:
            return fuse
        mask = fuse.to(torch.uint8) if fuse is not None else torch.empty(batch, dtype=torch.uint8, device=self.device)
        with self.phase("rows"):
            dist.broadcast(mask, self.root, group=self.world.leaders_group)
        return mask.bool()

    def share_owners(self, owner: torch.Tensor | None, batch: int) -> torch.Tensor:
        """The main leader's owner of each row (split_fusion; deepen/split.py's codes: a leader's
        position, NOT_FUSED or PLAIN, all >= -2), on every leader, as B bytes."""
        code = (owner + 2).to(torch.uint8) if owner is not None \
            else torch.empty(batch, dtype=torch.uint8, device=self.device)
        with self.phase("rows"):
            dist.broadcast(code, self.root, group=self.world.leaders_group)
        return code.long() - 2

    def share_summaries(self, mine: dict, transfers: list, max_support: int) -> list:
        """Every leader's member's summaries of the fused rows (split_fusion), on every leader,
        in member order: one all-gather of (F, widest) fp32 blocks."""
        from ..deepen.summary import Summary, support_size
        (member, summary), = mine.items()
        shapes = [(support_size(max_support, t), t.cluster_rows.shape[0], i == 0) for i, t in enumerate(transfers)]
        widest = max(Summary.width(*shape) for shape in shapes)
        packed = summary.pack()
        block = packed.new_zeros(len(packed), widest)
        block[:, :packed.shape[1]] = packed
        received = [torch.empty_like(block) for _ in shapes]
        with self.phase("gather"):
            dist.all_gather(received, block, group=self.world.leaders_group)
        self.gathered_bytes += block.numel() * block.element_size() * len(shapes)
        self.row_steps += len(block)
        return [Summary.unpack(t, *shape) for t, shape in zip(received, shapes)]

    def merge_rows(self, merged: torch.Tensor) -> torch.Tensor:
        """The owners' (B, 1 + members) rows, summed onto the main leader (split_fusion)."""
        with self.phase("merge"):
            dist.reduce(merged, self.root, op=dist.ReduceOp.SUM, group=self.world.leaders_group)
        return merged

    def collect_keys(self, keys: dict, batch: int) -> list | None:
        """Every leader's (B,) int64 row keys (the agreement skip), on the main leader in member
        order; None elsewhere."""
        (mine,), leaders = keys.values(), self.world.layout.leaders
        if len(leaders) == 1:
            return [mine]
        received = [torch.empty_like(mine) for _ in leaders] if self.is_main else None
        with self.phase("keys"):
            dist.gather(mine.contiguous(), received, dst=self.root, group=self.world.leaders_group)
        return received

    def collect(self, parts: dict) -> list | None:
        """Every leader's (relative vectors, neglected mass) for the fused rows, on the main
        leader, in member order; None elsewhere."""
        (r, neglected), = parts.values()
        mine = torch.cat([r, (neglected if neglected is not None else r.new_zeros(len(r)))[:, None]], 1)
        leaders = self.world.layout.leaders
        if len(leaders) == 1:
            received = [mine]
        else:
            received = [torch.empty_like(mine) for _ in leaders] if self.is_main else None
            with self.phase("gather"):
                dist.gather(mine.contiguous(), received, dst=self.root, group=self.world.leaders_group)
        if not self.is_main:
            return None
        self.gathered_bytes += sum(t.numel() * t.element_size() for t in received)
        self.row_steps += len(mine)
        fast = neglected is not None
        return [(t[:, :-1], t[:, -1] if fast else None) for t in received]

    def share_all(self, parts: dict) -> list:
        """Every leader's (F, W) tensor, on every leader, in member order: one all-gather (UniTE's
        top-k union entries, deepen/unite.py)."""
        (mine,), leaders = parts.values(), self.world.layout.leaders
        if len(leaders) == 1:
            return [mine]
        received = [torch.empty_like(mine) for _ in leaders]
        with self.phase("gather"):
            dist.all_gather(received, mine.contiguous(), group=self.world.leaders_group)
        if self.is_main:
            self.gathered_bytes += sum(t.numel() * t.element_size() for t in received)
        return received

    def share_tokens(self, result: StepResult | None, batch: int) -> StepResult:
        """The chosen tokens and fused flags, from rank 0 to every rank."""
        both = torch.stack([result.tokens, result.fused.long()]) if self.is_root \
            else torch.empty(2, batch, dtype=torch.long, device=self.device)
        with self.phase("tokens"):
            dist.broadcast(both, self.root, group=self.group)
        if self.is_root:
            return result
        return StepResult(both[0], both[1].bool(), None)
