"""One rank of a job (runtime/distributed/job.py): how it starts, what it loads, how it dies.

Start-up (runtime/distributed/startup.py): this host's members are prepared before
torch.distributed starts; once the world is connected, every rank's problem (versions, the
config, the world size, a member this rank cannot read) is gathered, and if there is any, rank 0
says each in one line and every rank stops at once. Then the member groups, the heartbeat, this
rank's shard, and the anchors (rank 0 finds or builds them and sends them to the hosts that lack
them: runtime/distributed/share.py).

Any rank that fails later stops the job: it prints one line naming its rank and member and exits
non-zero; the others see their next collective fail (or the heartbeat go quiet) and do the same,
naming the rank that stopped."""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from ..deepen.anchors import anchor_info
from ..deepen.split import shares_rows
from ..deepen.summary import EXACT_IDS
from ..engine.lane import Lane
from ..engine.pipeline import make_engine, micro_batches_for
from ..members.ensemble import anchors_entry, load_members, make_fuser
from ..members.sources import MemberError, anchors_root, load_model
from .exchange import GroupExchange, broadcast_message
from .heartbeat import Heartbeat
from .loading import load_shard
from .share import log_line, share_entry
from .startup import dying, agree, begin, die, host_label, stop_all
from .world import global_rank, init_world, shard_member, threads_per_rank


def fail_job(world, heartbeat, what: str):
    """Another rank failed: name it (from the heartbeats), tell the others, then exit. Rank 0
    hosts the store the others read, so it leaves last. A second caller (another thread) waits
    for the first to end the process."""
    if not dying.acquire(blocking=False):
        while True:
            time.sleep(60)
    why = heartbeat.identify()
    heartbeat.announce(why)
    if world.rank == 0:
        time.sleep(3.0)
    die(world.describe, f"{what} -- {why}")


def on_dead(world):
    """What the heartbeat thread calls when it finds a rank dead or stuck, or is told so."""
    def stop(why: str):
        if dying.acquire(blocking=False):
            die(world.describe, f"stopping: {why}", linger=3.0 if world.rank == 0 else 0.0)
    return stop


def install_sigterm(world, heartbeat):
    """The launcher's SIGTERM (it stops a host's other ranks when one fails): say who we are and
    who went silent, then go. Python runs signal handlers in the main thread, and only between
    two bytecodes: a main thread blocked in a collective would run it only once that collective
    fails, perhaps because the store's host left meanwhile. So the signal is taken from the
    wake-up fd, which the interpreter writes at once, by a thread of its own; nothing in it waits
    long on a lock the interrupted main thread may hold (Heartbeat.identify)."""
    read, write = socket.socketpair()
    write.setblocking(False)
    signal.signal(signal.SIGTERM, lambda *_: None)   # the watcher acts; the main thread goes on
    signal.set_wakeup_fd(write.fileno(), warn_on_full_buffer=False)

    def watch():
        while signal.SIGTERM.value not in read.recv(64):
            pass
        fail_job(world, heartbeat, "stopped by the launcher (a rank failed, or the job was cancelled)")
    threading.Thread(target=watch, daemon=True, name="deepen-sigterm").start()
    return read, write


def _dist_errors() -> tuple:
    return tuple(e for e in (getattr(dist, "DistBackendError", None), getattr(dist, "DistError", None)) if e)


class Rank:
    """One rank of a job: its config and layout, the world, the heartbeat, and how it dies."""

    def __init__(self, config_path: str, startup_timeout: float, step_timeout: float, threads: int | None,
                 started=None):
        """`started`: what startup.begin returned (launcher/run.py calls it before importing this)."""
        self.who = f"rank {global_rank()}"
        self.timeout = startup_timeout
        self.world = self.heartbeat = None
        self.cfg, self.layout, device = started or begin(config_path, startup_timeout)
        torch.set_num_threads(threads_per_rank(threads))
        with self.guard():
            if dist.is_initialized():
                agree(self._read_members(device))   # every rank, every host: go on together or stop together
            self.who = self.layout.describe(global_rank())
            # the process groups wait as long as start-up may take (a 70B member loads while a 7B
            # one waits); once every rank steps, the heartbeat holds each step to step_timeout
            self.world = init_world(self.layout, startup_timeout)
            if not hasattr(self, "members"):
                self.members = self._members(device)
            self.heartbeat = Heartbeat(self.world, step_timeout=step_timeout, on_dead=on_dead(self.world))
            self._signals = install_sigterm(self.world, self.heartbeat)

    def _members(self, device):
        """What this rank reads: its own member's files, the main member's tokenizer (to decode);
        a replica's root every tokenizer (the results count each member's tokens), and rank 0
        the fingerprints that key the anchors. Prepared already (startup.py): nothing is written."""
        rank, n = global_rank(), len(self.layout.names)
        only = set(range(n)) if rank % self.layout.size == 0 else {0, self.layout.member_of(rank)}
        return load_members(self.cfg, with_models=False, log=lambda m: None, device=device, only=only,
                            fingerprints=rank == 0, prepare=False)

    def _read_members(self, device) -> str | None:
        try:
            self.members = self._members(device)
        except (MemberError, OSError, ValueError) as e:
            return f"{host_label()}: {e}"
        return None

    @contextmanager
    def guard(self):
        """Any failure inside stops this rank loudly, naming it and (from the heartbeats) the
        rank that went quiet; never a hang."""
        try:
            yield self
        except KeyboardInterrupt:
            die(self.who, "interrupted; rerun with --resume to finish", 130)
        except Exception as e:  # noqa: BLE001 - any failure must stop this rank, not hang it
            if self.heartbeat is not None and isinstance(e, (RuntimeError, *_dist_errors())):
                fail_job(self.world, self.heartbeat, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
            die(self.world.describe if self.world else self.who, f"{type(e).__name__}: {e}")

    def _anchors(self) -> Path:
        """Rank 0 finds (or builds) the anchors and checks them; every host gets a copy."""
        w, cfg = self.world, self.cfg
        found = None
        if w.rank == 0:
            try:
                t0, built = time.perf_counter(), []
                entry = anchors_entry(cfg, self.members, build=True, progress=False, device=w.device,
                                      log=lambda m: (built.append(m), log_line(f"{host_label()}: {m}")))
                if built:
                    log_line(f"{host_label()}: anchors: built {entry.name} in {time.perf_counter() - t0:.1f} s")
                found = {"key": entry.name, "error": None}
                # summaries carry token ids as fp32 (deepen/summary.py): checked here, for every rank
                if cfg.method == "deepen" and shares_rows(cfg.mode, cfg.anchors.split_fusion, len(w.layout.leaders)):
                    for name, size in zip(anchor_info(entry)["members"], anchor_info(entry)["vocab_sizes"]):
                        if size > EXACT_IDS:
                            found["error"] = (f"{cfg.path}: anchors.split_fusion: member {name!r} has {size} tokens, "
                                              "past the 2**24 that travel exactly as fp32; set split_fusion = false")
                            break
            except (FileNotFoundError, ValueError, OSError, TimeoutError) as e:
                found = {"key": None, "error": str(e)}
        found = broadcast_message(found)
        if found["error"]:
            stop_all([found["error"]])
        union = cfg.method != "deepen"   # UniTE, GaC: the union maps (members/ensemble.py union_entry)
        return share_entry(found["key"], anchors_root() / "union" if union else anchors_root(), self.timeout,
                           log=lambda m: log_line(f"{host_label()}: {m}"), marker="union.json" if union else "anchors.json")

    def load(self):
        """This rank's member, sharded over its group, and (leaders) its relative transfer."""
        w, members = self.world, self.members
        entry = self._anchors()    # before the models: rank 0 may build them, one embedding at a time
        mine = members[w.member]
        dtype = getattr(torch, mine.config.dtype)
        if mine.config.loading == "sharded" and not mine.config.allow_pickle:
            mine.model = load_shard(mine.path, mine.config, w, dtype)   # only this rank's slices
        else:
            mine.model = shard_member(load_model(mine.path, mine.config), w, dtype)
        # a leader loads its own member's transfer; with split_fusion (fast mode, several
        # leaders) every member's, since it fuses whole rows (deepen/split.py)
        split = shares_rows(self.cfg.mode, self.cfg.anchors.split_fusion, len(w.layout.leaders))
        only = (None if split else w.member) if w.is_leader else -1
        return members, make_fuser(self.cfg, members, entry, only=only)

    def engine(self, members, fuser, batch: int, micro_batches: int = 1):
        """This rank's Engine, or (micro_batches > 1) its Pipeline of micro-batches."""
        engine = make_engine(members, fuser, batch, {self.world.member: Lane(members[self.world.member])},
                             GroupExchange(self.world, phase=self.heartbeat.phase), micro_batches)
        parts = micro_batches_for(batch, micro_batches)
        # each micro-batch's first step and first forward pass fall under the start-up timeout
        self.heartbeat.warmup = 1 if parts == 1 else 2 * parts
        for part in getattr(engine, "parts", [engine]):
            stall_for_tests(part, self.world.rank)
        return engine

    def close(self):
        self.heartbeat.close()  # before the store's host (rank 0) may leave
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def stall_for_tests(engine, rank: int):
    """A test hook, for the one failure no test can cause from outside: a rank that is alive (its
    heartbeat thread beats) but stuck inside a step. DEEPEN_FAULT=stall:RANK:STEP:SECONDS makes
    rank RANK sleep SECONDS in its step STEP (`*`: in every step). Unset, it does nothing."""
    fault = os.environ.get("DEEPEN_FAULT", "")
    if not fault.startswith("stall:"):
        return
    who, at, seconds = fault.split(":")[1:]
    if int(who) != rank:
        return
    begin = engine.begin_step

    def stalled():
        if at == "*" or engine.steps == int(at):
            if at != "*":
                print(f"deepen: test hook: rank {rank} stalls inside step {at} for {float(seconds):g} s",
                      file=sys.stderr, flush=True)
            time.sleep(float(seconds))
        return begin()
    engine.begin_step = stalled
