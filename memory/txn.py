"""Atomic changes to a bank: add / replace / remove entries, tasks, anchors, calibration, key scales.

Use as a context manager; it commits on a clean exit and leaves the bank untouched
(as far as any reader can tell) when the block raises or the process dies::

    with bank.transaction() as tx:
        added = tx.add(NewEntry(keys, values, key, task="capitals"))  # Added(slot, entry_id); None: no space
        tx.remove(old_slot)
        tx.set_anchors("capitals", [{"prompt": ..., "answer": ...}])

Space freed by ``remove`` in a transaction is reusable only after it commits: until
then the old state, which a crash must leave intact, still owns those bytes. So a
transaction can add at most ``bank.usage()["bytes_free"]`` worth of new pages.
"""
from __future__ import annotations

import copy
import json
import zlib
from typing import NamedTuple

import numpy as np

from inducekv.kernels import kvquant
from inducekv.memory import format as fmt
from inducekv.memory.bank import Bank, NewEntry, record_bytes_for
from inducekv.core.errors import BankError


class Added(NamedTuple):
    """Where ``Transaction.add`` put an entry: its slot and its (never reused) entry id."""
    slot: int
    entry_id: int


class Transaction:
    def __init__(self, bank: Bank):
        self.bank, self.geo = bank, bank.geo
        self._sb = bank.superblock
        self._live = bank.live_mask()
        self._task_ids = bank.task_ids()
        self._off = bank.offsets
        self._bitmap = self._sb.bitmap.copy()
        self._touched: dict[int, tuple[bool, np.ndarray | None]] = {}  # slot -> (live, pages) pending
        self._pending_task: dict[int, int] = {}  # slot -> task id of an entry added in this transaction
        self._committed_used = bank.used_pages()
        self._pending_used = np.zeros(self.geo.pages, bool)
        self._catalog = copy.deepcopy(bank.catalog)
        self._catalog_dirty = False
        self._calib: bytes | None = None
        self._scales = bank.key_scales()        # (L, H_kv, D) float16 entries are coded against, or None
        self._scales_dirty = False
        self._next_id = self._sb.next_entry_id
        self._kv_added = False   # a kv entry was added in this transaction (key scales are fixed from then on)
        self._done = False

    # ---------------------------------------------------------------- context manager
    def __enter__(self) -> "Transaction":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self._done = True  # abandon: nothing the current superblock names was touched

    # ---------------------------------------------------------------- helpers
    def _is_live(self, slot: int) -> bool:
        if slot in self._touched:
            return self._touched[slot][0]
        return bool(self._live[slot])

    def _free_slot(self) -> int | None:
        for s in np.flatnonzero(~self._live):
            if int(s) not in self._touched:
                return int(s)
        for s, (live, _) in self._touched.items():
            if not live:
                return s
        return None

    def _alloc(self, n: int) -> np.ndarray | None:
        """``n`` pages free in both the committed state and this transaction; a contiguous run if possible."""
        free = ~(self._committed_used | self._pending_used)
        idx = np.flatnonzero(free)
        if len(idx) < n:
            return None
        if n > 1:  # first run of n consecutive free pages
            run = np.convolve(free.astype(np.int32), np.ones(n, np.int32), "valid")
            starts = np.flatnonzero(run == n)
            if len(starts):
                return np.arange(starts[0], starts[0] + n, dtype=np.uint32)
        return idx[:n].astype(np.uint32)

    def _task_id(self, name: str) -> int:
        if not isinstance(name, str) or not name or len(name) > 200:
            raise BankError(f"task name must be 1..200 characters, got {name!r}")
        for k, t in self._catalog["tasks"].items():
            if t["name"] == name:
                return int(k)
        tid = self._catalog["next_task_id"]
        self._catalog["tasks"][str(tid)] = {"name": name, "anchors": []}
        self._catalog["next_task_id"] = tid + 1
        self._catalog_dirty = True
        return tid

    def _write_record(self, slot: int, data: bytes) -> None:
        other = 1 - int(self._bitmap[slot])
        R = self.geo.record_bytes
        self.bank.write_at(data, self._off["records"] + (slot * 2 + other) * R)

    def _forget_pending(self, slot: int) -> None:
        if slot in self._touched and self._touched[slot][1] is not None:
            self._pending_used[self._touched[slot][1]] = False

    def _check_open(self) -> None:
        if self._done:
            raise BankError("this transaction is already committed or abandoned; start a new one")

    # ---------------------------------------------------------------- operations
    @property
    def next_entry_id(self) -> int:
        """The id the next added entry will get."""
        return self._next_id

    def task_names(self) -> set[str]:
        """Tasks in the catalog as this transaction would commit it."""
        return {t["name"] for t in self._catalog["tasks"].values()}

    def add(self, entry: NewEntry, slot: int | None = None) -> Added | None:
        """Write ``entry`` into a free slot (or replace ``slot``). Returns ``Added(slot, entry_id)``,
        or None when there is no free slot or not enough free pages (a normal outcome, nothing
        written)."""
        self._check_open()
        g = self.geo
        key = np.asarray(entry.key, np.float32).reshape(-1)
        if entry.source is not None:
            return self._add_source(entry, key, slot)
        if entry.payload is not None:  # packed by the caller, against this bank's key scales
            if g.scheme in kvquant.SHARED_KEY_SCALE and self._scales is None:
                raise BankError(f"this {g.scheme} bank has no key scales yet; set them (set_key_scales) before adding")
            T, payload = int(entry.tokens), entry.payload
            if not (1 <= T <= g.max_tokens) or len(payload) != g.payload_nbytes(T):
                raise BankError(f"packed payload of {len(payload)} bytes does not match {T} tokens of this bank's {g.scheme}")
        else:
            k = np.asarray(entry.keys, np.float32)
            if k.ndim != 4 or k.shape[:2] != (g.num_layers, g.kv_heads) or k.shape[3] != g.head_dim:
                raise BankError(f"entry KV has shape {k.shape}; this bank stores (L={g.num_layers}, H={g.kv_heads}, T, D={g.head_dim})")
            T = k.shape[2]
            if T > g.max_tokens:
                raise BankError(f"entry has {T} tokens; this bank's records hold at most {g.max_tokens}")
            if g.scheme in kvquant.SHARED_KEY_SCALE and self._scales is None:
                raise BankError(f"this {g.scheme} bank has no key scales yet; set them (set_key_scales) before adding")
            try:
                payload = kvquant.pack(k, entry.values, g.scheme, self._scales)
            except ValueError as e:
                raise BankError(str(e)) from None
        slot = self._target(entry, key, slot)
        if slot is None:
            return None
        pages = self._alloc(g.pages_for(T))
        if pages is None:
            return None
        self._kv_added = True
        return self._place(slot, entry, key, payload, pages, T, fmt.KIND_KV)

    def _target(self, entry: NewEntry, key: np.ndarray, slot: int | None) -> int | None:
        """Check the entry's key and hash; the slot it goes to (a free one when ``slot`` is None;
        None when there is none)."""
        g = self.geo
        if key.shape != (g.key_dim,) or not np.isfinite(key).all():
            raise BankError(f"retrieval key must be {g.key_dim} finite floats, got shape {key.shape}")
        if len(entry.example_hash) != 16:
            raise BankError("example_hash must be 16 bytes (see memory.bank.example_hash)")
        if slot is None:
            return self._free_slot()
        if not (0 <= slot < g.slots):
            raise BankError(f"slot {slot} is out of range (0..{g.slots - 1})")
        return slot

    def _place(self, slot: int, entry: NewEntry, key: np.ndarray, data: bytes, pages: np.ndarray, tokens: int,
               kind: int) -> Added:
        """Write ``data`` to ``pages`` (or inline, a source entry without pages), then the slot's
        other record copy; nothing the committed state references is touched."""
        g = self.geo
        task_id = self._task_id(entry.task)
        P, base = g.page_bytes, self._off["pages"]
        for i, p in enumerate(pages):  # payload first: nothing references these pages yet
            self.bank.write_at(data[i * P:(i + 1) * P], base + int(p) * P)
        where = {"inline": data} if kind == fmt.KIND_SOURCE and not len(pages) else {"pages": pages}
        rec = record_bytes_for(g, state=fmt.STATE_LIVE, kind=kind, gen=self._sb.gen + 1, entry_id=self._next_id,
                               tokens=tokens, nbytes=len(data), payload_crc=zlib.crc32(data), task_id=task_id,
                               example_hash=np.void(entry.example_hash), n_pages=len(pages), key=key, **where)
        entry_id = self._next_id
        self._next_id += 1
        self._write_record(slot, rec)
        self._forget_pending(slot)
        self._pending_used[pages] = True
        self._touched[slot] = (True, pages)
        self._pending_task[slot] = task_id
        return Added(slot, entry_id)

    def _add_source(self, entry: NewEntry, key: np.ndarray, slot: int | None) -> Added | None:
        """``add`` for a ``source`` entry: its bytes go in the record when they fit, else in pages."""
        g, src = self.geo, bytes(entry.source)
        if not g.sources:
            raise BankError("this bank holds kv entries only; create it with source entries enabled "
                            "(ikv-learn --kinds source|tiered) to keep examples as source")
        T = int(entry.tokens)
        if not (1 <= T <= fmt.MAX_ENTRY_TOKENS):
            raise BankError(f"a source entry must say its rendered length in tokens (1..{fmt.MAX_ENTRY_TOKENS}), got {T}")
        n_pages = g.source_pages(len(src))
        if n_pages > g.max_pages:
            raise BankError(f"source entry of {len(src)} bytes is larger than an entry of this bank can be "
                            f"({g.max_pages * g.page_bytes} bytes)")
        slot = self._target(entry, key, slot)
        if slot is None:
            return None
        pages = self._alloc(n_pages) if n_pages else np.zeros(0, np.uint32)
        if pages is None:
            return None
        return self._place(slot, entry, key, src, pages, T, fmt.KIND_SOURCE)

    def replace(self, slot: int, entry: NewEntry) -> bool:
        """Swap the entry in ``slot`` for ``entry``; False (nothing changed) when there is no room."""
        return self.add(entry, slot=slot) is not None

    def remove(self, slot: int) -> None:
        self._check_open()
        if not (0 <= slot < self.geo.slots) or not self._is_live(slot):
            raise BankError(f"slot {slot} holds no entry")
        rec = record_bytes_for(self.geo, state=fmt.STATE_EMPTY, gen=self._sb.gen + 1)
        self._write_record(slot, rec)
        self._forget_pending(slot)
        self._touched[slot] = (False, None)

    def remove_task(self, name: str) -> int:
        """Remove every entry of task ``name`` and its anchors. Returns the entries removed."""
        self._check_open()
        tid = next((int(k) for k, t in self._catalog["tasks"].items() if t["name"] == name), None)
        if tid is None:
            raise BankError(f"task {name!r} is not in this bank (see ikv-bank list)")
        n = 0
        for s in range(self.geo.slots):
            owner = self._pending_task.get(s) if s in self._touched else int(self._task_ids[s])
            if self._is_live(s) and owner == tid:
                self.remove(s)
                n += 1
        del self._catalog["tasks"][str(tid)]
        self._catalog_dirty = True
        return n

    def set_anchors(self, task: str, anchors: list[dict]) -> None:
        self._check_open()
        tid = self._task_id(task)
        self._catalog["tasks"][str(tid)]["anchors"] = list(anchors)
        self._catalog_dirty = True

    def set_template(self, template: dict | None) -> None:
        self._check_open()
        self._catalog["template"] = template
        self._catalog_dirty = True

    def set_extra(self, key: str, value) -> None:
        self._check_open()
        self._catalog["extra"][key] = value
        self._catalog_dirty = True

    def drop_extra(self, key: str) -> None:
        self._check_open()
        if self._catalog["extra"].pop(key, None) is not None:
            self._catalog_dirty = True

    def set_calibration(self, a, b, U, V) -> None:
        """Store ``map(x) = a*x + b + (x @ V) @ U.T``; a, b (K,), U, V (K, r)."""
        self._check_open()
        K, r = self.geo.key_dim, self.geo.calib_rank
        parts = [np.asarray(x, np.float32) for x in (a, b, U, V)]
        shapes = [(K,), (K,), (K, r), (K, r)]
        if [p.shape for p in parts] != shapes or not all(np.isfinite(p).all() for p in parts):
            raise BankError(f"calibration must be finite arrays of shapes {shapes}, got {[p.shape for p in parts]}")
        self._calib = b"".join(p.astype("<f4").tobytes() for p in parts)

    def set_key_scales(self, scales) -> None:
        """Set the bank-wide key scales (L, H_kv, D) float16 of a shared-key-scale scheme. Every
        entry is coded against them, so they are set once, while the bank holds no entry."""
        self._check_open()
        g = self.geo
        if g.scheme not in kvquant.SHARED_KEY_SCALE:
            raise BankError(f"a {g.scheme} bank keeps key scales in each entry; it has no shared ones")
        ks = np.asarray(scales)
        if ks.shape != (g.num_layers, g.kv_heads, g.head_dim) or ks.dtype != np.float16 \
                or not np.isfinite(ks).all() or (ks < 0).any():
            raise BankError(f"key scales must be finite non-negative float16 of shape "
                            f"{(g.num_layers, g.kv_heads, g.head_dim)}, got {ks.dtype} {ks.shape}")
        if self._scales is not None and np.array_equal(self._scales, ks):
            return
        if self.bank.kv_live().any() or self._kv_added:
            raise BankError("the bank's key scales cannot change while it holds kv entries (they were coded against them)")
        self._scales, self._scales_dirty = ks.copy(), True

    @property
    def key_scales(self) -> np.ndarray | None:
        """The key scales entries of this transaction are coded against (pending or committed)."""
        return self._scales

    # ---------------------------------------------------------------- commit
    def commit(self) -> int:
        """Make every change visible at once. Returns the new generation."""
        self._check_open()
        b, g = self.bank, self.geo
        sb = fmt.Superblock(self._sb.gen + 1, self._next_id, self._sb.catalog_copy, self._sb.catalog_len,
                            self._sb.catalog_crc, self._sb.calib_copy, self._sb.calib_crc, self._sb.scales_copy,
                            self._sb.scales_crc, self._bitmap.copy())
        if self._catalog_dirty:
            raw = json.dumps(self._catalog, separators=(",", ":"), ensure_ascii=False).encode()
            if len(raw) > g.catalog_bytes:
                self._done = True
                raise BankError(f"task table and anchors need {len(raw)} bytes; this bank's catalog holds "
                                f"{g.catalog_bytes} (keep fewer anchors or create the bank with a larger catalog)")
            sb.catalog_copy = 1 - self._sb.catalog_copy
            sb.catalog_len, sb.catalog_crc = len(raw), zlib.crc32(raw)
            b.write_at(raw, self._off["catalog"] + sb.catalog_copy * g.catalog_bytes)
        if self._calib is not None:
            sb.calib_copy = 1 - self._sb.calib_copy
            sb.calib_crc = zlib.crc32(self._calib)
            if sb.calib_crc == 0:  # 0 marks "identity"; a 1-in-4-billion collision
                self._done = True
                raise BankError("calibration checksum collides with the identity marker; perturb it slightly")
            b.write_at(self._calib, self._off["calibration"] + sb.calib_copy * g.calib_bytes)
        if self._scales_dirty:
            raw = self._scales.astype("<f2").tobytes()
            sb.scales_copy = 1 - self._sb.scales_copy
            sb.scales_crc = zlib.crc32(raw)
            if sb.scales_crc == 0:  # 0 marks "not set"; a 1-in-4-billion collision
                self._done = True
                raise BankError("key scales checksum collides with the 'not set' marker; perturb them slightly")
            b.write_at(raw, self._off["scales"] + sb.scales_copy * g.scales_bytes)
        for slot in self._touched:
            sb.bitmap[slot] ^= 1
        b.sync()  # everything the new superblock will name is on disk
        b.write_at(sb.to_bytes(g), self._off["superblock"] + (sb.gen % 2) * g.superblock_bytes)
        b.sync()
        self._done = True
        b.reload()
        return sb.gen
