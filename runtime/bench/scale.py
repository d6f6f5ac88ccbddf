"""The fused step at large-model scale, without the models: a synthetic main member (128k tokens,
d 8192) against 100k anchors and an assist (152k tokens, d 8192), as a 70B-class main with a
Qwen2-class assist would be. Relative transform of both members + aggregation + fast search, at
several batch sizes, on each device asked for: milliseconds per step and peak memory.

The transfers hold random unit embeddings and *synthetic* per-token scalars (not the exact sweep,
which alone is ~10^14 multiply-adds): the values are plausible, the cost is the real one. Logits
are random and flat (every row's support is capped at max_support): the worst case for fast mode.

    python -m runtime.bench.scale --devices cuda,cpu --batch 1,8,32 --output scale.json

With --output, scale.json and scale.md are written after every row (device, batch size), so a run
cut short by a timeout keeps the figures it has.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch

from ..deepen.fusion import FastSettings, Fuser
from ..deepen.relative import TEMPERATURE, LowRankTransfer
from ..deepen.search import SearchSettings


def synthetic_transfer(vocab: int, d: int, anchors: int, device, seed: int, clusters: int = 256) -> LowRankTransfer:
    g = torch.Generator(device=device).manual_seed(seed)
    unit = torch.randn(vocab, d, generator=g, device=device)
    unit /= unit.norm(dim=-1, keepdim=True)
    anchor_ids = torch.randperm(vocab, generator=g, device=device)[:anchors].sort().values
    # random unit vectors: cos ~ N(0, 1/d), so ||R_t|| ~ sqrt(|A|/d) and the softmax normaliser of
    # 100 R_t/||R_t|| is about log|A| + (100^2 / |A|) / 2
    inv_norm = torch.full((vocab,), math.sqrt(d / anchors), device=device)
    log_z = torch.full((vocab,), math.log(anchors) + TEMPERATURE ** 2 / anchors / 2, device=device)
    cluster_of = torch.randint(0, clusters, (vocab,), generator=g, device=device)
    cluster_rows = torch.full((clusters, anchors), 1.0 / anchors, device=device)
    return LowRankTransfer(unit, anchor_ids, inv_norm, log_z, cluster_rows[0], TEMPERATURE, 512, cluster_of,
                           cluster_rows)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(fuser: Fuser, vocabs: list[int], batch: int, device, repeat: int, seed: int = 0) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)
    times = []
    for r in range(repeat + 1):  # the first is a warm-up
        logits = [(torch.randn(batch, v, generator=g) * 2).to(device) for v in vocabs]
        sync(device)
        t0 = time.perf_counter()
        fuser.step(logits).tokens.tolist()
        sync(device)
        if r:
            times.append(time.perf_counter() - t0)
    return {"step_ms": 1000 * statistics.median(times), "min_ms": 1000 * min(times), "max_ms": 1000 * max(times)}


def run(devices, batches, main_vocab=128_000, assist_vocab=152_000, d=8192, anchors=100_000, repeat=3,
        budget_s=60.0, log=print, cpu_repeat=1, on_row=None) -> dict:
    """`on_row(result)`, if given, is called after every measured row with the result so far: a
    run stopped by a timeout keeps what it measured."""
    out = {"main_vocab": main_vocab, "assist_vocab": assist_vocab, "d": d, "anchors": anchors,
           "settings": "fast mode, mass_epsilon 1e-4, max_support 256, eta 0.15, 5 steps", "results": []}
    for device in devices:
        if torch.device(device).type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        log(f"{device}: building synthetic transfers ({main_vocab:,} and {assist_vocab:,} x {d} vs {anchors:,} anchors)")
        transfers = [synthetic_transfer(main_vocab, d, anchors, device, 1), synthetic_transfer(assist_vocab, d, anchors, device, 2)]
        fuser = Fuser(transfers, [0.5, 0.5], SearchSettings(eta=0.15, steps=5), "fast", FastSettings(1e-4, 256))
        resident = sum(t.nbytes() for t in transfers) / 2**30
        for batch in batches:
            t0 = time.perf_counter()
            row = {"device": str(device), "batch": batch, "resident_gib": round(resident, 2)}
            row.update(time_steps(fuser, [main_vocab, assist_vocab], batch, device,
                                  cpu_repeat if torch.device(device).type == "cpu" else repeat))
            if torch.device(device).type == "cuda":
                row["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            out["results"].append(row)
            log(f"{device} batch {batch}: {row['step_ms']:.1f} ms per fused step")
            if on_row is not None:
                on_row(out)
            if time.perf_counter() - t0 > budget_s:
                log(f"{device}: over {budget_s:.0f} s for batch {batch}: larger batches skipped")
                break
        del transfers, fuser
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return out


def table(result: dict) -> str:
    lines = [f"Fused step (relative transform of both members + search), synthetic {result['main_vocab']:,}-token main "
             f"and {result['assist_vocab']:,}-token assist, d {result['d']}, {result['anchors']:,} anchors; {result['settings']}.",
             "", "| device | batch | ms per step (median, min..max) | transfers resident GiB | peak GPU GiB |",
             "|---|---|---|---|---|"]
    for r in result["results"]:
        lines.append(f"| {r['device']} | {r['batch']} | {r['step_ms']:.1f} ({r['min_ms']:.1f}..{r['max_ms']:.1f}) | "
                     f"{r['resident_gib']} | {r.get('peak_gpu_gib', '–')} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="cuda,cpu")
    parser.add_argument("--batch", default="1,8,32")
    parser.add_argument("--scale", type=float, default=1.0, help="shrink vocabularies, d and anchors (a smoke test)")
    parser.add_argument("--repeat", type=int, default=3, help="timed steps per batch size (after a warm-up)")
    parser.add_argument("--cpu-repeat", type=int, default=1, help="the same on the CPU (slow at full scale)")
    parser.add_argument("--budget", type=float, default=60.0, help="seconds per batch size before larger ones are skipped")
    parser.add_argument("--output")
    args = parser.parse_args()
    k = args.scale
    result = run(args.devices.split(","), [int(b) for b in args.batch.split(",")], int(128_000 * k), int(152_000 * k),
                 max(64, int(8192 * k)), int(100_000 * k), args.repeat, args.budget, cpu_repeat=args.cpu_repeat,
                 on_row=(lambda r: write(r, args.output)) if args.output else None)
    print(table(result))
    if args.output:
        write(result, args.output)


def write(result: dict, output: str):
    """The JSON and its markdown table, rewritten whole (a new file, then renamed) after each row."""
    for path, text in ((output, json.dumps(result, indent=1)), (output.rsplit(".", 1)[0] + ".md", table(result) + "\n")):
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
