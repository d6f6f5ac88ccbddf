"""What the `deepen` commands share: one-line errors for expected failures (exit status 2)."""
from __future__ import annotations

import sys

import click

from runtime.members.config import ConfigError
from runtime.members.sources import MemberError

EXPECTED = (ConfigError, MemberError, FileNotFoundError, FileExistsError, ValueError)  # InputError is a ValueError


def echo_err(message: str):
    click.echo(message, err=True)


def fail(message: str):
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


class Command(click.Command):
    """Expected errors (bad config, missing member, bad input) end in one line, exit status 2."""

    def invoke(self, ctx):
        from runtime.versions import check_versions
        problem = check_versions(("transformers",), warn=echo_err)
        if problem:
            fail(problem)
        try:
            return super().invoke(ctx)
        except EXPECTED as e:
            fail(str(e))


class Group(click.Group):
    command_class = Command
    group_class = type


def sampling_options(f):
    """--temperature, --top-p, --top-k, --seed, --samples, --logprobs: the job's sampling defaults (a
    request's own JSON-lines fields override them)."""
    options = [
        click.option("--temperature", default=0.0, show_default=True,
                     help="0: greedy decoding; > 0: draw from the fused distribution"),
        click.option("--top-p", default=1.0, show_default=True, help="nucleus: keep the most likely tokens holding this mass"),
        click.option("--top-k", default=0, show_default=True, help="keep the k most likely tokens (0: all)"),
        click.option("--seed", default=0, show_default=True,
                     help="the job's seed: a request without its own 'seed' draws from (seed, its id)"),
        # not --n: the deepspeed launcher's parser takes any prefix of its own options (--num_gpus)
        click.option("--samples", "n", default=1, show_default=True,
                     help="samples per prompt, the field 'n' (ids <id>#<k>)"),
        click.option("--logprobs", type=int, default=None,
                     help="add each token's log-probability (fused, and the main model's alone) and the "
                          "N most likely alternatives (0: the chosen token's only)"),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def sampling_from(temperature, top_p, top_k, n, logprobs):
    """The job's SamplingParams; a bad value is a one-line error naming the option."""
    import re

    from runtime.engine.sampling import SamplingParams
    try:
        return SamplingParams(temperature, top_p, top_k, None, n, logprobs).check()
    except ValueError as e:
        raise ValueError(re.sub(r"field '(\w+)'", lambda m: "--" + {"n": "samples"}.get(m.group(1), m.group(1)).replace("_", "-"), str(e))) from None


def positive_ints(ctx, param, value):
    """click callback: a comma-separated list of positive integers (batch sizes, prompt lengths),
    checked before anything loads; the value is passed on as given."""
    if value is None:
        return value
    try:
        ok = all(int(v) > 0 for v in str(value).split(","))
    except ValueError:
        ok = False
    if not ok:
        raise click.BadParameter(f"expected comma-separated positive integers, got {value!r}")
    return value
