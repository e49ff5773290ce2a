"""The memory bank: one preallocated, byte-capped ``.ikv`` file of KV memory entries.

Commit protocol (copy-on-write, two copies of every mutable region)::

    superblock copies  [A gen=7] [B gen=8]   <- current = valid copy with the higher gen
    record copies      slot s: [copy 0][copy 1], superblock bitmap bit s says which is current
    pages              free = not listed by any current record

    1. payload -> free pages              (pwrite)
    2. new record -> the slot's other copy (pwrite)
    3. catalog / calibration / key scales -> their other copy, if changed
    4. fdatasync
    5. superblock gen+1 with flipped bits -> the older superblock copy, fdatasync

Killed before step 5 completes, the old superblock still names only old bytes
(steps 1-3 touched nothing it references): the bank is exactly as before. After
step 5, it is exactly the new state. A reader never locks: it checks the CRC of
every record and payload it serves and, on a mismatch (the writer reused those
bytes after a later commit), re-reads the superblock and retries. One writer at a
time holds ``flock(LOCK_EX)`` on the file.
"""
from __future__ import annotations

from copy import deepcopy
import fcntl
import hashlib
import json
import logging
import mmap
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inducekv.kernels import kvquant
from inducekv.memory import format as fmt
from inducekv.core.errors import BankError

log = logging.getLogger(__name__)

READ_RETRIES = 8
_RETRY = object()   # a _read_live ``use`` result: this copy failed a checksum


@dataclass(frozen=True, slots=True)
class EntryInfo:
    slot: int            # where it lives now; reused after removal
    entry_id: int        # unique for the life of the bank; never reused
    task: str
    tokens: int
    nbytes: int          # payload bytes (quantized)
    pages: int           # pages it occupies
    example_hash: bytes  # 16 bytes, see ``example_hash``
    kind: str = "kv"     # "kv": quantized K/V; "source": the example's bytes (``memory/source.py``)


@dataclass(frozen=True)
class Snapshot:
    """A bank's committed state, read-only (``Bank.snapshot``)."""
    gen: int
    next_entry_id: int               # the id the next added entry gets
    entries: tuple[EntryInfo, ...]   # live entries, slot order
    keys: np.ndarray                 # (N, key_dim) float32 retrieval keys, row i = entries[i]
    catalog: dict                    # tasks, anchors, template, extras (a copy)


@dataclass(frozen=True)
class Record:
    """One live record as stored (``Bank.records``), for consistency checks."""
    slot: int
    entry_id: int
    task_id: int
    tokens: int
    nbytes: int
    n_pages: int
    pages: np.ndarray    # (n_pages,) int64 page numbers
    payload_crc: int
    kind: int = fmt.KIND_KV


@dataclass(frozen=True)
class NewEntry:
    keys: np.ndarray | None    # (L, H_kv, T, D) float32; None when ``payload`` is given
    values: np.ndarray | None  # (L, H_kv, T, D) float32
    key: np.ndarray            # (key_dim,) float32 retrieval key
    task: str
    example_hash: bytes = b"\0" * 16
    payload: bytes | None = None  # already packed with the bank's scheme (kvquant.pack)
    tokens: int = 0               # token count of ``payload`` (a source entry: of its rendered entry)
    source: bytes | None = None   # a ``source`` entry: ``memory.source.pack_source`` bytes, no K/V


def example_hash(example: dict) -> bytes:
    """16-byte digest of a task example (canonical JSON), stored with its entry."""
    return hashlib.blake2b(json.dumps(example, sort_keys=True, ensure_ascii=False).encode(), digest_size=16).digest()


def _empty_catalog() -> dict:
    return {"tasks": {}, "next_task_id": 0, "template": None, "extra": {}}


def _check_catalog(cat, where: str) -> dict:
    ok = (isinstance(cat, dict) and isinstance(cat.get("tasks"), dict) and isinstance(cat.get("next_task_id"), int)
          and all(isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("anchors", []), list)
                  for t in cat["tasks"].values()))
    if not ok:
        raise BankError(f"{where}: bank catalog is malformed")
    return cat


class Bank:
    """A bank file opened for reading (any number of processes) or writing (one).

    One ``Bank`` object is for one thread at a time: ``reload`` replaces its state attribute by
    attribute. Threads that share one (``runtime.memory.Memory``) take a lock around it; other
    ``Bank`` objects and other processes on the same file need none."""

    def __init__(self, path: Path, fd: int, geo: fmt.Geometry, writable: bool):
        self.path, self._fd, self.geo, self.writable = path, fd, geo, writable
        self._mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        self.offsets = geo.offsets()  # section name -> byte offset in the file
        self._rdt = geo.record_dtype
        self._crc_at = self._rdt.fields["crc"][1]  # byte offset of the record CRC
        self.gen = -1
        self.reload()

    # ---------------------------------------------------------------- open/create
    @classmethod
    def create(cls, path, cap: int, *, force: bool = False, **plan) -> "Bank":
        """Create an empty bank of at most ``cap`` bytes (see ``format.plan`` for options); opened writable."""
        path = Path(path)
        if path.exists() and not force:
            raise BankError(f"{path} already exists; pass force=True (--force) to replace it")
        try:
            geo = fmt.plan(int(cap), **plan)
        except ValueError as e:
            raise BankError(str(e)) from None
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                os.posix_fallocate(f.fileno(), 0, geo.file_bytes)  # real blocks: the cap is bytes on disk
                f.write(geo.header_bytes())
                sb = fmt.Superblock(1, 1, 0, 0, 0, 0, 0, 0, 0, np.zeros(geo.slots, np.uint8))
                f.seek(geo.offsets()["superblock"] + geo.superblock_bytes)  # copy 1 (gen 1 % 2)
                f.write(sb.to_bytes(geo))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        log.info("created %s: %d bytes, %d slots, %d pages of %d bytes", path, geo.file_bytes, geo.slots, geo.pages, geo.page_bytes)
        return cls.open(path, writable=True)

    @classmethod
    def create_for(cls, path, cap: int, manifest, *, scheme: str = "int8", force: bool = False, **plan) -> "Bank":
        """``create`` with the model shape, fingerprint and key size taken from a bundle manifest."""
        if not manifest.retrieval_key:
            raise BankError("this bundle has no retrieval-key graph; re-export it with this inducekv version")
        return cls.create(path, cap, force=force, fingerprint=manifest.fingerprint, scheme=scheme,
                          num_layers=manifest.num_layers, kv_heads=manifest.num_kv_heads, head_dim=manifest.head_dim,
                          key_dim=int(manifest.retrieval_key["dim"]), **plan)

    @classmethod
    def open(cls, path, *, writable: bool = False, fingerprint: str | None = None) -> "Bank":
        path = Path(path)
        if not path.is_file():
            raise BankError(f"bank {path} does not exist (create one with ikv-learn --budget or ikv-bank create)")
        fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        try:
            if writable:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise BankError(f"{path} is being written by another process; wait for it to finish") from None
            size = os.fstat(fd).st_size
            geo = fmt.parse_header(os.pread(fd, 8, 0), lambda o, n: os.pread(fd, n, o), size, str(path))
            if fingerprint is not None and fingerprint != geo.fingerprint:
                raise BankError(f"{path} was built for another model (bank fingerprint {geo.fingerprint[:12]}, "
                                f"bundle {fingerprint[:12]}); use the bundle it was built with or a new bank")
            return cls(path, fd, geo, writable)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        if self._fd >= 0:
            self._mm.close()
            os.close(self._fd)  # releases the writer lock
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---------------------------------------------------------------- reading state
    def _region(self, name: str, copy: int, n: int | None = None) -> bytes:
        shape = self.geo.section_shapes()[name]
        size = shape[-1]
        start = self.offsets[name] + copy * size
        return self._mm[start:start + (size if n is None else n)]

    def region(self, name: str, copy: int, n: int | None = None) -> bytes:
        """Raw bytes of copy ``copy`` (0/1) of a double-buffered section (``superblock``,
        ``catalog``, ``calibration``), unchecked: for ``verify``."""
        return self._region(name, copy, n)

    def _superblock(self) -> tuple[fmt.Superblock, int]:
        best = None
        for copy in (0, 1):
            sb = fmt.Superblock.parse(self._region("superblock", copy), self.geo)
            if sb is not None and (best is None or sb.gen > best[0].gen):
                best = (sb, copy)
        if best is None:
            raise BankError(f"{self.path}: both superblock copies are corrupt; the bank cannot be read")
        return best

    def _records(self, bitmap: np.ndarray) -> np.ndarray:
        """Current record copy of every slot, raw bytes (S, R)."""
        S, R = self.geo.slots, self.geo.record_bytes
        raw = np.frombuffer(self._mm, np.uint8, S * 2 * R, self.offsets["records"]).reshape(S, 2, R)
        return raw[np.arange(S), bitmap.astype(np.intp)].copy()

    def _record_ok(self, raw: np.ndarray) -> bool:
        """Magic and CRC of one raw record (R,) hold."""
        at = self._crc_at
        return raw[:4].tobytes() == fmt.RECORD_MAGIC and int.from_bytes(raw[at:at + 4].tobytes(), "little") == fmt.record_crc(raw, self._rdt)

    def reload(self) -> None:
        """Read the committed state (superblock, records, catalog) again. A commit racing the
        read is retried up to ``READ_RETRIES`` times; a bad checksum with no commit in between
        is damage and raises."""
        for _ in range(READ_RETRIES):
            got = self._read_state()
            if got is not None:
                break
        else:
            raise BankError(f"{self.path}: the bank changed on every read attempt; retry later")
        sb, copy, recs, live, catalog = got
        self.gen, self._sb, self._sb_copy, self._recs, self._live, self.catalog = sb.gen, sb, copy, recs, live, catalog
        self._task_names = {int(k): v["name"] for k, v in catalog["tasks"].items()}

    _load = reload

    def _read_state(self):
        """One attempt: (superblock, copy, records, live mask, catalog), or None when a commit raced it."""
        sb, copy = self._superblock()
        raw = self._records(sb.bitmap)
        catalog = self._read_catalog(sb)
        if self._superblock()[0].gen != sb.gen:
            return None
        recs = raw.view(self._rdt).reshape(-1)
        live = np.zeros(self.geo.slots, bool)
        for s in np.flatnonzero(recs["magic"] != b""):
            if not self._record_ok(raw[s]):
                if self._superblock()[0].gen != sb.gen:
                    return None
                raise BankError(f"{self.path}: record of slot {s} is corrupt (checksum); run ikv-bank verify")
            live[s] = recs[s]["state"] == fmt.STATE_LIVE
        return sb, copy, recs, live, catalog

    def _read_catalog(self, sb: fmt.Superblock) -> dict:
        if sb.catalog_len == 0:
            return _empty_catalog()
        raw = self._region("catalog", sb.catalog_copy, sb.catalog_len)
        if zlib.crc32(raw) != sb.catalog_crc:
            return _empty_catalog() if self._superblock()[0].gen != sb.gen else self._corrupt("catalog")
        try:
            return _check_catalog(json.loads(raw.decode("utf-8")), str(self.path))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            self._corrupt("catalog")

    def _corrupt(self, what: str):
        raise BankError(f"{self.path}: {what} is corrupt (checksum); run ikv-bank verify")

    def refresh(self) -> bool:
        """Pick up commits made by a writer since the last look. True when something changed."""
        if self._superblock()[0].gen == self.gen:
            return False
        self.reload()
        return True

    # ---------------------------------------------------------------- queries
    def slots(self) -> np.ndarray:
        """Slots holding a live entry."""
        return np.flatnonzero(self._live)

    def entry(self, slot: int) -> EntryInfo:
        r = self._recs[slot]
        if not self._live[slot]:
            raise BankError(f"slot {slot} of {self.path} is empty")
        return EntryInfo(int(slot), int(r["entry_id"]), self._task_names.get(int(r["task_id"]), "?"), int(r["tokens"]),
                         int(r["nbytes"]), int(r["n_pages"]), bytes(r["example_hash"]), _kind(r))

    def entries(self) -> list[EntryInfo]:
        return [self.entry(s) for s in self.slots()]

    def keys(self) -> tuple[np.ndarray, np.ndarray]:
        """(entry_ids (N,), keys (N, key_dim)) of the live entries, slot order."""
        s = self.slots()
        return self._recs["entry_id"][s].astype(np.int64), self._recs["key"][s].astype(np.float32)

    def snapshot(self) -> "Snapshot":
        """The committed state as typed, read-only values (what the learner plans from)."""
        s = self.slots()
        return Snapshot(self.gen, int(self._sb.next_entry_id), tuple(self.entry(int(x)) for x in s),
                        self._recs["key"][s].astype(np.float32), deepcopy(self.catalog))

    @property
    def superblock(self) -> fmt.Superblock:
        """The committed superblock (a copy: changing it changes nothing)."""
        return deepcopy(self._sb)

    def live_mask(self) -> np.ndarray:
        """(slots,) bool: which slots hold a live entry in the committed state (a copy)."""
        return self._live.copy()

    def kv_live(self) -> np.ndarray:
        """(slots,) bool: which slots hold a live kv entry (not a source entry)."""
        return self._live & (self._recs["kind"] == fmt.KIND_KV)

    def task_ids(self) -> np.ndarray:
        """(slots,) task id in each slot's current record (meaningful where live)."""
        return self._recs["task_id"].astype(np.int64)

    def records(self) -> list["Record"]:
        """The live records as stored, unchecked against each other: for ``verify``."""
        out = []
        for s in self.slots():
            r = self._recs[s]
            n = int(r["n_pages"])
            out.append(Record(int(s), int(r["entry_id"]), int(r["task_id"]), int(r["tokens"]), int(r["nbytes"]), n,
                              r["pages"][:min(n, len(r["pages"]))].astype(np.int64), int(r["payload_crc"]),
                              int(r["kind"])))
        return out

    def stored_bytes(self, pages: np.ndarray, n: int) -> bytes:
        """The first ``n`` bytes stored in ``pages`` (in order), unchecked."""
        return self._gather(pages, n)

    def inline_bytes(self, slot: int, n: int) -> bytes:
        """The first ``n`` bytes of the current record's inline area (a small source entry), unchecked."""
        return self._recs[slot]["pages"].tobytes()[:n]

    def slot_of(self) -> dict[int, int]:
        return {int(self._recs["entry_id"][s]): int(s) for s in self.slots()}

    def tasks(self) -> dict[str, int]:
        """Task name -> live entry count (tasks with anchors but no entries count 0)."""
        out = {t["name"]: 0 for t in self.catalog["tasks"].values()}
        for e in self.entries():
            out[e.task] = out.get(e.task, 0) + 1
        return out

    def anchors(self, task: str) -> list[dict]:
        for t in self.catalog["tasks"].values():
            if t["name"] == task:
                return list(t.get("anchors", []))
        return []

    def used_pages(self) -> np.ndarray:
        used = np.zeros(self.geo.pages, bool)
        for s in self.slots():
            r = self._recs[s]
            used[r["pages"][: r["n_pages"]]] = True
        return used

    def usage(self) -> dict:
        g = self.geo
        live = self.slots()
        pages_used = int(self._recs["n_pages"][live].sum())
        n_source = int((self._recs["kind"][live] == fmt.KIND_SOURCE).sum())
        return {
            "cap": g.cap, "file_bytes": g.file_bytes, "entries": int(len(live)), "slots": g.slots,
            "kv_entries": int(len(live)) - n_source, "source_entries": n_source,
            "pages": g.pages, "page_bytes": g.page_bytes, "pages_used": pages_used,
            "payload_bytes": int(self._recs["nbytes"][live].sum()),
            "bytes_used": pages_used * g.page_bytes, "bytes_free": (g.pages - pages_used) * g.page_bytes,
            "overhead_bytes": g.file_bytes - g.pages * g.page_bytes,
            "slot_bytes": 2 * g.record_bytes, "slot_bytes_used": int(len(live)) * 2 * g.record_bytes,  # (in the overhead)
        }

    def read_payload(self, slot: int, entry_id: int | None = None) -> tuple[bytes, EntryInfo] | None:
        """``(payload, info)`` of the entry in ``slot`` as it is on disk now, checksums verified.

        None when the slot is empty or no longer holds ``entry_id`` (a writer swapped it
        out). Lock-free: a CRC mismatch caused by a concurrent commit triggers a retry.
        """
        def payload(rec):
            n, pg = int(rec["nbytes"]), rec["pages"][: rec["n_pages"]]
            t = int(rec["tokens"])
            longest = fmt.MAX_ENTRY_TOKENS if _kind(rec) == "source" else self.geo.max_tokens
            if not (1 <= t <= longest and int(pg.max(initial=0)) < self.geo.pages):
                return _RETRY
            if _kind(rec) == "source":
                if len(pg) != self.geo.source_pages(n):
                    return _RETRY
                buf = rec["pages"].tobytes()[:n] if len(pg) == 0 else self.stored_bytes(pg, n)
            elif _kind(rec) == "kv" and len(pg) == self.geo.pages_for(t):
                buf = self.stored_bytes(pg, n)
            else:
                return _RETRY
            if zlib.crc32(buf) != rec["payload_crc"]:
                return _RETRY
            return buf, EntryInfo(slot, int(rec["entry_id"]), self._task_name(int(rec["task_id"])), t, n, len(pg),
                                  bytes(rec["example_hash"]), _kind(rec))

        return self._read_live(slot, entry_id, payload, "entry")

    def read_key(self, slot: int, entry_id: int) -> np.ndarray | None:
        """The retrieval key (key_dim,) float32 of entry ``entry_id`` in ``slot`` as on disk now
        (checksum verified, lock-free like ``read_payload``); None when it was swapped out."""
        return self._read_live(slot, entry_id, lambda rec: rec["key"].astype(np.float32), "record")

    def _read_live(self, slot: int, entry_id: int | None, use, what: str):
        """``use(record)`` of the live record in ``slot`` (holding ``entry_id`` if given), read
        without a lock: a checksum failure (``use`` returns ``_RETRY`` for its own) while a commit
        lands is retried up to ``READ_RETRIES`` times; one with no commit in between is damage."""
        if not (0 <= slot < self.geo.slots):
            raise BankError(f"slot {slot} is out of range (0..{self.geo.slots - 1})")
        R = self.geo.record_bytes
        for _ in range(READ_RETRIES):
            sb, _copy = self._superblock()
            start = self.offsets["records"] + (slot * 2 + int(sb.bitmap[slot])) * R
            raw = np.frombuffer(self._mm[start:start + R], np.uint8)
            rec = raw.view(self._rdt)[0]
            if rec["magic"] == b"":
                return None
            if self._record_ok(raw):
                if rec["state"] != fmt.STATE_LIVE or (entry_id is not None and int(rec["entry_id"]) != entry_id):
                    return None
                got = use(rec)
                if got is not _RETRY:
                    return got
            if self._superblock()[0].gen == sb.gen:  # no commit in between: this is real damage
                raise BankError(f"{self.path}: {what} in slot {slot} is corrupt (checksum); run ikv-bank verify")
        raise BankError(f"{self.path}: slot {slot} kept changing while being read; retry")

    def _task_name(self, task_id: int) -> str:
        if task_id not in self._task_names:
            self.refresh()  # a task added by a commit after our last look
        return self._task_names.get(task_id, "?")

    def _gather(self, pages: np.ndarray, n: int) -> bytes:
        P, base = self.geo.page_bytes, self.offsets["pages"]
        if len(pages) and (np.diff(pages.astype(np.int64)) == 1).all():  # contiguous run: one slice
            start = base + int(pages[0]) * P
            return self._mm[start:start + n]
        out = bytearray()
        for p in pages:
            start = base + int(p) * P
            out += self._mm[start:start + min(P, n - len(out))]
        return bytes(out)

    def read(self, slot: int, entry_id: int | None = None) -> tuple[np.ndarray, np.ndarray] | None:
        """Dequantized ``(keys, values)``, each (L, H_kv, T, D) float32; None as in ``read_payload``."""
        got = self.read_entry(slot, entry_id)
        return None if got is None else got[1:]

    def read_entry(self, slot: int, entry_id: int | None = None) -> tuple[EntryInfo, np.ndarray, np.ndarray] | None:
        """``(info, keys, values)`` read as one consistent snapshot; None as in ``read_payload``."""
        got = self.read_payload(slot, entry_id)
        if got is None:
            return None
        buf, info = got
        if info.kind != "kv":
            raise BankError(f"entry {info.entry_id} is a {info.kind} entry: it holds the example, not K/V "
                            "(the runtime re-encodes it when it is retrieved)")
        g = self.geo
        k, v = kvquant.unpack(buf, g.scheme, g.num_layers, g.kv_heads, info.tokens, g.head_dim, self.key_scales())
        return info, k, v

    def key_scales(self) -> np.ndarray | None:
        """The bank-wide key scales (L, H_kv, D) float16 of a shared-key-scale scheme; None when
        the scheme has none or no learn has set them yet."""
        sb = self._sb
        if self.geo.scales_bytes == 0 or sb.scales_crc == 0:
            return None
        n = 2 * self.geo.num_layers * self.geo.kv_heads * self.geo.head_dim
        raw = self._region("scales", sb.scales_copy, n)
        if zlib.crc32(raw) != sb.scales_crc:
            self._corrupt("key scales")
        ks = np.frombuffer(raw, "<f2").reshape(self.geo.num_layers, self.geo.kv_heads, self.geo.head_dim)
        if not np.isfinite(ks).all() or (ks < 0).any():
            self._corrupt("key scales")
        return ks.astype(np.float16)

    def calibration(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """(a, b, U, V) of ``map(x) = a*x + b + (x @ V) @ U.T``; None while it is the identity."""
        sb = self._sb
        if sb.calib_crc == 0:
            return None
        raw = self._region("calibration", sb.calib_copy)
        K, r = self.geo.key_dim, self.geo.calib_rank
        n = 4 * K * (2 + 2 * r)
        if zlib.crc32(raw[:n]) != sb.calib_crc:
            self._corrupt("calibration")
        arr = np.frombuffer(raw[:n], "<f4")
        return arr[:K], arr[K:2 * K], arr[2 * K:2 * K + K * r].reshape(K, r), arr[2 * K + K * r:].reshape(K, r)

    def calibrate(self, x: np.ndarray) -> np.ndarray:
        """Apply the retrieval calibration to query keys (..., key_dim)."""
        c = self.calibration()
        if c is None:
            return np.asarray(x, np.float32)
        a, b, U, V = c
        return (a * x + b + (x @ V) @ U.T).astype(np.float32)

    # ---------------------------------------------------------------- writing
    def transaction(self) -> "Transaction":
        if not self.writable:
            raise BankError(f"{self.path} is open read-only; open it with writable=True to change it")
        from inducekv.memory.txn import Transaction

        self.refresh()
        return Transaction(self)

    def write_at(self, data: bytes, offset: int) -> None:
        """Every byte the writer puts on disk goes through here (crash tests hook it)."""
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, offset)
            view, offset = view[n:], offset + n

    def sync(self) -> None:
        """fdatasync: everything written so far is on disk."""
        os.fdatasync(self._fd)


def _kind(rec) -> str:
    """A record's entry kind; an unknown code reads as "?" (never served, ``verify`` reports it)."""
    return fmt.KINDS.get(int(rec["kind"]), "?")


def record_bytes_for(geo: fmt.Geometry, **fields) -> bytes:
    """Serialize one record (CRC filled in)."""
    rec = np.zeros(1, geo.record_dtype)
    rec["magic"] = fmt.RECORD_MAGIC
    for k, v in fields.items():
        if k == "pages":
            rec["pages"][0, : len(v)] = v
        elif k == "inline":   # a small source entry's bytes, in the page-list area
            rec["pages"][0].view(np.uint8)[: len(v)] = np.frombuffer(v, np.uint8)
        else:
            rec[k] = v
    raw = rec.view(np.uint8)
    rec["crc"] = fmt.record_crc(raw, geo.record_dtype)
    return rec.tobytes()


