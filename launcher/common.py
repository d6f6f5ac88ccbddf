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
        try:
            return super().invoke(ctx)
        except EXPECTED as e:
            fail(str(e))


class Group(click.Group):
    command_class = Command
    group_class = type
