"""Byte layout of the bank file (``.ikv``): constants, geometry, records, header.

Everything about where bytes go lives here; ``memory/FORMAT.md`` documents the
same layout for humans. The file is a valid safetensors file whose tensors are
fixed-size byte regions, all allocated at creation::

    u64 N | header JSON (N bytes, space padded) | superblock | calibration | scales | catalog | records | pages
                                                  [2, SB]      [2, CB]       [2, SC]  [2, CAT]  [S, 2, R] [P, page_bytes]

Every mutable region exists twice (copies 0 and 1). A commit writes the copies
the current superblock does *not* point to, then flips to them by writing the
older superblock copy with ``gen + 1``. See ``bank.py`` for the protocol.
"""
from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import asdict, dataclass, fields

import numpy as np

from inducekv.kernels import kvquant
from inducekv.core.errors import BankError

FORMAT_NAME = "inducekv.bank"
FORMAT_VERSION = 3  # 2: shared key scales (the ``scales`` section); 3: entry kinds (``source`` entries) and f16 keys
READ_VERSIONS = (2, 3)  # a version-2 bank is read and written as version 2 (kv entries, f32 keys)
KIND_KV, KIND_SOURCE = 0, 1   # a record's ``kind``: quantized K/V in pages, or the example's source bytes
KINDS = {KIND_KV: "kv", KIND_SOURCE: "source"}
KEY_DTYPES = {"f32": "<f4", "f16": "<f2"}
MAX_INLINE_BYTES = 1 << 16    # a record's inline area (source bytes kept in the record itself)
SUPERBLOCK_MAGIC = b"IKVS"
RECORD_MAGIC = b"IKVE"
DATA_ALIGN = 4096  # the data section starts on a page boundary
SECTION_ALIGN = 64  # every region's size is a multiple of this
MAX_HEADER_BYTES = 1 << 20  # a real header is < 2 KB; refuse anything larger
KEY_SPACES = ("cosine", "ip", "l2")
PENDING_KEY = "learn_pending"  # catalog extra: a learn committed its evictions, not yet its entries (learn/commit.py)
RELEVANCE_KEY = "relevance"    # catalog extra: task -> the retrieval margin its entries need (learn/gate.py)
VALUE_GATES_KEY = "value_gates"  # catalog extra: task -> per-layer gates on its entries' injected values
                                 # (learn/calibrate.py); a query gets the gates of its top-1 entry's task
TWINS_KEY = "twins"            # catalog extra: entry id -> its twin group, entries that answer each other's
                               # questions (learn/value.py); the relevance margin skips a top entry's twins
QUESTIONS_KEY = "questions"    # catalog extra: per image task, the text keys of its prompts: the question gate
                               # (runtime/questions.py)
SUBJECTS_KEY = "subjects"      # catalog extra: per text task with a subject gate, its entries' subject words
TIERS_KEY = "tiers"            # catalog extra: a bank with source entries: its kinds, latency budget, source share
                               # and the costs measured on the device (learn/tiers.py)
SECTIONS = ("superblock", "calibration", "scales", "catalog", "records", "pages")

# Limits that bound every allocation a hostile header could ask for.
MAX_SLOTS = 10_000_000
MAX_KEY_DIM = 65_536
MAX_MODEL_DIM = 65_536
MAX_ENTRY_TOKENS = 65_536

STATE_EMPTY, STATE_LIVE = 0, 1
MIN_ENTRY_TOKENS = 16  # a cap must hold at least one entry of this many tokens

# superblock: magic, version, gen, next_entry_id, catalog (copy, len, crc), calibration (copy, crc),
# key scales (copy, crc), reserved
_SB_HEAD = struct.Struct("<4sIQQIIIIIIII")


def _round(n: int, to: int) -> int:
    return -(-n // to) * to


@dataclass(frozen=True)
class Geometry:
    """Everything fixed at creation; stored as strings in the safetensors ``__metadata__``."""

    cap: int              # bytes on disk the bank may use; the file never exceeds it
    fingerprint: str      # bundle fingerprint: the bank refuses any other model
    scheme: str           # KV payload quantization (kernels/kvquant.py)
    num_layers: int       # model shape, to size and decode payloads
    kv_heads: int
    head_dim: int
    key_dim: int          # retrieval key length
    key_space: str        # hnswlib space of the keys: cosine | ip | l2
    page_bytes: int       # payloads are stored in pages of this size
    max_tokens: int       # longest entry a record can describe
    slots: int            # S: max number of entries
    pages: int            # P: pages in the payload region
    calib_rank: int       # rank r of the low-rank part of the calibration map
    catalog_bytes: int    # capacity of one catalog copy (task names, anchors, template)
    key_dtype: str = "f32"  # retrieval keys in records: f32 (version 2) or f16 (version 3)
    inline_bytes: int = 0   # a record's inline area for ``source`` entries; 0: kv entries only (version 2)

    @property
    def version(self) -> int:
        """2 for the kv-only, f32-key layout (byte-identical to a version-2 bank); 3 otherwise."""
        return 2 if (self.key_dtype == "f32" and self.inline_bytes == 0) else 3

    @property
    def sources(self) -> bool:
        """Whether this bank can hold ``source`` entries."""
        return self.inline_bytes > 0

    # ---- derived sizes: the one place byte math happens ----
    @property
    def max_pages(self) -> int:
        """Pages a record can list: enough for one ``max_tokens`` entry."""
        return -(-kvquant.payload_nbytes(self.scheme, self.num_layers, self.kv_heads, self.max_tokens, self.head_dim) // self.page_bytes)

    @property
    def record_dtype(self) -> np.dtype:
        return record_dtype(self.key_dim, self.max_pages, self.key_dtype, self.inline_bytes)

    @property
    def record_bytes(self) -> int:
        return self.record_dtype.itemsize

    @property
    def bitmap_bytes(self) -> int:
        return -(-self.slots // 8)

    @property
    def superblock_bytes(self) -> int:
        return _round(_SB_HEAD.size + self.bitmap_bytes + 4, SECTION_ALIGN)

    @property
    def calib_bytes(self) -> int:
        """One calibration copy: a, b (K,) and U, V (K, r), float32: map(x) = a*x + b + (x V) Uᵀ."""
        return _round(4 * self.key_dim * (2 + 2 * self.calib_rank), SECTION_ALIGN)

    @property
    def scales_bytes(self) -> int:
        """One copy of the bank-wide key scales (L, H_kv, D) float16; 0 for schemes without them."""
        if self.scheme not in kvquant.SHARED_KEY_SCALE:
            return 0
        return _round(2 * self.num_layers * self.kv_heads * self.head_dim, SECTION_ALIGN)

    def section_shapes(self) -> dict[str, tuple[int, ...]]:
        return {
            "superblock": (2, self.superblock_bytes),
            "calibration": (2, self.calib_bytes),
            "scales": (2, self.scales_bytes),
            "catalog": (2, self.catalog_bytes),
            "records": (self.slots, 2, self.record_bytes),
            "pages": (self.pages, self.page_bytes),
        }

    def metadata(self) -> dict[str, str]:
        meta = {"format": FORMAT_NAME, "format_version": str(self.version)}
        meta.update({f.name: str(getattr(self, f.name)) for f in fields(self)
                     if self.version >= 3 or f.name not in _V3_FIELDS})
        return meta

    def header_bytes(self) -> bytes:
        """``u64 N`` + the JSON header, padded with spaces so data starts at a multiple of 4096."""
        head: dict = {"__metadata__": self.metadata()}
        off = 0
        for name, shape in self.section_shapes().items():
            n = math.prod(shape)
            head[name] = {"dtype": "U8", "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
        raw = json.dumps(head, separators=(",", ":")).encode()
        total = _round(8 + len(raw), DATA_ALIGN)
        return struct.pack("<Q", total - 8) + raw + b" " * (total - 8 - len(raw))

    def offsets(self) -> dict[str, int]:
        """Absolute file offset of each region."""
        off, out = len(self.header_bytes()), {}
        for name, shape in self.section_shapes().items():
            out[name] = off
            off += math.prod(shape)
        out["end"] = off
        return out

    @property
    def file_bytes(self) -> int:
        return self.offsets()["end"]

    def payload_nbytes(self, tokens: int) -> int:
        return kvquant.payload_nbytes(self.scheme, self.num_layers, self.kv_heads, tokens, self.head_dim)

    def pages_for(self, tokens: int) -> int:
        return -(-self.payload_nbytes(tokens) // self.page_bytes)

    def entry_bytes(self, tokens: int) -> int:
        """Bytes an entry of ``tokens`` tokens takes from the cap: its pages plus its slot."""
        return self.pages_for(tokens) * self.page_bytes + 2 * self.record_bytes

    @property
    def inline_capacity(self) -> int:
        """Source bytes a record holds itself (its page-list area); 0 for a kv-only bank."""
        return self.record_dtype.fields["pages"][0].itemsize if self.sources else 0

    def source_pages(self, nbytes: int) -> int:
        """Pages a source entry of ``nbytes`` bytes takes: 0 when it fits in its record."""
        return 0 if nbytes <= self.inline_capacity else -(-nbytes // self.page_bytes)

    def source_bytes(self, nbytes: int) -> int:
        """Bytes a source entry of ``nbytes`` bytes takes from the cap: its slot (+ pages when it is large)."""
        return self.source_pages(nbytes) * self.page_bytes + 2 * self.record_bytes

    def to_dict(self) -> dict:
        return asdict(self)


def record_dtype(key_dim: int, max_pages: int, key_dtype: str = "f32", inline_bytes: int = 0) -> np.dtype:
    """One slot record copy. ``crc`` is CRC-32 of every byte before it. The ``pages`` area
    lists a kv entry's pages, or holds a small source entry's bytes (``inline_bytes``)."""
    base = [
        ("magic", "S4"),            # b"IKVE"; an all-zero record is an empty slot
        ("state", "u1"),            # 0 empty, 1 live
        ("kind", "u1"),             # 0 kv, 1 source (version 2: always 0, it was padding)
        ("_pad", "u1", (2,)),
        ("gen", "<u8"),             # superblock generation that committed this record
        ("entry_id", "<u8"),        # unique, never reused; the API's entry id
        ("tokens", "<u4"),          # tokens in the payload (source: tokens of the rendered entry)
        ("nbytes", "<u4"),          # payload bytes (kvquant.payload_nbytes; source: its byte length)
        ("payload_crc", "<u4"),     # CRC-32 of the payload bytes
        ("task_id", "<u4"),         # key into the catalog's task table
        ("example_hash", "V16"),    # blake2b-128 of the source example
        ("n_pages", "<u4"),         # source: 0 when its bytes sit in ``pages`` itself
        ("_res", "<u4"),
        ("key", KEY_DTYPES[key_dtype], (key_dim,)),  # retrieval key
        ("pages", "<u4", (max(max_pages, -(-inline_bytes // 4)),)),  # page numbers, in payload order
        ("crc", "<u4"),
    ]
    size = np.dtype(base).itemsize
    tail = _round(size, 8) - size
    if tail:
        base.append(("_tail", "u1", (tail,)))
    return np.dtype(base)


def record_crc(rec_bytes: np.ndarray, dtype: np.dtype) -> int:
    return zlib.crc32(rec_bytes[: dtype.fields["crc"][1]].tobytes())


# ---- superblock ----

@dataclass
class Superblock:
    gen: int
    next_entry_id: int
    catalog_copy: int
    catalog_len: int
    catalog_crc: int
    calib_copy: int      # 0/1; calib_crc == 0 means "identity" (never fitted)
    calib_crc: int
    scales_copy: int     # 0/1; scales_crc == 0 means "not set yet" (shared-key-scale schemes)
    scales_crc: int
    bitmap: np.ndarray   # (S,) uint8 in {0, 1}: which record copy of each slot is current

    def to_bytes(self, geo: Geometry) -> bytes:
        head = _SB_HEAD.pack(SUPERBLOCK_MAGIC, geo.version, self.gen, self.next_entry_id, self.catalog_copy,
                             self.catalog_len, self.catalog_crc, self.calib_copy, self.calib_crc, self.scales_copy,
                             self.scales_crc, 0)
        body = head + np.packbits(self.bitmap.astype(np.uint8), bitorder="little").tobytes()
        body += struct.pack("<I", zlib.crc32(body))
        return body + b"\0" * (geo.superblock_bytes - len(body))

    @classmethod
    def parse(cls, buf: bytes, geo: Geometry) -> "Superblock | None":
        """The superblock in ``buf``, or None when it is torn, zeroed or corrupt."""
        n = _SB_HEAD.size + geo.bitmap_bytes
        if len(buf) < n + 4 or zlib.crc32(buf[:n]) != struct.unpack_from("<I", buf, n)[0]:
            return None
        (magic, version, gen, next_id, cat_copy, cat_len, cat_crc, cal_copy, cal_crc, sc_copy, sc_crc,
         _) = _SB_HEAD.unpack_from(buf)
        if (magic != SUPERBLOCK_MAGIC or version != geo.version or cat_copy > 1 or cal_copy > 1 or sc_copy > 1
                or cat_len > geo.catalog_bytes):
            return None
        bits = np.unpackbits(np.frombuffer(buf, np.uint8, geo.bitmap_bytes, _SB_HEAD.size), bitorder="little")[: geo.slots]
        return cls(gen, next_id, cat_copy, cat_len, cat_crc, cal_copy, cal_crc, sc_copy, sc_crc, bits.copy())


# ---- header parsing (untrusted input) ----

_INT_FIELDS = {f.name for f in fields(Geometry)} - {"fingerprint", "scheme", "key_space", "key_dtype"}
_V3_FIELDS = ("key_dtype", "inline_bytes")   # absent from a version-2 header (defaults: f32, 0)


def parse_header(head8: bytes, read, file_size: int, where: str) -> Geometry:
    """Validate the safetensors header of a bank and return its geometry.

    ``read(offset, n)`` reads bytes; nothing larger than ``MAX_HEADER_BYTES`` is
    read before the geometry is checked against the real file size.
    """
    if len(head8) < 8:
        raise BankError(f"{where}: not an inducekv bank (file is {file_size} bytes, too short for a header)")
    (n,) = struct.unpack("<Q", head8[:8])
    if n == 0 or n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise BankError(f"{where}: not an inducekv bank (header length {n} is impossible for a {file_size}-byte file)")
    try:
        head = json.loads(read(8, n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise BankError(f"{where}: not an inducekv bank (header is not valid JSON)") from None
    meta = head.get("__metadata__") if isinstance(head, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise BankError(f"{where}: not an inducekv bank (a safetensors file without '__metadata__.format': '{FORMAT_NAME}')")
    if meta.get("format_version") not in [str(v) for v in READ_VERSIONS]:
        raise BankError(f"{where}: bank format version {meta.get('format_version')!r} is not supported (this inducekv "
                        f"reads {' and '.join(map(str, READ_VERSIONS))}); create a new bank and learn its tasks again")
    version = int(meta["format_version"])
    values = {}
    for f in fields(Geometry):
        if version < 3 and f.name in _V3_FIELDS:
            continue   # the defaults; a version-2 header that has them fails the byte-identity check
        raw = meta.get(f.name)
        if not isinstance(raw, str):
            raise BankError(f"{where}: bank header lacks metadata field {f.name!r}")
        if f.name in _INT_FIELDS:
            if not raw.isdigit() or len(raw) > 19:
                raise BankError(f"{where}: bank metadata {f.name}={raw[:40]!r} is not a non-negative integer")
            values[f.name] = int(raw)
        else:
            values[f.name] = raw
    try:
        geo = Geometry(**values)
        check_geometry(geo)
    except ValueError as e:
        raise BankError(f"{where}: bank header is invalid: {e}") from None
    if geo.header_bytes() != head8[:8] + read(8, n):
        raise BankError(f"{where}: bank header does not match its own geometry (edited or corrupt)")
    if geo.file_bytes != file_size:
        raise BankError(f"{where}: bank file is {file_size} bytes but its header describes {geo.file_bytes} (truncated or padded)")
    return geo


def check_geometry(geo: Geometry) -> None:
    """Range checks (raise ValueError) that keep every derived allocation bounded."""
    if geo.scheme not in kvquant.SCHEMES:
        raise ValueError(f"scheme {geo.scheme!r} is not one of {', '.join(kvquant.SCHEMES)}")
    if geo.key_space not in KEY_SPACES:
        raise ValueError(f"key_space {geo.key_space!r} is not one of {', '.join(KEY_SPACES)}")
    if geo.key_dtype not in KEY_DTYPES:
        raise ValueError(f"key_dtype {geo.key_dtype!r} is not one of {', '.join(KEY_DTYPES)}")
    if geo.inline_bytes % 4 or geo.inline_bytes > MAX_INLINE_BYTES:
        raise ValueError(f"inline_bytes={geo.inline_bytes} must be a multiple of 4 up to {MAX_INLINE_BYTES}")
    if not (0 < len(geo.fingerprint) <= 128):
        raise ValueError("fingerprint must be 1..128 characters")
    for name, hi in (("num_layers", MAX_MODEL_DIM), ("kv_heads", MAX_MODEL_DIM), ("head_dim", MAX_MODEL_DIM),
                     ("key_dim", MAX_KEY_DIM), ("max_tokens", MAX_ENTRY_TOKENS), ("slots", MAX_SLOTS),
                     ("calib_rank", 4096)):
        v = getattr(geo, name)
        if not (name == "calib_rank" or v >= 1) or v > hi:
            raise ValueError(f"{name}={v} is out of range (1..{hi})")
    if geo.page_bytes < SECTION_ALIGN or geo.page_bytes % SECTION_ALIGN or geo.page_bytes > (1 << 30):
        raise ValueError(f"page_bytes={geo.page_bytes} must be a multiple of {SECTION_ALIGN} up to 1 GiB")
    if geo.catalog_bytes < SECTION_ALIGN or geo.catalog_bytes % SECTION_ALIGN or geo.catalog_bytes > (1 << 28):
        raise ValueError(f"catalog_bytes={geo.catalog_bytes} must be a multiple of {SECTION_ALIGN} up to 256 MiB")
    if geo.pages < 1 or geo.pages > (1 << 31) or geo.max_pages > 65_535:
        raise ValueError(f"pages={geo.pages} / pages per entry={geo.max_pages} out of range")
    if geo.file_bytes > geo.cap:
        raise ValueError(f"layout needs {geo.file_bytes} bytes, more than the cap {geo.cap}")


def plan(cap: int, *, fingerprint: str, scheme: str, num_layers: int, kv_heads: int, head_dim: int, key_dim: int,
         key_space: str = "cosine", page_tokens: int = 4, max_tokens: int = 256, calib_rank: int = 16,
         entry_tokens: int = 16, catalog_bytes: int | None = None, key_dtype: str = "f32", inline_bytes: int = 0,
         slot_share: float | None = None) -> Geometry:
    """The largest layout whose file fits in ``cap`` bytes.

    A page holds ``page_tokens`` tokens of payload (the per-entry key scales take
    about one more token's worth in the entry's pages); there is one slot per
    ``entry_tokens`` tokens of page space, so entries shorter than that run out
    of slots before pages. Raises ValueError when the cap cannot hold even one
    ``MIN_ENTRY_TOKENS``-token entry.

    ``slot_share`` (banks that hold ``source`` entries, ``inline_bytes`` > 0): the share of
    the cap given to slots instead; a source entry that fits its record needs no page.
    """
    if page_tokens < 1 or entry_tokens < 1:
        raise ValueError("page_tokens and entry_tokens must be >= 1")
    if slot_share is not None and not (0 < slot_share < 1):
        raise ValueError(f"slot_share must be in (0, 1), got {slot_share}")
    per_entry = kvquant.payload_nbytes(scheme, num_layers, kv_heads, 1, head_dim)  # 1 token + per-entry scales
    per_token = kvquant.payload_nbytes(scheme, num_layers, kv_heads, 2, head_dim) - per_entry
    page = _round(per_token * page_tokens, SECTION_ALIGN)  # an entry's fixed scales spill into its pages
    if catalog_bytes is None:
        catalog_bytes = min(max(cap // 256, 16 << 10), 256 << 10)  # task table + anchors (text)
    catalog_bytes = _round(catalog_bytes, SECTION_ALIGN)

    fixed_slots = None
    if slot_share is not None:
        g0 = Geometry(cap, fingerprint, scheme, num_layers, kv_heads, head_dim, key_dim, key_space, page, max_tokens,
                      1, 1, calib_rank, catalog_bytes, key_dtype, inline_bytes)
        spare = cap - (g0.file_bytes - 2 * g0.record_bytes - page)   # what the header, catalog, ... leave
        fixed_slots = max(1, int(slot_share * spare / (2 * g0.record_bytes + 1 / 8)))

    def geo(pages: int) -> Geometry:
        slots = fixed_slots or max(1, pages * page_tokens // entry_tokens)
        return Geometry(cap, fingerprint, scheme, num_layers, kv_heads, head_dim, key_dim, key_space, page,
                        max_tokens, slots, pages, calib_rank, catalog_bytes, key_dtype, inline_bytes)

    g1 = geo(1)
    fixed = g1.file_bytes - page - (0 if fixed_slots else 2 * g1.record_bytes)
    per_page = page + (0 if fixed_slots else 2 * g1.record_bytes * page_tokens / entry_tokens + 1 / 8)
    pages = max(1, int((cap - fixed) / per_page) + 1)
    while pages > 1 and geo(pages).file_bytes > cap:
        pages -= 1
    g = geo(pages)
    need = 1 if inline_bytes else g.pages_for(min(max_tokens, MIN_ENTRY_TOKENS))   # source banks: one small entry
    if g.file_bytes > cap or g.pages < need:
        smallest = geo(need).file_bytes
        raise ValueError(f"a cap of {cap} bytes is too small for one {MIN_ENTRY_TOKENS}-token {scheme} entry of this "
                         f"model; the smallest bank is {smallest} bytes ({smallest / 2**20:.2f} MiB)")
    check_geometry(g)
    return g
