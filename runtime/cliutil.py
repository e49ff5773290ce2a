"""Shared CLI plumbing: bad input -> one line on stderr and exit 2."""
from __future__ import annotations

import contextlib
import sys

import click

from inducekv.runtime.errors import InduceKVError


class BadInput(click.ClickException):
    exit_code = 2

    def show(self, file=None):
        click.echo(f"Error: {self.format_message()}", err=True)


@contextlib.contextmanager
def fail_on_bad_input():
    """Turn our errors (and unreadable files) into exit code 2 with one line."""
    try:
        yield
    except InduceKVError as e:
        raise BadInput(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        raise BadInput(f"{e.strerror}: {e.filename}") from None


def progress_enabled(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()
