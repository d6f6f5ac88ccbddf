"""The jobs `launcher/run.py` starts on every rank: generate over a JSON-lines file, and the
bench. Any rank that fails stops the job: it prints one line naming its rank and member and
exits non-zero; the others see their next collective fail (or the heartbeat go quiet) and do the
same, naming the rank that stopped."""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from ..bench.ranks import COMMUNICATION
from ..deepen.split import shares_rows
from ..deepen.summary import EXACT_IDS
from ..engine.lane import Lane
from ..engine.pipeline import make_engine, micro_batches_for
from ..engine.sequence import Request
from ..engine.sampling import GREEDY
from ..jobs.files import ResultWriter, pending_requests
from ..jobs.progress import peak_rss_mb
from ..members.config import ConfigError, load_config
from ..members.ensemble import anchors_entry, load_members, make_fuser
from ..members.sources import load_model
from .exchange import GroupExchange, broadcast_message, gather_messages
from .heartbeat import Heartbeat
from .replicas import ResultRelay, SharedQueue
from .loading import load_shard
from .world import global_rank, init_world, layout_for, shard_member, threads_per_rank

_dying: list[str] = []


def die(who: str, error: BaseException | str, code: int = 1, linger: float = 0.0):
    """Say who failed and why, then exit at once (`linger`: seconds to stay up first, for rank 0,
    whose store the others read to name the failed rank themselves)."""
    sys.stderr.write(f"deepen: {who}: {error}\n")
    sys.stderr.flush()
    time.sleep(linger)
    os._exit(code)  # never hang in atexit handlers or collectives


def fail_job(world, heartbeat, what: str):
    """Another rank failed: name it (from the heartbeats), then exit. Rank 0 hosts the store the
    others read, so it leaves last."""
    if _dying:
        return
    _dying.append(what)
    why = heartbeat.identify()
    if world.rank == 0:
        time.sleep(3.0)
    die(world.describe, f"{what} -- {why}")


def _dist_errors() -> tuple:
    import torch.distributed as dist
    return tuple(e for e in (getattr(dist, "DistBackendError", None), getattr(dist, "DistError", None)) if e)


class Rank:
    """One rank of a job: its config and layout, the world, the heartbeat, and how it dies."""

    def __init__(self, config_path: str, startup_timeout: float, step_timeout: float, threads: int | None):
        self.who = f"rank {global_rank()}"
        try:
            self.cfg = load_config(config_path)
            self.layout = layout_for(self.cfg)
        except (ConfigError, ValueError) as e:
            die(self.who, e, 2)
        if global_rank() < self.layout.world_size:
            self.who = self.layout.describe(global_rank())
        torch.set_num_threads(threads_per_rank(threads))
        self.world = self.heartbeat = None
        with self.guard():
            # the process groups wait as long as start-up may take (a 70B member loads while a 7B
            # one waits); once every rank steps, the heartbeat holds each step to step_timeout
            self.world = init_world(self.layout, startup_timeout)
            self.heartbeat = Heartbeat(self.world, step_timeout=step_timeout, on_dead=lambda why: die(
                self.world.describe, f"stopping: {why}", linger=3.0 if self.world.rank == 0 else 0.0))
            # the deepspeed launcher and torchrun stop the other ranks with SIGTERM when one
            # fails: say who we are and who went silent before going
            signal.signal(signal.SIGTERM, lambda *_: fail_job(
                self.world, self.heartbeat, "stopped by the launcher (a rank failed, or the job was cancelled)"))

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

    def load(self):
        """This rank's member, sharded over its group, and (leaders) its relative transfer. A
        rank reads only what it runs: its own member's weights, the main member's tokenizer (to
        decode) and its own; a replica's root also reads every tokenizer (the results count each
        member's tokens) and keys the anchors, whose entry it sends to everyone."""
        w = self.world
        n = len(self.layout.names)
        members = load_members(self.cfg, with_models=False, log=lambda m: None, device=w.device,
                               only=set(range(n)) if w.rank == w.layout.root else {0, w.member}, fingerprints=w.rank == 0)
        mine = members[w.member]
        dtype = getattr(torch, mine.config.dtype)
        if mine.config.loading == "sharded" and not mine.config.allow_pickle:
            mine.model = load_shard(mine.path, mine.config, w, dtype)   # only this rank's slices
        else:
            mine.model = shard_member(load_model(mine.path, mine.config), w, dtype)
        found = None
        if w.rank == 0:
            try:
                found = {"entry": str(anchors_entry(self.cfg, members, build=False)), "error": None}
            except FileNotFoundError as e:
                found = {"entry": None, "error": str(e)}
        found = broadcast_message(found)
        if found["error"]:
            die(w.describe, found["error"], 2)
        # a leader loads its own member's transfer; with split_fusion (fast mode, several
        # leaders) every member's, since it fuses whole rows (deepen/split.py)
        split = shares_rows(self.cfg.mode, self.cfg.anchors.split_fusion, len(w.layout.leaders))
        only = (None if split else w.member) if w.is_leader else -1
        fuser = make_fuser(self.cfg, members, Path(found["entry"]), only=only)
        if split:   # summaries carry token ids as fp32 (deepen/summary.py)
            for m, t in zip(members, fuser.transfers):
                if t is not None and t.num_tokens > EXACT_IDS:
                    die(w.describe, f"{self.cfg.path}: anchors.split_fusion: member {m.name!r} has "
                                    f"{t.num_tokens} tokens, past the 2**24 that travel exactly as fp32; "
                                    "set split_fusion = false", 2)
        return members, fuser

    def engine(self, members, fuser, batch: int, micro_batches: int = 1):
        """This rank's Engine, or (micro_batches > 1) its Pipeline of micro-batches."""
        engine = make_engine(members, fuser, batch, {self.world.member: Lane(members[self.world.member])},
                             GroupExchange(self.world, phase=self.heartbeat.phase), micro_batches)
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
    rank RANK sleep SECONDS in its step STEP. Unset, it does nothing."""
    fault = os.environ.get("DEEPEN_FAULT", "")
    if not fault.startswith("stall:"):
        return
    who, at, seconds = (float(x) for x in fault.split(":")[1:])
    if int(who) != rank:
        return
    begin = engine.begin_step

    def stalled():
        if engine.steps == int(at):
            print(f"deepen: test hook: rank {rank} stalls inside step {int(at)} for {seconds:g} s", file=sys.stderr,
                  flush=True)
            time.sleep(seconds)
        return begin()
    engine.begin_step = stalled


def rank_report(rank: Rank, engine, seconds: float, tokens: int) -> dict:
    """What a rank writes with --stats: the engine's figures plus where this rank sits."""
    out = engine.report(seconds, tokens)
    comm = sum(out["breakdown_s"].get(k, 0.0) for k in COMMUNICATION)
    out.update({"rank": rank.world.rank, "member": rank.layout.names[rank.world.member],
                "world_size": rank.layout.world_size, "communication_share": comm / max(seconds, 1e-9),
                "gathered_bytes_per_row_step": engine.exchange.gathered_bytes / max(engine.exchange.row_steps, 1),
                "peak_rss_mb": peak_rss_mb()})
    if rank.world.rank != 0:
        out["tokens_per_s"] = None
    return out


def generate(config_path, input_path, output_path, resume=False, overwrite=False, skip_bad=False,
             batch=8, max_new_tokens=64, stop=(), startup_timeout=1800.0, step_timeout=120.0, threads=None,
             stats=None, sampling=None, seed=0, micro_batches=1):
    """`deepen generate` across ranks: rank 0 alone reads --input and writes --output;
    `micro_batches` > 1 pipelines the batch (engine/pipeline.py)."""
    rank = Rank(config_path, startup_timeout, step_timeout, threads)
    with rank.guard():
        # rank 0 checks the input before anyone loads a model; everybody learns the verdict
        verdict, requests = None, None
        if rank.world.rank == 0:
            try:
                requests, _ = pending_requests(input_path, output_path, resume, overwrite, max_new_tokens,
                                               tuple(stop), skip_bad, warn=lambda m: print(m, file=sys.stderr),
                                               sampling=sampling or GREEDY, seed=seed)
                verdict = {"error": None}
            except (ValueError, OSError) as e:
                verdict = {"error": str(e)}
        replicas = rank.world.layout.replicas
        queue = relay = None
        if replicas > 1:
            queue = SharedQueue(rank.heartbeat.store, rank.heartbeat.lock)
            relay = ResultRelay(rank.heartbeat.store, rank.heartbeat.lock)
            if rank.world.rank == 0 and verdict["error"] is None:
                queue.publish(requests)   # before the verdict: every root can claim after it
        verdict = broadcast_message(verdict)
        if verdict["error"]:
            die("error", verdict["error"], 2)
        engine = rank.engine(*rank.load(), batch, micro_batches)
        writer = ResultWriter(output_path, append=resume) if rank.world.rank == 0 else None
        tokens, relayed = 0, 0

        def write(record: dict):
            nonlocal tokens
            writer.write(record)
            tokens += record["tokens"]

        def on_result(result):
            nonlocal tokens
            if writer is not None:
                write(result.record())
            else:                       # another replica's root: to rank 0
                relay.send(result.record())
                tokens += len(result.ids)

        def collect():
            nonlocal relayed
            for record in relay.receive():
                write(record)
                relayed += 1

        t0 = time.perf_counter()
        if replicas == 1:
            engine.run(requests or [], on_result)
        else:
            engine.run([], on_result, source=queue.take, tick=collect if writer is not None else None)
            while writer is not None and writer.count < len(requests):   # the other replicas' last rows
                collect()
                time.sleep(0.05)
        seconds = time.perf_counter() - t0
        if writer is not None:
            writer.close()
            by = f" ({writer.count - relayed} by replica 0, {relayed} by the {replicas - 1} others)" if replicas > 1 else ""
            print(f"{writer.count} results{by} -> {output_path}; {tokens} tokens in {seconds:.1f} s "
                  f"({tokens / max(seconds, 1e-9):.1f} tokens/s)", file=sys.stderr)
        if stats:  # rank 0 at the path given, rank r beside it with a suffix
            path = Path(stats) if rank.world.rank == 0 else Path(f"{stats}.rank{rank.world.rank}")
            path.write_text(json.dumps(rank_report(rank, engine, seconds, tokens), indent=1))
        rank.close()


def bench(config_path, batch="1,8", new_tokens=16, prompts_path=None, repeat=3, output=None,
          startup_timeout=1800.0, step_timeout=120.0, threads=None, micro_batches="1"):
    """`deepen bench` across ranks: tokens/s from rank 0, every rank's own breakdown; each batch
    size once per entry of `micro_batches` (comma-separated: "1,2" times it unpipelined and
    pipelined, engine/pipeline.py)."""
    from ..bench.bench import batch_of, bench_prompts
    from ..bench.ranks import rank_run, rank_table, summarize_ranks
    rank = Rank(config_path, startup_timeout, step_timeout, threads)
    with rank.guard():
        if rank.world.layout.replicas > 1:
            die(rank.world.describe, f"bench runs one replica: start {rank.world.layout.size} ranks, not "
                                     f"{rank.world.layout.world_size}", 2)
        members, fuser = rank.load()
        prompts = bench_prompts(prompts_path) if rank.world.rank == 0 else None
        prompts = broadcast_message({"prompts": prompts})["prompts"]

        def once(size: int, tokens: int, micro: int = 1) -> dict:
            engine = rank.engine(members, fuser, size, micro)
            fuser.reset_counts()
            fuser.forget_rows()   # every repetition starts with empty row stores
            torch.distributed.barrier()
            t0 = time.perf_counter()
            results = engine.run([Request(i, p, tokens) for i, p in enumerate(batch_of(prompts, size))])
            return rank_run(engine, time.perf_counter() - t0, results)

        once(2, 2)  # warm-up
        layout = rank.layout
        out = {"config": config_path, "world_size": layout.world_size, "new_tokens": new_tokens,
               "repeat": repeat, "layout": [layout.describe(r) for r in range(layout.world_size)], "batches": []}
        for size in [int(b) for b in str(batch).split(",")]:
            # each distinct split once: a batch of 1 runs unpipelined whatever was asked
            for micro in dict.fromkeys(micro_batches_for(size, int(m)) for m in str(micro_batches).split(",")):
                runs = []
                for r in range(repeat):
                    if rank.world.rank == 0:
                        print(f"batch {size}, {micro} micro-batch{'es' if micro > 1 else ''}: run {r + 1}/{repeat}",
                              file=sys.stderr)
                    runs.append(gather_messages(once(size, new_tokens, micro)))
                out["batches"].append(summarize_ranks(size, runs, micro))
        if rank.world.rank == 0:
            if output:
                Path(output).write_text(json.dumps(out, indent=1) + "\n")
            print(rank_table(out))
        rank.close()
