"""Host round-trips: how often decoding brings a tensor's values into Python.

On a GPU each such conversion waits for the device to finish what it was given (a sync) and
copies to the host; a step should make few. `counting()` counts the Python-level conversions of
any tensor (item, tolist, bool, int, float, index, cpu, numpy) while it is active; on the CPU they
cost nothing, but their number is the number a GPU run would pay. `per_step` runs a job and
divides by its steps; the ensemble's own round-trips are its count less its members' alone.
With DEEPEN_COUNT_ROUND_TRIPS=1 every Engine (and Pipeline) counts its run (`maybe_counting`)
and reports `round_trips_per_step`: under the launcher, every rank's --stats.
"""
from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext

import torch

CONVERSIONS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")


@contextmanager
def counting():
    """A dict {"total": n, <conversion>: n} that counts conversions until the block ends."""
    counts = {"total": 0, **{name: 0 for name in CONVERSIONS}}
    saved = {name: torch.Tensor.__dict__.get(name) for name in CONVERSIONS}

    def wrap(name):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, **kwargs):
            counts["total"] += 1
            counts[name] += 1
            return original(self, *args, **kwargs)
        return counted

    for name in CONVERSIONS:
        setattr(torch.Tensor, name, wrap(name))
    try:
        yield counts
    finally:
        for name, original in saved.items():
            if original is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)


def per_step(make_engine, requests) -> dict:
    """Round-trips per step of one run: {"steps", "per_step", and per conversion}."""
    engine = make_engine()
    with counting() as counts:
        engine.run(requests)
    steps = max(engine.steps, 1)
    return {"steps": engine.steps, "per_step": counts["total"] / steps,
            **{k: v / steps for k, v in counts.items() if k != "total" and v}}


def maybe_counting():
    """`counting()` when DEEPEN_COUNT_ROUND_TRIPS=1, else a block that counts nothing (None)."""
    return counting() if os.environ.get("DEEPEN_COUNT_ROUND_TRIPS") == "1" else nullcontext()
