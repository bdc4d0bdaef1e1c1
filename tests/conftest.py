"""Shared fixtures and helpers: packing into tmp_path, and crafting damaged files.

The crafting helpers rewrite a valid pack so that exactly one invariant of docs/FORMAT.md is broken:
``rewrite_weight_map`` re-encodes a modified weight map and fixes the header's sizes and digests,
``rewrite_header`` re-encodes header fields with a valid header checksum.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Callable

import pytest
import xxhash

import flashpack
from flashpack import format as fmt


@pytest.fixture
def pack(tmp_path):
    """``pack(model_or_state_dict, name="model.flashpack", *args, **kw) -> str``: pack into tmp_path."""

    def _pack(obj, name: str = "model.flashpack", *args, **kw) -> str:
        path = str(tmp_path / name)
        flashpack.pack_to_file(obj, path, *args, **kw)
        return path

    return _pack


def read_parts(path) -> tuple[fmt.Header, bytes, dict[str, Any]]:
    """(header, payload bytes [4096, index_offset), weight map as a dict) of a valid pack."""
    with open(path, "rb") as f:
        data = f.read()
    header = fmt.decode_header(data[:64], str(path), len(data))
    doc = json.loads(data[header.index_offset:header.file_nbytes].decode("utf-8"))
    return header, data[fmt.HEADER_NBYTES:header.index_offset], doc


def rewrite_weight_map(path, mutate: Callable[[dict], Any], *, payload: bytes | None = None) -> dict:
    """Rewrite a pack's weight map: ``mutate(doc)`` edits the dict in place (returning None), or returns a
    new object to encode as JSON, or returns ``bytes`` to store verbatim. The header's index offset,
    sizes and both digests are re-encoded, so only what ``mutate`` changed is wrong. ``payload`` replaces
    the payload bytes between the header and the weight map. Returns the resulting doc (or None)."""
    _, old_payload, doc = read_parts(path)
    res = mutate(doc)
    if isinstance(res, (bytes, bytearray)):
        index = bytes(res)
    else:
        doc = doc if res is None else res
        index = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body = old_payload if payload is None else payload
    index_offset = fmt.HEADER_NBYTES + len(body)
    file_nbytes = index_offset + len(index)
    header = fmt.encode_header(file_nbytes, index_offset, len(index), xxhash.xxh3_64_intdigest(index))
    with open(path, "wb") as f:
        f.write(header + body + index)
    return doc


_HEADER_FIELDS = ("magic", "version", "header_nbytes", "file_nbytes", "index_offset", "index_nbytes", "index_digest")


def rewrite_header(path, **fields) -> None:
    """Overwrite named header fields (see ``_HEADER_FIELDS``) and recompute the header checksum."""
    with open(path, "r+b") as f:
        head = f.read(fmt._HEADER.size)
        values = dict(zip(_HEADER_FIELDS, fmt._HEADER.unpack(head)[:-1]))
        unknown = set(fields) - set(values)
        assert not unknown, unknown
        values.update(fields)
        hashed = fmt._HEADER.pack(*values.values(), 0)[:fmt._HEADER_HASHED]
        f.seek(0)
        f.write(hashed + struct.pack("<Q", xxhash.xxh3_64_intdigest(hashed)))


def flip_byte(path, offset: int) -> None:
    """XOR one byte of the file with 0xFF."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def file_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def file_size(path) -> int:
    return os.stat(path).st_size
