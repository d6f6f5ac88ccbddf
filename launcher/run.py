"""Entry point for the distributed runtime: every rank runs this file.

    deepspeed --num_accelerators 2 launcher/run.py --config C --input I --output O [--resume]
    deepspeed --hostfile hostfiles/a100x16 launcher/run.py --config C --input I --output O
    torchrun --nproc_per_node 2 launcher/run.py --config C --input I --output O

The config's members' tp_size values must add up to the world size (main member first).
Rank 0 alone reads --input and writes --output. Any rank that fails stops the job: it prints
one line naming its rank and member and exits non-zero; the others see their next collective
fail (or time out after --timeout seconds) and do the same.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script by the launchers


def dist_errors() -> tuple:
    import torch.distributed as dist
    return tuple(e for e in (getattr(dist, "DistBackendError", None), getattr(dist, "DistError", None)) if e)


_dying = []


def _die(who: str, error: BaseException | str, code: int = 1):
    sys.stderr.write(f"deepen: {who}: {error}\n")
    sys.stderr.flush()
    os._exit(code)  # never hang in atexit handlers or collectives


def _fail_job(world, heartbeat, what: str):
    """Another rank failed: name it (from the heartbeats), then exit. Rank 0 hosts the store the
    others read, so it leaves last."""
    if _dying:
        return
    _dying.append(what)
    why = heartbeat.identify()
    if world.rank == 0:
        time.sleep(3.0)
    _die(world.describe, f"{what} -- {why}")


def _config_and_threads(config_path, threads):
    """Load the config and its rank layout (a bad one ends this rank with one line, status 2),
    and share the cores among the local ranks. Returns (config, layout, this rank's name)."""
    import torch

    from runtime.config import ConfigError, load_config
    from runtime.distributed import layout_for

    rank = int(os.environ.get("RANK", os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("SLURM_PROCID", "0"))))
    who = f"rank {rank}"
    try:
        cfg = load_config(config_path)
        layout = layout_for(cfg)
        who = layout.describe(rank) if rank < layout.world_size else who
    except (ConfigError, ValueError) as e:
        _die(who, e, 2)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // local_world))
    return cfg, layout, who


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option("--input", "input_path", required=True, type=click.Path(dir_okay=False))
@click.option("--output", "output_path", required=True, type=click.Path(dir_okay=False))
@click.option("--resume", is_flag=True, help="skip ids already in --output")
@click.option("--overwrite", is_flag=True, help="replace an existing --output")
@click.option("--skip-bad", is_flag=True, help="skip malformed input lines instead of stopping")
@click.option("--batch", default=8, show_default=True, help="rows in flight")
@click.option("--max-new-tokens", default=64, show_default=True)
@click.option("--stop", multiple=True, help="default stop string(s), e.g. --stop '\\n'")
@click.option("--timeout", default=120.0, show_default=True,
              help="seconds a collective may wait before the job is declared stalled")
@click.option("--threads", type=int, help="torch threads per rank (default: cores / local ranks)")
@click.option("--stats", type=click.Path(dir_okay=False), help="rank 0 writes per-step timings here (JSON)")
@click.option("--local_rank", type=int, hidden=True, help="set by the deepspeed launcher")
def main(config_path, input_path, output_path, resume, overwrite, skip_bad, batch, max_new_tokens,
         stop, timeout, threads, stats, local_rank):
    """Run `deepen generate` across ranks: each member in its own tensor-parallel group."""
    import json

    import torch

    from runtime.distributed import DistributedEngine, Heartbeat, broadcast_message, init_world, shard_member
    from runtime.ensemble import anchors_entry, load_members, make_fuser
    from runtime.jobs import ResultWriter, finished_ids, read_requests
    from runtime.members import load_model

    cfg, layout, who = _config_and_threads(config_path, threads)

    heartbeat = None
    try:
        world = init_world(layout, timeout)
        who = world.describe
        heartbeat = Heartbeat(world, on_dead=lambda why: _die(world.describe, f"stopping: {why}"))
        # the deepspeed launcher and torchrun stop the other ranks with SIGTERM when one fails:
        # say who we are and who went silent before going
        signal.signal(signal.SIGTERM, lambda *_: _fail_job(
            world, heartbeat, "stopped by the launcher (a rank failed, or the job was cancelled)"))
        # rank 0 checks the input before anyone loads a model; everybody learns the verdict
        verdict = None
        if world.rank == 0:
            try:
                stop_strings = tuple(s.encode().decode("unicode_escape") for s in stop)
                requests = read_requests(input_path, max_new_tokens, stop_strings, skip_bad,
                                         warn=lambda m: print(m, file=sys.stderr))
                if Path(output_path).exists() and not (resume or overwrite):
                    raise ValueError(f"{output_path} exists: pass --resume to finish it, "
                                     "or --overwrite to replace it")
                done = finished_ids(output_path) if resume else set()
                requests = [r for r in requests if r.id not in done]
                verdict = {"error": None}
            except (ValueError, OSError) as e:
                verdict = {"error": str(e)}
        verdict = broadcast_message(verdict)
        if verdict["error"]:
            _die("error", verdict["error"], 2)

        members = load_members(cfg, with_models=False, log=lambda m: None)
        mine = members[world.member]
        model = load_model(mine.path, mine.config)
        mine.model = shard_member(model, world, getattr(torch, mine.config.dtype))
        entry = anchors_entry(cfg, members, build=False)
        fuser = make_fuser(cfg, members, entry, only=world.member if world.is_leader else -1)
        engine = DistributedEngine(members, fuser, world, batch)

        writer = ResultWriter(output_path, append=resume) if world.rank == 0 else None
        t0 = time.perf_counter()
        tokens = 0

        def on_result(result):
            nonlocal tokens
            writer.write(result.record())
            tokens += len(result.ids)

        engine.run(requests if world.rank == 0 else None, on_result)
        seconds = time.perf_counter() - t0
        if world.rank == 0:
            writer.close()
            print(f"{writer.count} results -> {output_path}; {tokens} tokens in {seconds:.1f} s "
                  f"({tokens / max(seconds, 1e-9):.1f} tokens/s)", file=sys.stderr)
        if stats:  # rank 0 at the path given, rank r beside it with a suffix
            import resource
            breakdown = engine.breakdown()
            comm = sum(breakdown.get(k, 0.0) for k in ("gather", "broadcast", "control"))
            path = Path(stats) if world.rank == 0 else Path(f"{stats}.rank{world.rank}")
            path.write_text(json.dumps({
                "rank": world.rank, "member": layout.names[world.member], "world_size": layout.world_size,
                "seconds": seconds, "tokens": tokens, "steps": engine.steps,
                "tokens_per_s": tokens / max(seconds, 1e-9) if world.rank == 0 else None,
                "breakdown_s": breakdown, "communication_share": comm / max(seconds, 1e-9),
                "gathered_bytes_per_row_step": engine.gathered_bytes / max(engine.row_steps, 1),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, indent=1))
        heartbeat.close()  # before the store's host (rank 0) may leave
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    except KeyboardInterrupt:
        _die(who, "interrupted; rerun with --resume to finish", 130)
    except Exception as e:  # noqa: BLE001 - any failure must stop this rank loudly, not hang
        if heartbeat is not None and isinstance(e, (RuntimeError, dist_errors())):
            _fail_job(world, heartbeat, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        _die(who, f"{type(e).__name__}: {e}")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option("--batch", default="1,8", show_default=True, help="comma-separated batch sizes")
@click.option("--new-tokens", default=16, show_default=True)
@click.option("--prompts", "prompts_path", type=click.Path(dir_okay=False),
              help="JSON lines with a 'prompt' field (default: TriviaQA dev 5-shot prompts)")
@click.option("--repeat", default=3, show_default=True, help="repetitions after a warm-up")
@click.option("--output", type=click.Path(dir_okay=False), help="rank 0 writes the JSON here")
@click.option("--timeout", default=120.0, show_default=True)
@click.option("--threads", type=int, help="torch threads per rank (default: cores / local ranks)")
@click.option("--local_rank", type=int, hidden=True, help="set by the deepspeed launcher")
def bench_main(config_path, batch, new_tokens, prompts_path, repeat, output, timeout, threads, local_rank):
    """`deepen bench` across ranks: tokens/s from rank 0, and every rank's own breakdown
    (forward, relative, search, resync, communication + wait) and peak memory.

        deepspeed --num_accelerators 2 launcher/run.py bench --config configs/smol-gemma.toml
    """
    import json

    import torch

    from runtime.bench import batch_of, bench_prompts, rank_run, rank_table, summarize_ranks
    from runtime.distributed import DistributedEngine, broadcast_message, gather_messages
    from runtime.engine import Request

    world, heartbeat, layout, members, fuser = _start(config_path, timeout, threads)
    try:
        prompts = bench_prompts(prompts_path) if world.rank == 0 else None
        prompts = broadcast_message({"prompts": prompts})["prompts"]

        def once(size: int, tokens: int) -> dict:
            chosen = batch_of(prompts, size)
            engine = DistributedEngine(members, fuser, world, size)
            fuser.seconds.clear()
            torch.distributed.barrier()
            t0 = time.perf_counter()
            results = engine.run([Request(i, p, tokens) for i, p in enumerate(chosen)] if world.rank == 0 else None)
            return rank_run(engine, time.perf_counter() - t0, results)

        once(2, 2)  # warm-up
        out = {"config": config_path, "world_size": layout.world_size, "new_tokens": new_tokens,
               "repeat": repeat, "layout": [layout.describe(r) for r in range(layout.world_size)], "batches": []}
        for size in [int(b) for b in batch.split(",")]:
            runs = []
            for r in range(repeat):
                if world.rank == 0:
                    print(f"batch {size}: run {r + 1}/{repeat}", file=sys.stderr)
                runs.append(gather_messages(once(size, new_tokens)))
            out["batches"].append(summarize_ranks(size, runs))
        if world.rank == 0:
            if output:
                Path(output).write_text(json.dumps(out, indent=1) + "\n")
            print(rank_table(out))
        heartbeat.close()
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    except Exception as e:  # noqa: BLE001 - stop loudly, never hang
        if isinstance(e, (RuntimeError, dist_errors())):
            _fail_job(world, heartbeat, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        _die(world.describe, f"{type(e).__name__}: {e}")


def _start(config_path, timeout, threads):
    """Join the world, load and shard this rank's member, load its transfer (leaders)."""
    import torch

    from runtime.distributed import Heartbeat, init_world, shard_member
    from runtime.ensemble import anchors_entry, load_members, make_fuser
    from runtime.members import load_model

    cfg, layout, who = _config_and_threads(config_path, threads)
    try:
        world = init_world(layout, timeout)
        heartbeat = Heartbeat(world, on_dead=lambda why: _die(world.describe, f"stopping: {why}"))
        signal.signal(signal.SIGTERM, lambda *_: _fail_job(
            world, heartbeat, "stopped by the launcher (a rank failed, or the job was cancelled)"))
        members = load_members(cfg, with_models=False, log=lambda m: None)
        mine = members[world.member]
        mine.model = shard_member(load_model(mine.path, mine.config), world, getattr(torch, mine.config.dtype))
        entry = anchors_entry(cfg, members, build=False)
        fuser = make_fuser(cfg, members, entry, only=world.member if world.is_leader else -1)
        return world, heartbeat, layout, members, fuser
    except Exception as e:  # noqa: BLE001
        _die(who, f"{type(e).__name__}: {e}")


def _entry():
    """`run.py bench ...` runs the benchmark; anything else is the generate job. The deepspeed
    launcher puts --local_rank=N before the script's own arguments."""
    args = sys.argv[1:]
    first = next((i for i, a in enumerate(args) if not a.startswith("--local_rank")), None)
    if first is not None and args[first] == "bench":
        del sys.argv[first + 1]
        bench_main()
    else:
        main()


if __name__ == "__main__":
    _entry()
