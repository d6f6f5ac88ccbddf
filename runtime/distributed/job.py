"""The jobs `launcher/run.py` starts on every rank: generate over a JSON-lines file, and the
bench. How a rank starts, loads and dies is runtime/distributed/rank.py."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from ..bench.ranks import COMMUNICATION
from ..engine.pipeline import micro_batches_for
from ..engine.sequence import Request
from ..engine.sampling import GREEDY
from ..jobs.files import ResultWriter, pending_requests
from ..jobs.progress import peak_rss_mb
from .exchange import broadcast_message, gather_messages
from .rank import Rank
from .startup import die, stop_all
from .replicas import ResultRelay, SharedQueue


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
             stats=None, sampling=None, seed=0, micro_batches=1, started=None):
    """`deepen generate` across ranks: rank 0 alone reads --input and writes --output;
    `micro_batches` > 1 pipelines the batch (engine/pipeline.py); `started`: startup.begin's."""
    rank = Rank(config_path, startup_timeout, step_timeout, threads, started)
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
            layout = rank.world.layout
            relay = ResultRelay(rank.heartbeat.store, rank.heartbeat.lock, rank.world.rank,
                                [r * layout.size for r in range(1, replicas)])   # the other replicas' roots
            if rank.world.rank == 0 and verdict["error"] is None:
                queue.publish(requests)   # before the verdict: every root can claim after it
        verdict = broadcast_message(verdict)
        if verdict["error"]:
            stop_all([f"error: {verdict['error']}"])
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
            rank.heartbeat.rest()   # no more steps here: waiting for the others' rows is not being stuck
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
          startup_timeout=1800.0, step_timeout=120.0, threads=None, micro_batches="1", started=None):
    """`deepen bench` across ranks: tokens/s from rank 0, every rank's own breakdown; each batch
    size once per entry of `micro_batches` (comma-separated: "1,2" times it unpipelined and
    pipelined, engine/pipeline.py)."""
    from ..bench.bench import batch_of, bench_prompts
    from ..bench.ranks import rank_run, rank_table, summarize_ranks
    rank = Rank(config_path, startup_timeout, step_timeout, threads, started)
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
