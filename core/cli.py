"""Shared CLI plumbing: bad input -> one line on stderr and exit 2."""
from __future__ import annotations

import contextlib
import sys

import click

from inducekv.core.errors import InduceKVError


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


_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3,
          "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_bytes(text: str) -> int:
    """``16MiB`` -> 16777216, ``500KB`` -> 500000, ``4096`` -> 4096 (K/M/G alone are binary)."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a byte size; write e.g. 16MiB, 500KB or 4096")
    return int(float(m.group(1)) * _UNITS[unit])


class ByteSize(click.ParamType):
    name = "SIZE"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            return parse_bytes(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)
