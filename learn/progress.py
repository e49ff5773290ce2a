"""Progress of a learn's long steps: tqdm bars (``ikv-learn``) or an app's callback.

Every step that loops over examples, queries or anchors iterates through ``steps``::

    progress=True                       tqdm bars on stderr (the CLI; plain lines off a terminal)
    progress=callback                   callback(stage, done, total) at 0 and after each item
    progress=None / False               silent

Stages, in order: ``encode`` and ``value`` (one per example), ``calibrate`` and ``weighting`` (held-out
queries), ``value gates`` (gate settings tried), ``gate`` (held-out queries), ``retain`` (old tasks' anchors), then ``select`` and ``write`` (0/1, then 1/1).
A stage with nothing to do is not reported.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, TypeVar, Union

from tqdm.auto import tqdm

Callback = Callable[[str, int, int], None]   # (stage, done, total)
Progress = Union[bool, Callback, None]
T = TypeVar("T")


def steps(items: Iterable[T], stage: str, unit: str, progress: Progress) -> Iterator[T]:
    """Yield ``items``, reporting each one as done once the caller's loop body has run."""
    if not callable(progress):
        yield from tqdm(items, desc=stage, unit=unit, disable=not progress)
        return
    items = list(items)
    progress(stage, 0, len(items))
    for done, item in enumerate(items, start=1):
        yield item
        progress(stage, done, len(items))


def report(progress: Progress, stage: str, done: int, total: int) -> None:
    """One report of a step without a loop (``select``, ``write``): callbacks only."""
    if callable(progress):
        progress(stage, done, total)
