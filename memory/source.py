"""The bytes of a ``source`` entry: the example itself, re-encoded into K/V when retrieved.

A source entry keeps what the example was made of, not its K/V: the prompt, the answer
and the image file's bytes (PNG/JPEG as given). Layout (little-endian)::

    offset  size  field
    0       2     prompt length P (UTF-8 bytes)
    2       2     answer length A
    4       4     image length I (0: no image)
    8       P     prompt, UTF-8
    8+P     A     answer, UTF-8
    8+P+A   I     image file bytes

Untrusted on read: lengths must add up to the buffer exactly and the text must be UTF-8;
the image bytes are decoded by the runtime's image loader, which bounds them.
"""
from __future__ import annotations

import struct
from typing import NamedTuple

from inducekv.core.errors import BankError

_HEAD = struct.Struct("<HHI")
MAX_TEXT_BYTES = 65_535
MAX_IMAGE_BYTES = 16 << 20


class Source(NamedTuple):
    prompt: str
    answer: str
    image: bytes | None   # the image file's bytes, or None


def pack_source(prompt: str, answer: str, image: bytes | None = None) -> bytes:
    p, a, im = prompt.encode("utf-8"), answer.encode("utf-8"), image or b""
    if len(p) > MAX_TEXT_BYTES or len(a) > MAX_TEXT_BYTES:
        raise BankError(f"a source entry's prompt and answer must be at most {MAX_TEXT_BYTES} bytes each")
    if len(im) > MAX_IMAGE_BYTES:
        raise BankError(f"a source entry's image is {len(im)} bytes; at most {MAX_IMAGE_BYTES} are kept")
    return _HEAD.pack(len(p), len(a), len(im)) + p + a + im


def unpack_source(buf: bytes) -> Source:
    """The example in ``buf``; BankError when the lengths or the text do not hold."""
    if len(buf) < _HEAD.size:
        raise BankError(f"source entry of {len(buf)} bytes is shorter than its header")
    np_, na, ni = _HEAD.unpack_from(buf)
    if _HEAD.size + np_ + na + ni != len(buf) or ni > MAX_IMAGE_BYTES:
        raise BankError("source entry lengths do not add up to its size")
    at = _HEAD.size
    try:
        prompt = bytes(buf[at:at + np_]).decode("utf-8")
        answer = bytes(buf[at + np_:at + np_ + na]).decode("utf-8")
    except UnicodeDecodeError:
        raise BankError("source entry text is not UTF-8") from None
    image = bytes(buf[at + np_ + na:]) if ni else None
    return Source(prompt, answer, image)
