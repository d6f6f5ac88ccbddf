"""Entry point for the distributed runtime: every rank runs this file.

    deepspeed --num_accelerators 2 launcher/run.py --config C --input I --output O [--resume]
    deepspeed --hostfile hostfiles/a100x16 launcher/run.py --config C --input I --output O
    torchrun --nproc_per_node 2 launcher/run.py --config C --input I --output O
    deepspeed --num_accelerators 2 launcher/run.py bench --config C [--micro-batches 1,2]

The config's members' tp_size values must add up to the world size (main member first).
Rank 0 alone reads --input and writes --output. Any rank that fails stops the job: it prints
one line naming its rank and member and exits non-zero; the others do the same, naming it.
Only wiring: the jobs are runtime/distributed/job.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script by the launchers

from launcher.common import sampling_from, sampling_options  # noqa: E402
from runtime.distributed.startup import begin  # noqa: E402  (imports neither transformers nor DeepSpeed)
from runtime.engine.stops import parse_stop  # noqa: E402

CONTEXT = {"help_option_names": ["-h", "--help"]}


@click.command(context_settings=CONTEXT)
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="ensemble TOML")
@click.option("--input", "input_path", required=True, type=click.Path(dir_okay=False),
              help='JSON lines: {"id": ..., "prompt": ...} (+ max_new_tokens, stop, any other fields)')
@click.option("--output", "output_path", required=True, type=click.Path(dir_okay=False),
              help="JSON lines, one result per prompt, appended by rank 0 as rows finish")
@click.option("--resume", is_flag=True, help="skip ids already in --output")
@click.option("--overwrite", is_flag=True, help="replace an existing --output")
@click.option("--skip-bad", is_flag=True, help="skip malformed input lines instead of stopping")
@click.option("--batch", default=8, show_default=True, help="rows in flight")
@click.option("--max-new-tokens", default=64, show_default=True, help="default per prompt")
@click.option("--stop", multiple=True, help="default stop string(s) per prompt; any Unicode, and "
              "shell escapes (--stop '\\n')")
@click.option("--startup-timeout", default=1800.0, show_default=True,
              help="seconds the ranks wait for each other while starting (loading, sharding, anchors)")
@click.option("--step-timeout", default=120.0, show_default=True,
              help="seconds a step may take: a rank still inside a step after this (alive but stuck) "
                   "stops the job, named")
@click.option("--threads", type=int, help="torch threads per rank (default: this node's cores / its ranks)")
@click.option("--stats", type=click.Path(dir_okay=False),
              help="write each rank's figures here as JSON (rank r > 0 at PATH.rank<r>)")
@click.option("--micro-batches", default=1, show_default=True, type=click.IntRange(min=1),
              help="split the rows in flight into this many micro-batches, pipelined: one's forward "
                   "passes run while another's fusion is shared out (docs/performance.md: when it pays)")
@click.option("--local_rank", type=int, hidden=True, help="set by the deepspeed launcher")
@sampling_options
def main(config_path, input_path, output_path, resume, overwrite, skip_bad, batch, max_new_tokens,
         stop, startup_timeout, step_timeout, threads, stats, micro_batches, local_rank, temperature, top_p, top_k,
         seed, n, logprobs):
    """Run `deepen generate` across ranks: each member in its own tensor-parallel group."""
    try:
        sampling = sampling_from(temperature, top_p, top_k, n, logprobs)
    except ValueError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    started = begin(config_path, startup_timeout)
    from runtime.distributed.job import generate  # after begin: it imports transformers and DeepSpeed
    generate(config_path, input_path, output_path, resume, overwrite, skip_bad, batch, max_new_tokens,
             tuple(parse_stop(s) for s in stop), startup_timeout, step_timeout, threads, stats,
             sampling=sampling, seed=seed, micro_batches=micro_batches, started=started)


@click.command(context_settings=CONTEXT)
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option("--batch", default="1,8", show_default=True, help="comma-separated batch sizes")
@click.option("--new-tokens", default=16, show_default=True)
@click.option("--prompts", "prompts_path", type=click.Path(dir_okay=False),
              help="JSON lines with a 'prompt' field (default: TriviaQA dev 5-shot prompts)")
@click.option("--repeat", default=3, show_default=True, help="repetitions after a warm-up")
@click.option("--output", type=click.Path(dir_okay=False), help="rank 0 writes the JSON here")
@click.option("--startup-timeout", default=1800.0, show_default=True)
@click.option("--step-timeout", default=120.0, show_default=True)
@click.option("--threads", type=int, help="torch threads per rank (default: this node's cores / its ranks)")
@click.option("--micro-batches", default="1", show_default=True,
              help="comma-separated: each batch size is timed once per entry (1: not pipelined; 1,2: "
                   "both, side by side; a batch runs in at most one micro-batch per row)")
@click.option("--local_rank", type=int, hidden=True, help="set by the deepspeed launcher")
def bench_main(config_path, batch, new_tokens, prompts_path, repeat, output, startup_timeout, step_timeout,
               threads, micro_batches, local_rank):
    """`deepen bench` across ranks: tokens/s from rank 0, and every rank's own breakdown
    (forward, relative, search, resync, communication + wait) and peak memory.

        deepspeed --num_accelerators 2 launcher/run.py bench --config configs/smol-gemma.toml
    """
    try:
        if min(int(m) for m in micro_batches.split(",")) < 1:
            raise ValueError
    except ValueError:
        click.echo(f"error: --micro-batches: want positive integers separated by commas, got {micro_batches!r}",
                   err=True)
        sys.exit(2)
    started = begin(config_path, startup_timeout)
    from runtime.distributed.job import bench  # after begin: it imports transformers and DeepSpeed
    bench(config_path, batch, new_tokens, prompts_path, repeat, output, startup_timeout, step_timeout, threads,
          micro_batches, started=started)


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
