"""Shared CLI plumbing: bad input -> one line on stderr and exit 2; byte sizes; progress."""
from __future__ import annotations

import contextlib
import re
import sys
import time

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


PLAIN_PROGRESS_INTERVAL_S = 10.0  # off a terminal: at most one progress line per bar this often


def progress_enabled(quiet: bool) -> bool:
    """Whether a CLI shows progress (tqdm bars) on stderr: not with --quiet.

    On a terminal the bars redraw in place. Anywhere else (a log file, CI) stderr is
    wrapped once in :class:`PlainProgress`, which turns the redraws into occasional
    plain lines, so a long step is visible without filling the log.
    """
    if quiet:
        return False
    if not sys.stderr.isatty() and not isinstance(sys.stderr, PlainProgress):
        sys.stderr = PlainProgress(sys.stderr)
    return True


class PlainProgress:
    """A text stream over stderr for when it is not a terminal.

    tqdm redraws a bar by writing ``"\\r" + status``. Here a bar's status becomes a
    plain line, without the bar graphic, once the bar has run ``interval`` seconds,
    then at most every ``interval`` seconds, and when it completes::

        encode: 45% 9/20 [00:30<00:36, 3.33s/ex]

    A bar that ends or fails sooner prints only its completion (or nothing), so a
    quick bad-input error stays one line. tqdm's line feeds and cursor moves are
    dropped; everything else passes through unchanged.
    """

    def __init__(self, stream, interval: float = PLAIN_PROGRESS_INTERVAL_S, clock=time.monotonic):
        self.stream, self.interval, self.clock = stream, interval, clock
        self._bar: str | None = None    # description of the bar being drawn
        self._since = 0.0               # when it started or last printed a line
        self._shown: tuple | None = None  # (description, n, total) of the last line printed
        self._open = False              # the last text passed through did not end its line

    def write(self, text: str) -> int:
        if text.startswith("\r"):
            self._redraw(re.sub(r"\|[^|]*\| ", " ", text[1:], count=1).strip())
        elif _CURSOR.fullmatch(text) and not (text == "\n" and self._open):
            pass  # tqdm's line feeds and cursor-up moves: nothing to show off a terminal
        else:
            self.stream.write(text)
            self._open = not text.endswith("\n")
        return len(text)

    def _redraw(self, status: str) -> None:
        m = _STATUS.match(status)
        if m is None:  # a cleared bar, or one without a total
            return
        key, now = (m["desc"], m["n"], m["total"]), self.clock()
        if m["n"] == "0" or m["desc"] != self._bar:  # a new bar
            self._bar, self._since = m["desc"], now
        if (m["n"] == m["total"] and key != self._shown) or (m["n"] != "0" and now - self._since >= self.interval):
            self.stream.write(status + "\n")
            self.stream.flush()
            self._shown, self._since = key, now

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name):  # flush, fileno, encoding, errors, buffer, ...
        return getattr(self.stream, name)


_STATUS = re.compile(r"(?P<desc>.*?):?\s*\d+%\s+(?P<n>\d+)/(?P<total>\d+) \[")  # "encode:  45% 9/20 [..."
_CURSOR = re.compile(r"(\n|\x1b\[A)*")


_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3,
          "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_bytes(text: str) -> int:
    """``16MiB`` -> 16777216, ``500KB`` -> 500000, ``4096`` -> 4096 (K/M/G alone are binary)."""
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
