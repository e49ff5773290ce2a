"""How often a bank's entries were served: the record that promotion on use reads (issue 19).

A serving runtime counts, per query with memory, whether a gate sent it to the plain prompt
and which entries it injected; an app (or ``ikv-run``/``ikv-eval --uses FILE``) adds those
counts to a small JSON file next to the bank. ``ikv-learn --promote FILE`` then re-encodes the
most-used source entries as kv and drops the kv copies of the least-used ones, in place and
off the serving path. Entries are named by their example hash (``bank.example_hash``), so a
count follows the example, not the slot it sits in::

    {"format": "inducekv-uses", "version": 1,
     "queries": 250,          # queries asked with memory (k > 0)
     "gated_out": 31,         # of them, those no entry passed the gates for (the plain prompt)
     "top": {"<32 hex>": 12, ...},       # queries whose top (first) injected entry was this example
     "entries": {"<32 hex>": 15, ...}}   # queries that injected this example at all (k > 1: several)

The file is untrusted input: it is size-bounded, every count must be a non-negative integer
and every name 32 hex digits. It is written atomically (a temporary file, then a rename), so a
kill leaves the old record or the new one.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from inducekv.core.errors import InduceKVError

FORMAT = "inducekv-uses"
VERSION = 1
MAX_FILE_BYTES = 64 << 20     # ~1M entries' counts
_HEX = re.compile(r"[0-9a-f]{32}")


@dataclass
class Uses:
    """Counts of queries served from a bank (see the module docstring)."""
    queries: int = 0
    gated_out: int = 0
    top: dict[bytes, int] = field(default_factory=dict)      # example hash -> queries it was first for
    entries: dict[bytes, int] = field(default_factory=dict)  # example hash -> queries that injected it

    def add(self, other: "Uses") -> "Uses":
        """These counts plus ``other``'s (a new record)."""
        out = Uses(self.queries + other.queries, self.gated_out + other.gated_out, dict(self.top), dict(self.entries))
        for mine, theirs in ((out.top, other.top), (out.entries, other.entries)):
            for h, n in theirs.items():
                mine[h] = mine.get(h, 0) + n
        return out

    def as_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "queries": self.queries, "gated_out": self.gated_out,
                "top": {h.hex(): n for h, n in sorted(self.top.items())},
                "entries": {h.hex(): n for h, n in sorted(self.entries.items())}}


def _count(v, what: str, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise InduceKVError(f"{where}: {what} must be a non-negative integer, got {v!r}")
    return v


def _counts(raw, what: str, where: str) -> dict[bytes, int]:
    if not isinstance(raw, dict):
        raise InduceKVError(f"{where}: \"{what}\" must be an object of example hash -> count")
    out = {}
    for h, n in raw.items():
        if not isinstance(h, str) or not _HEX.fullmatch(h):
            raise InduceKVError(f"{where}: {h!r} in \"{what}\" is not an example hash (32 lower-case hex digits)")
        out[bytes.fromhex(h)] = _count(n, f"the count of {h}", where)
    return out


def from_dict(obj, where: str = "uses record") -> Uses:
    """A ``Uses`` from its JSON object; InduceKVError (one line) when it is not one."""
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise InduceKVError(f"{where} is not an inducekv uses record (\"format\": \"{FORMAT}\" is missing)")
    if obj.get("version") != VERSION:
        raise InduceKVError(f"{where} has uses record version {obj.get('version')!r}; this inducekv reads {VERSION}")
    u = Uses(_count(obj.get("queries", 0), "queries", where), _count(obj.get("gated_out", 0), "gated_out", where),
             _counts(obj.get("top", {}), "top", where), _counts(obj.get("entries", {}), "entries", where))
    if u.gated_out > u.queries:
        raise InduceKVError(f"{where}: gated_out ({u.gated_out}) is more than queries ({u.queries})")
    return u


def read(path) -> Uses:
    """The record in ``path`` (bounded, validated); InduceKVError when it is missing or bad."""
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as e:
        raise InduceKVError(f"cannot read the uses record {p}: {e.strerror or e}") from None
    if size > MAX_FILE_BYTES:
        raise InduceKVError(f"{p} is {size} bytes; a uses record is at most {MAX_FILE_BYTES}")
    try:
        obj = json.loads(p.read_bytes())
    except (OSError, ValueError) as e:
        raise InduceKVError(f"{p} is not a JSON uses record: {e}") from None
    return from_dict(obj, str(p))


def write(path, uses: Uses) -> None:
    """Write ``uses`` to ``path`` atomically (a kill leaves the old file or the new one)."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent if str(p.parent) else ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(uses.as_dict(), f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def add_to(path, uses: Uses) -> Uses:
    """Add ``uses`` to the record in ``path`` (created when absent); returns the sum written."""
    p = Path(path)
    total = read(p).add(uses) if p.exists() else uses
    write(p, total)
    return total


class Counter:
    """Thread-safe counts of one serving process (``runtime.memory.Memory`` keeps one)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._uses = Uses()

    def record(self, hashes: list[bytes], gated_out: bool) -> None:
        """One query with memory: the example hashes it injected, best first (none: gated out,
        or nothing retrieved)."""
        with self._lock:
            u = self._uses
            u.queries += 1
            u.gated_out += int(gated_out)
            if hashes:
                u.top[hashes[0]] = u.top.get(hashes[0], 0) + 1
            for h in dict.fromkeys(hashes):
                u.entries[h] = u.entries.get(h, 0) + 1

    def peek(self) -> Uses:
        with self._lock:
            return Uses().add(self._uses)

    def give_back(self, uses: Uses) -> None:
        """Counts taken that could not be saved: counted again."""
        with self._lock:
            self._uses = self._uses.add(uses)

    def take(self) -> Uses:
        """The counts so far, and start again from zero (so a record is never added twice)."""
        with self._lock:
            out, self._uses = self._uses, Uses()
            return out
