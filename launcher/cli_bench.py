"""`deepen bench`, `deepen bench-compare` and `deepen measure`: throughput and the fusion's
agreement and cost (only wiring: runtime/bench/ does the work)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from runtime.members.config import load_config
from runtime.members.devices import pick_device

from .common import Command, Group, echo_err, positive_ints, sampling_from

device_option = click.option("--device", help="cpu, cuda or cuda:N (default: CUDA if present)")

@click.command("bench", cls=Command)
@click.option("--config", "config", required=True, type=click.Path(dir_okay=False))
@click.option("--batch", callback=positive_ints, default="1,8,32", show_default=True,
              help="comma-separated batch sizes")
@click.option("--context", "contexts", callback=positive_ints, default=None,
              help="comma-separated prompt lengths in tokens of the main member (e.g. 64,1024,4096): every "
                   "batch size runs at each, on the bench prompts grown (earlier prompts before them) or cut to it")
@click.option("--host-path", "host_paths", default="incremental", show_default=True,
              help="comma-separated: incremental (windowed resync, incremental text) and/or full (the old path: "
                   "whole rows re-encoded and decoded every step), each run in turn")
@click.option("--new-tokens", default=32, show_default=True)
@click.option("--prompts", "prompts_path", type=click.Path(dir_okay=False),
              help="JSON lines with a 'prompt' field (default: TriviaQA dev 5-shot prompts)")
@click.option("--repeat", default=3, show_default=True, help="repetitions after a warm-up")
@click.option("--clock", type=click.Choice(["wall", "cpu"]), default="wall", show_default=True,
              help="cpu: time everything as CPU time of the one thread that runs it (torch and the tokenizers "
                   "on one thread): figures that hold on a machine shared with other jobs")
@click.option("--compare", default="members,reference", show_default=True,
              help="comma-separated: members (each alone, same engine), reference (authors' loop), "
                   "exact (exact vs fast fusion, where exact mode's matrices fit in memory)")
@click.option("--reference-prompts", default=2, show_default=True)
@click.option("--reference-tokens", default=8, show_default=True)
@click.option("--output", type=click.Path(dir_okay=False), help="write the JSON here")
@click.option("--plots", type=click.Path(file_okay=False),
              help="write throughput.png and breakdown.png here (and host.png with --context)")
@click.option("--temperature", default=0.0, show_default=True,
              help="time a sampled run (every series draws at this temperature; 0: greedy)")
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--top-k", default=0, show_default=True)
@click.option("--logprobs", type=int, default=None, help="also report N alternatives' log-probabilities")
@click.option("--method", "method_spec", default=None,
              help="comma list of ensemble methods (deepen, unite, gac), each its own series of the run, "
                   "side by side: step vs the serial floor, the fused step's cost and share (default: the config's)")
@device_option
def bench_command(config, batch, contexts, host_paths, new_tokens, prompts_path, repeat, clock, compare,
                  reference_prompts, reference_tokens, output, plots, temperature, top_p, top_k, logprobs, device,
                  method_spec=None):
    """Throughput of the ensemble vs each member alone and vs the reference loop, as ratios
    from one run, with the share of step time in each part (min/median/max over --repeat), and
    the host's work per step (everything but the forward passes and the fused step's math)
    against the members' own, by prompt length with --context. Prints the CPU's flags."""
    from runtime.bench.bench import bench, bench_prompts, cpu_flags, exact_fuser_if_it_fits, plot, table
    from runtime.bench.context import host_plot, host_table
    from runtime.jobs.progress import peak_rss_mb
    from runtime.members.ensemble import anchors_entry, load_members, make_fuser
    if clock == "cpu":
        import os
        import torch
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        torch.set_num_threads(1)
    cfg = load_config(config)
    members = load_members(cfg, log=echo_err, device=pick_device(device))
    entry = anchors_entry(cfg, members, log=echo_err)
    fuser = make_fuser(cfg, members, entry)
    methods = None
    if method_spec:   # the config's method is the "ensemble" series; every other named one its own
        from runtime.bench.methods import method_fusers, parse_methods
        names = [m for m in parse_methods(method_spec) if m != cfg.method]
        methods = method_fusers(cfg, members, names, lambda c: anchors_entry(c, members, log=echo_err), make_fuser)
    exact = exact_fuser_if_it_fits(cfg, members, entry, log=echo_err) if "exact" in compare else None
    sampling = sampling_from(temperature, top_p, top_k, 1, logprobs)
    paths = host_paths.split(",")
    if set(paths) - {"incremental", "full"}:
        raise click.BadParameter("expected incremental and/or full", param_hint="--host-path")
    result = None
    for path in paths:
        part = bench(members, fuser, bench_prompts(prompts_path), [int(b) for b in batch.split(",")], new_tokens,
                     repeat, tuple(c for c in compare.split(",") if c and c != "none"), reference_prompts,
                     reference_tokens, log=echo_err, exact_fuser=exact, sampling=sampling,
                     contexts=[int(c) for c in contexts.split(",")] if contexts else None,
                     incremental=path == "incremental", **({"clock": time.thread_time} if clock == "cpu" else {}),
                     **({"methods": methods} if methods else {}))
        if result is None:
            result = part
        else:
            result["batches"] += part["batches"]
    result.update({"config": config, "mode": fuser.mode, "peak_rss_mb": round(peak_rss_mb(), 1),
                   "sampling": sampling.pack(), "cpu": cpu_flags(), "clock": clock})
    if output:
        Path(output).write_text(json.dumps(result, indent=1) + "\n")
    click.echo(f"CPU: {result['cpu']}" + ("; times are CPU time of one thread (--clock cpu)" if clock == "cpu" else ""))
    click.echo(table(result))
    if methods:
        from runtime.bench.methods import methods_table
        click.echo("")
        click.echo(methods_table(result, cfg.method))
    click.echo("")
    click.echo(host_table(result))
    click.echo(f"peak RSS of this process: {result['peak_rss_mb']} MB")
    if plots:
        for path in plot(result, plots):
            click.echo(f"plot: {path}")
        if contexts:
            click.echo(f"plot: {host_plot(result, Path(plots) / 'host.png')}")


@click.command("bench-compare", cls=Command)
@click.argument("first", type=click.Path(dir_okay=False, exists=True))
@click.argument("second", type=click.Path(dir_okay=False, exists=True))
def bench_compare(first, second):
    """Do two `deepen bench --output` results agree within the noise they report (their
    min..max tokens/s ranges overlap for every batch size and series)? Exit status 1 if not."""
    from runtime.bench.compare import compare_runs

    def load(path):
        try:
            result = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(result, dict) or not isinstance(result.get("batches"), list):
            raise ValueError(f"{path}: no 'batches' list: not a `deepen bench --output` result")
        return result

    text, ok = compare_runs(load(first), load(second))
    click.echo(text)
    click.echo("agree within the reported noise" if ok else "DIFFER beyond the reported noise")
    sys.exit(0 if ok else 1)


@click.group(cls=Group)
def measure():
    """Measurements of the fusion on real members (agreement, step time)."""


@measure.command("agreement")
@click.option("--config", "config", required=True, type=click.Path(dir_okay=False))
@click.option("--task", default="triviaqa", type=click.Choice(["triviaqa", "nq"]), show_default=True)
@click.option("--prompts", "n_prompts", default=26, show_default=True, help="dev questions")
@click.option("--new-tokens", default=20, show_default=True)
@click.option("--setting", "settings", multiple=True,
              help="fast-mode settings to compare, MASS_EPSILON:MAX_SUPPORT[:ROW_PRODUCT] (repeatable; default: the config's)")
@click.option("--batch", default=32, show_default=True)
@click.option("--capture", type=click.Path(file_okay=False),
              help="save every step's logits and exact tokens here (for `deepen measure replay`)")
@click.option("--output", type=click.Path(dir_okay=False), help="write the summary JSON here")
@device_option
def measure_agreement(config, task, n_prompts, new_tokens, settings, batch, capture, output, device):
    """Fast vs exact mode: decode with exact mode (no stop string) and run fast mode on the same
    logits at every fused step; report token agreement and the largest neglected mass."""
    from runtime.bench.measure import agreement, fast_fusers
    from runtime.evaluation.tasks import qa_prompts
    from runtime.jobs.progress import Progress
    from runtime.members.ensemble import anchors_entry, load_members, make_fuser
    cfg = load_config(config)
    members = load_members(cfg, log=echo_err, device=pick_device(device))
    entry = anchors_entry(cfg, members, log=echo_err)
    exact = make_fuser(cfg, members, entry, "exact")
    fast = fast_fusers(cfg, members, entry, settings)
    prompts = qa_prompts(task, "dev", n_prompts)
    t0 = time.perf_counter()
    with Progress(len(prompts), "prompts", "prompts") as bar:
        result = agreement(members, exact, fast, prompts, new_tokens, batch, progress=bar.update,
                           capture=capture)
    result.update({"config": config, "task": task, "prompts": len(prompts), "new_tokens": new_tokens,
                   "anchors": exact.transfers[0].num_anchors, "batch": batch, "seconds": round(time.perf_counter() - t0, 1)})
    _report(result, output)


@measure.command("replay")
@click.option("--config", "config", required=True, type=click.Path(dir_okay=False))
@click.option("--capture", required=True, type=click.Path(file_okay=False, exists=True))
@click.option("--setting", "settings", multiple=True, help="MASS_EPSILON:MAX_SUPPORT[:ROW_PRODUCT], e.g. 1e-4:256:bf16 (repeatable)")
@click.option("--output", type=click.Path(dir_okay=False), help="write the summary JSON here")
def measure_replay(config, capture, settings, output):
    """Fast-mode agreement on the steps an exact run captured (`measure agreement --capture`)."""
    from runtime.bench.measure import fast_fusers, replay
    from runtime.members.ensemble import anchors_entry, load_members
    cfg = load_config(config)
    members = load_members(cfg, with_models=False, log=echo_err)
    entry = anchors_entry(cfg, members, build=False)
    _report({"config": config, "capture": capture,
             "results": replay(capture, fast_fusers(cfg, members, entry, settings))}, output)


@measure.command("equality")
@click.option("--config", "config", required=True, type=click.Path(dir_okay=False))
@click.option("--prompts", "n_prompts", default=20, show_default=True, help="TriviaQA dev questions, 0-shot")
@click.option("--new-tokens", default=32, show_default=True)
@click.option("--batch", default=8, show_default=True)
@click.option("--output", type=click.Path(dir_okay=False), help="write the summary JSON here")
@device_option
def measure_equality(config, n_prompts, new_tokens, batch, output, device):
    """The engine (batched, KV-cached) against the reference loop (the authors' way: full
    re-tokenisation of the assists, no cache, rows independent), same fusion mode: token-for-token
    equality."""
    from runtime.bench.measure import equality, zero_shot_prompts
    from runtime.members.ensemble import anchors_entry, load_members, make_fuser
    cfg = load_config(config)
    members = load_members(cfg, log=echo_err, device=pick_device(device))
    fuser = make_fuser(cfg, members, anchors_entry(cfg, members, log=echo_err))
    result = equality(members, fuser, zero_shot_prompts(n_prompts), new_tokens, batch)
    result.update({"config": config, "mode": fuser.mode, "new_tokens": new_tokens, "batch": batch})
    _report(result, output)


@measure.command("step")
@click.option("--config", "config", required=True, type=click.Path(dir_okay=False))
@click.option("--batch", callback=positive_ints, default="1,8", show_default=True,
              help="comma-separated batch sizes")
@click.option("--steps", default=12, show_default=True, help="decode steps per batch size")
@click.option("--output", type=click.Path(dir_okay=False), help="write the summary JSON here")
@device_option
def measure_step(config, batch, steps, output, device):
    """Time of one fused step (transform + aggregation + search) next to the members' cached
    one-token forward passes of that step, at each batch size (medians over STEPS)."""
    from runtime.bench.measure import fusion_timing
    from runtime.evaluation.tasks import qa_prompts
    from runtime.members.ensemble import anchors_entry, load_members, make_fuser
    cfg = load_config(config)
    members = load_members(cfg, log=echo_err, device=pick_device(device))
    fuser = make_fuser(cfg, members, anchors_entry(cfg, members, log=echo_err))
    prompts = qa_prompts("triviaqa", "dev", 32)
    rows = [fusion_timing(members, fuser, prompts, int(b), steps) for b in batch.split(",")]
    _report({"config": config, "mode": fuser.mode, "results": rows}, output)


@measure.command("forward")
@click.option("--config", "config", required=True, type=click.Path(dir_okay=False))
@click.option("--member", default=None, help="the member to time (default: the main member)")
@click.option("--context", "contexts", callback=positive_ints, default="64,256,1024,2048,4096", show_default=True,
              help="comma-separated prompt lengths in the member's tokens")
@click.option("--batch", default=8, show_default=True)
@click.option("--new-tokens", default=16, show_default=True)
@click.option("--repeat", default=3, show_default=True)
@click.option("--output", type=click.Path(dir_okay=False), help="write the summary JSON here")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="write a PNG of ms/step against context here")
@device_option
def measure_forward(config, member, contexts, batch, new_tokens, repeat, output, plot_path, device):
    """A member's decode-step forward pass against context length: through our engine (member
    alone) and through transformers' `generate` on the same prompts (median ms/step)."""
    from runtime.bench.bench import bench_prompts, cpu_flags
    from runtime.bench.context import forward_plot, forward_table, forward_vs_context
    from runtime.members.ensemble import load_members
    cfg = load_config(config)
    members = load_members(cfg, log=echo_err, device=pick_device(device))
    chosen = members[0] if member is None else next((m for m in members if m.name == member), None)
    if chosen is None:
        raise ValueError(f"--member: no member named {member!r} (members: {', '.join(m.name for m in members)})")
    rows = forward_vs_context(chosen, bench_prompts(), [int(c) for c in contexts.split(",")], batch, new_tokens,
                              repeat, log=echo_err)
    result = {"config": config, "member": chosen.name, "cpu": cpu_flags(), "rows": rows}
    if output:
        Path(output).write_text(json.dumps(result, indent=1) + "\n")
    click.echo(f"CPU: {result['cpu']}")
    click.echo(forward_table(rows))
    if plot_path:
        click.echo(f"plot: {forward_plot(result, plot_path)}")


@measure.command("round-trips")
@click.option("--config", "config", required=True, type=click.Path(dir_okay=False))
@click.option("--batch", default=8, show_default=True)
@click.option("--new-tokens", default=16, show_default=True)
@click.option("--prompts", "prompts_path", type=click.Path(dir_okay=False),
              help="JSON lines with a 'prompt' field (default: TriviaQA dev 5-shot prompts)")
@click.option("--output", type=click.Path(dir_okay=False), help="write the summary JSON here")
@device_option
def measure_round_trips(config, batch, new_tokens, prompts_path, output, device):
    """Host round-trips per step (a tensor's values read into Python: item, tolist, bool, int,
    float, index, cpu, numpy): the ensemble, each member alone through the same engine, and the
    ensemble's own (its count less the members')."""
    from runtime.bench.bench import batch_of, bench_prompts
    from runtime.engine.roundtrips import per_step
    from runtime.engine.engine import Engine
    from runtime.engine.sequence import Request
    from runtime.members.ensemble import anchors_entry, load_members, make_fuser, single_fuser
    cfg = load_config(config)
    members = load_members(cfg, log=echo_err, device=pick_device(device))
    fuser = make_fuser(cfg, members, anchors_entry(cfg, members, log=echo_err))
    prompts = batch_of(bench_prompts(prompts_path), batch)
    requests = lambda: [Request(i, p, new_tokens) for i, p in enumerate(prompts)]  # noqa: E731
    Engine(members, fuser, batch).run(requests()[:2])   # warm-up: first-use work is not a step's
    result = {"config": config, "batch": batch, "ensemble": per_step(lambda: Engine(members, fuser, batch), requests())}
    result["members"] = {m.name: per_step(lambda m=m: Engine([m], single_fuser([m]), batch), requests()) for m in members}
    result["ensemble_own"] = result["ensemble"]["per_step"] - sum(v["per_step"] for v in result["members"].values())
    _report(result, output)


def _report(result: dict, output: str | None):
    text = json.dumps(result, indent=1)
    click.echo(text)
    if output:
        Path(output).write_text(text + "\n")


COMMANDS = [bench_command, bench_compare, measure]
