"""Damaged files: C26 (truncated), C27 (trailing bytes), C28 (flipped payload byte), C29 (weight map
only), C30 (truncated while loading), and one crafted file per invariant of the header and weight map.

Each crafted file is a valid pack rewritten so that exactly one invariant breaks (conftest's
``rewrite_weight_map`` / ``rewrite_header`` fix up every digest and size around the change).
"""

from __future__ import annotations

import errno
import os

import pytest
import torch
from torch import nn

import flashpack
from flashpack import LoadStats, ReadError, assign_from_file, read_weight_map
from flashpack import deserialization
import flashpack.deserialization
import flashpack.mixin
from flashpack import format as fmt
from flashpack.errors import (
    ChecksumMismatchError,
    DtypeError,
    FormatError,
    HeaderError,
    LayoutError,
    NotAFlashPackError,
    TrailingBytesError,
    TruncatedFileError,
    UnsupportedVersionError,
    WeightMapError,
)
from flashpack.io import base as io_base

from _helpers import file_bytes, file_size, flip_byte, read_parts, rewrite_header, rewrite_weight_map


def good_state_dict():
    a = torch.arange(10, dtype=torch.float32)
    return {"a": a, "c": torch.tensor([1.5, 2.5, 3.5]), "b": torch.arange(5, dtype=torch.int64),
            "tie": a, "e": torch.empty(0)}


@pytest.fixture
def good(pack):
    """A sound pack: F32 block [a (10) at 4096, c (3) at 4160], I64 block [b (5) at 8192], an alias
    ``tie -> a`` and a zero-size ``e``."""
    path = pack(good_state_dict())
    wm = read_weight_map(path)
    assert wm.tensors["a"].offset == 4096 and wm.tensors["c"].offset == 4160 and wm.tensors["b"].offset == 8192
    assert wm.aliases == {"tie": "a"}
    return path


def every_reader(path):
    """Each entry point that reads a file's weight map, as callables."""
    return [lambda: flashpack.load(path), lambda: flashpack.load(path, mmap=True),
            lambda: flashpack.load(path, keys=["b"]), lambda: read_weight_map(path),
            lambda: flashpack.verify(path)]


def expect_everywhere(path, exc, match: str | None = None) -> list[str]:
    msgs = []
    for fn in every_reader(path):
        with pytest.raises(exc, match=match) as ei:
            fn()
        assert isinstance(ei.value, FormatError) and isinstance(ei.value, ValueError)
        assert isinstance(ei.value, flashpack.FlashPackError)
        assert path in str(ei.value), str(ei.value)
        msgs.append(str(ei.value))
    return msgs


# --------------------------------------------------------------------------- C26


def test_c26_cut_by_one_byte(good):
    n = file_size(good)
    os.truncate(good, n - 1)
    for msg in expect_everywhere(good, TruncatedFileError):
        assert f"the header says {n} bytes, the file has {n - 1} (1 missing)" in msg


def test_c26_cut_in_middle_of_last_tensor(good):
    n = file_size(good)
    t = read_weight_map(good).tensors["b"]
    cut = t.offset + t.nbytes // 2
    os.truncate(good, cut)
    for msg in expect_everywhere(good, TruncatedFileError):
        assert f"the header says {n} bytes, the file has {cut}" in msg


@pytest.mark.parametrize("cut", [4096, 4097, 100, 56])
def test_c26_kind_cut_anywhere_after_header_fields(good, cut):
    n = file_size(good)
    os.truncate(good, cut)
    expect_everywhere(good, TruncatedFileError, match=f"header says {n} bytes, the file has {cut}")


@pytest.mark.parametrize("cut", [8, 30, 55])
def test_c26_kind_cut_inside_header_fields(good, cut):
    os.truncate(good, cut)
    expect_everywhere(good, TruncatedFileError, match=f"the file has {cut} bytes, fewer than the 56-byte header")


def test_c26_assign_leaves_model_untouched(good):
    os.truncate(good, file_size(good) - 1)
    m = nn.Linear(2, 2)
    w = m.weight
    with pytest.raises(TruncatedFileError):
        assign_from_file(m, good, strict=False)
    assert m.weight is w


# --------------------------------------------------------------------------- C27


def test_c27_one_trailing_byte_rejected(good):
    n = file_size(good)
    with open(good, "ab") as f:
        f.write(b"\0")
    for msg in expect_everywhere(good, TrailingBytesError):
        assert f"1 trailing bytes after byte {n}" in msg and f"the file has {n + 1}" in msg


def test_c27_kind_many_trailing_bytes(good):
    n = file_size(good)
    with open(good, "ab") as f:
        f.write(b"x" * 5000)
    expect_everywhere(good, TrailingBytesError, match=f"5000 trailing bytes after byte {n}")


# --------------------------------------------------------------------------- C28


def test_c28_flipped_payload_byte_detected(good):
    wm = read_weight_map(good)
    flip_byte(good, wm.tensors["c"].offset + 5)
    for fn in (lambda: flashpack.load(good), lambda: flashpack.load(good, backend="threads"),
               lambda: flashpack.load(good, keys=["c"]), lambda: flashpack.verify(good),
               lambda: flashpack.load(good, mmap=True, verify=True)):
        with pytest.raises(ChecksumMismatchError) as ei:
            fn()
        msg = str(ei.value)
        assert good in msg and "'c'" in msg and "block 0 (F32)" in msg
        assert isinstance(ei.value, ValueError)
    # verify=False loads the damaged value (only the flipped byte differs); mmap mode verifies on request only
    for kw in ({"verify": False}, {"mmap": True, "verify": False}, {"mmap": True}, {"verify": False, "backend": "threads"}):
        out = flashpack.load(good, **kw)
        assert torch.equal(out["a"], torch.arange(10, dtype=torch.float32))
        raw = out["c"].view(torch.uint8)
        want = torch.tensor([1.5, 2.5, 3.5]).view(torch.uint8).clone()
        want[5] ^= 0xFF
        assert torch.equal(raw, want)


def test_c28_env_verify_off(good, monkeypatch):
    flip_byte(good, read_weight_map(good).tensors["b"].offset)
    monkeypatch.setenv("FLASHPACK_VERIFY", "0")
    assert flashpack.load(good)["b"][0].item() == 0xFF
    monkeypatch.setenv("FLASHPACK_VERIFY", "1")
    with pytest.raises(ChecksumMismatchError, match=r"block 1 \(I64\).*'b'"):
        flashpack.load(good)


@pytest.mark.parametrize("where", ["first", "last", "padding"])
def test_c28_kind_any_byte_of_a_block(good, where):
    wm = read_weight_map(good)
    b0 = wm.blocks[0]
    off = {"first": b0.offset, "last": b0.offset + b0.nbytes - 1,
           "padding": wm.tensors["a"].offset + wm.tensors["a"].nbytes + 1}[where]
    flip_byte(good, off)
    with pytest.raises(ChecksumMismatchError, match=f"bytes \\[{b0.offset}, {b0.offset + b0.nbytes}\\)"):
        flashpack.load(good)
    with pytest.raises(ChecksumMismatchError):
        flashpack.verify(good)


def test_c28_multi_chunk_names_keys_of_the_chunk(pack):
    sd = {f"t{i}": torch.full((1024,), float(i)) for i in range(8)}  # 4 KiB each, 8 KiB chunks
    path = pack(sd, chunk_nbytes=8192)
    wm = read_weight_map(path)
    assert len(wm.blocks[0].checksums) == 4
    flip_byte(path, wm.tensors["t5"].offset + 10)
    with pytest.raises(ChecksumMismatchError) as ei:
        flashpack.load(path)
    msg = str(ei.value)
    assert "chunk 2, bytes [20480, 28672)" in msg
    assert "affected keys: 't4', 't5';" in msg
    assert torch.equal(flashpack.load(path, keys=["t0", "t7"])["t7"], sd["t7"])


# --------------------------------------------------------------------------- C29


def test_c29_weight_map_only_file_rejected(good):
    rewrite_weight_map(good, lambda d: None, payload=b"")
    assert file_size(good) == 4096 + read_parts(good)[0].index_nbytes
    msgs = expect_everywhere(good, LayoutError)
    assert "leaves the payload region" in msgs[0]


def test_c29_json_text_only_rejected(good):
    _, _, doc = read_parts(good)
    import json

    with open(good, "w") as f:
        json.dump(doc, f)
    expect_everywhere(good, NotAFlashPackError, match="not a flashpack file")


# --------------------------------------------------------------------------- C30


def test_c30_truncated_between_weight_map_and_payload(good, monkeypatch):
    real = deserialization.read_weight_map
    n = file_size(good)

    def then_truncate(path):
        wm = real(path)
        os.truncate(path, 4096 + 20)
        return wm

    monkeypatch.setattr(deserialization, "read_weight_map", then_truncate)
    with pytest.raises(OSError) as ei:
        flashpack.load(good, backend="threads")
    e = ei.value
    assert isinstance(e, ReadError) and e.errno == errno.ESTALE and e.filename == good
    assert f"({n} bytes when its weight map was read, {4096 + 20} bytes now" in str(e)


@pytest.mark.parametrize("direct", ["on", "off"])
def test_c30_truncated_while_reading(pack, monkeypatch, direct):
    sd = {"x": torch.arange(300_000, dtype=torch.float32), "y": torch.ones(1000, dtype=torch.int64)}
    path = pack(sd)
    monkeypatch.setenv("FLASHPACK_DIRECT", direct)
    monkeypatch.setenv("FLASHPACK_EXTENT_NBYTES", "64K")
    real = io_base._preadv
    state = {"calls": 0}

    def truncate_on_first_read(fd, bufs, offset):
        state["calls"] += 1
        if state["calls"] == 1:
            os.truncate(path, 4096 + 100_000)  # another process cuts the file
        return real(fd, bufs, offset)

    monkeypatch.setattr(io_base, "_preadv", truncate_on_first_read)
    monkeypatch.setattr(io_base, "native_copy", None)  # the C copy calls no faked preadv
    with pytest.raises(OSError) as ei:
        flashpack.load(path, backend="threads")
    e = ei.value
    assert isinstance(e, ReadError) and e.errno == errno.EIO and e.filename == path
    assert "short read at byte offset" in str(e) and "expected" in str(e) and "got" in str(e)


def test_c30_verify_truncated_while_reading(good, monkeypatch):
    real = io_base._preadv
    monkeypatch.setattr(io_base, "_preadv", lambda fd, b, o: (os.truncate(good, 4096), real(fd, b, o))[1])
    monkeypatch.setattr(io_base, "native_copy", None)  # the C copy calls no faked preadv
    with pytest.raises(ReadError, match="short read"):
        flashpack.verify(good, backend="threads")


def test_c30_assign_truncated_model_untouched(good, monkeypatch):
    real = deserialization.read_weight_map

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.zeros(10))

    calls = []

    def truncate_on_second(path):
        wm = real(path)
        calls.append(1)
        if len(calls) == 1:  # assign_from_file reads the map once; the payload read must notice the change
            os.truncate(path, 4096)
        return wm

    monkeypatch.setattr(flashpack.deserialization, "read_weight_map", truncate_on_second)  # where assign_from_file reads it
    m = M()
    w = m.a
    with pytest.raises(ReadError):
        assign_from_file(m, good, strict=False)
    assert m.a is w and torch.equal(m.a, torch.zeros(10))


# --------------------------------------------------------------------------- header invariants


def test_i1_bad_magic(good):
    with open(good, "r+b") as f:
        f.write(b"NOTAPACK")
    expect_everywhere(good, NotAFlashPackError, match="not a flashpack file")


@pytest.mark.parametrize("content", [b"", b"\x89FPACK", b"hello world, this is text" * 4, b"PK\x03\x04" + bytes(100)])
def test_i1_not_a_flashpack_file(tmp_path, content):
    p = str(tmp_path / "x.bin")
    with open(p, "wb") as f:
        f.write(content)
    exc = TruncatedFileError if content.startswith(fmt.MAGIC[:6]) and len(content) >= 8 else NotAFlashPackError
    expect_everywhere(p, (NotAFlashPackError, TruncatedFileError) if exc is TruncatedFileError else exc)


def test_i2_header_checksum(good):
    flip_byte(good, 30)  # inside index_offset
    expect_everywhere(good, HeaderError, match=r"header checksum mismatch in bytes \[0, 48\)")


def test_i2_header_digest_field(good):
    flip_byte(good, 50)
    expect_everywhere(good, HeaderError, match="header checksum mismatch")


@pytest.mark.parametrize("version", [0, 2, 0xFFFFFFFF])
def test_i4_version(good, version):
    rewrite_header(good, version=version)
    expect_everywhere(good, UnsupportedVersionError, match=f"format version {version}, this flashpack reads version 1")


@pytest.mark.parametrize("fields", [{"header_nbytes": 8192}, {"header_nbytes": 0},
                                    {"index_offset": 100}, {"index_offset": 4095},
                                    {"index_nbytes": 1}, {"file_nbytes": 1 << 40}])
def test_i3_inconsistent_header(good, fields):
    h, _, _ = read_parts(good)
    if "index_offset" in fields:
        fields["index_nbytes"] = h.file_nbytes - fields["index_offset"]
    rewrite_header(good, **fields)
    expect_everywhere(good, HeaderError, match="inconsistent header")


def test_i5_header_size_matches_file(good):
    h, _, _ = read_parts(good)
    # a header that claims one byte less, consistently: the file then has one trailing byte
    rewrite_header(good, file_nbytes=h.file_nbytes - 1, index_nbytes=h.index_nbytes - 1)
    expect_everywhere(good, TrailingBytesError, match="1 trailing bytes")


# --------------------------------------------------------------------------- weight-map invariants


def test_i6_weight_map_checksum(good):
    h, _, _ = read_parts(good)
    flip_byte(good, h.index_offset + 3)
    expect_everywhere(good, WeightMapError, match="weight map checksum mismatch")


def test_i6_weight_map_digest_field(good):
    rewrite_header(good, index_digest=12345)
    expect_everywhere(good, WeightMapError, match="weight map checksum mismatch")


def test_i6_weight_map_too_large(good, monkeypatch):
    monkeypatch.setattr(fmt, "MAX_INDEX_NBYTES", 64)
    expect_everywhere(good, WeightMapError, match="exceeds the 64-byte limit")


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe\x00", b"", b"{\"format\": \"flashpack\"", b"\x00" * 10])
def test_i7_not_json(good, raw):
    rewrite_weight_map(good, lambda d: raw)
    expect_everywhere(good, WeightMapError, match="is not UTF-8 JSON")


@pytest.mark.parametrize("doc", [[], "text", 42, None, {}])
def test_i7_not_an_object(good, doc):
    rewrite_weight_map(good, lambda d: __import__("json").dumps(doc).encode())
    expect_everywhere(good, WeightMapError, match="lacks field 'format'")


ROOT_FIELDS = ["format", "version", "byte_order", "metadata", "checksum", "blocks", "tensors", "aliases"]


@pytest.mark.parametrize("field", ROOT_FIELDS)
def test_i7_missing_root_field(good, field):
    rewrite_weight_map(good, lambda d: (d.pop(field), None)[1])
    expect_everywhere(good, WeightMapError, match=f"root lacks field '{field}'")


@pytest.mark.parametrize("field,value", [("format", 1), ("version", "1"), ("version", True), ("byte_order", None),
                                         ("metadata", []), ("checksum", "xxh3"), ("blocks", {}), ("tensors", []),
                                         ("aliases", [])])
def test_i7_wrong_root_type(good, field, value):
    rewrite_weight_map(good, lambda d: d.__setitem__(field, value))
    expect_everywhere(good, WeightMapError, match=f"root.{field} has the wrong type")


@pytest.mark.parametrize("field", ["dtype", "shape", "offset", "nbytes"])
def test_i7_missing_tensor_field(good, field):
    rewrite_weight_map(good, lambda d: (d["tensors"]["c"].pop(field), None)[1])
    expect_everywhere(good, WeightMapError, match=f"tensors\\['c'\\] lacks field '{field}'")


@pytest.mark.parametrize("field,value", [("offset", "4160"), ("offset", 4160.0), ("nbytes", True), ("dtype", 5),
                                         ("shape", "3")])
def test_i7_wrong_tensor_field_type(good, field, value):
    rewrite_weight_map(good, lambda d: d["tensors"]["c"].__setitem__(field, value))
    expect_everywhere(good, WeightMapError, match=f"tensors\\['c'\\].{field} has the wrong type")


def test_i7_tensor_entry_not_object(good):
    rewrite_weight_map(good, lambda d: d["tensors"].__setitem__("c", [1, 2]))
    expect_everywhere(good, WeightMapError, match="tensors\\['c'\\] lacks field")


@pytest.mark.parametrize("field", ["dtype", "offset", "nbytes", "checksums"])
def test_i7_missing_block_field(good, field):
    rewrite_weight_map(good, lambda d: (d["blocks"][1].pop(field), None)[1])
    expect_everywhere(good, WeightMapError, match=f"blocks\\[1\\] lacks field '{field}'")


@pytest.mark.parametrize("field", ["algorithm", "chunk_nbytes"])
def test_i7_missing_checksum_field(good, field):
    rewrite_weight_map(good, lambda d: (d["checksum"].pop(field), None)[1])
    expect_everywhere(good, WeightMapError, match=f"checksum lacks field '{field}'")


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d.__setitem__("format", "safetensors"), "format is 'safetensors'"),
    (lambda d: d.__setitem__("byte_order", "big"), "byte order 'big' is not supported"),
    (lambda d: d.__setitem__("metadata", {"a": 1}), "metadata must map strings to strings"),
    (lambda d: d["checksum"].__setitem__("algorithm", "crc32"), "checksum algorithm 'crc32' is not supported"),
    (lambda d: d["checksum"].__setitem__("chunk_nbytes", 1000), "chunk_nbytes 1000 is not a positive multiple"),
    (lambda d: d["checksum"].__setitem__("chunk_nbytes", 0), "chunk_nbytes 0 is not a positive multiple"),
    (lambda d: d["checksum"].__setitem__("chunk_nbytes", -4096), "chunk_nbytes -4096 is not a positive multiple"),
])
def test_i7_bad_field_values(good, mutate, match):
    rewrite_weight_map(good, mutate)
    expect_everywhere(good, WeightMapError, match=match)


def test_i4_weight_map_version(good):
    rewrite_weight_map(good, lambda d: d.__setitem__("version", 2))
    expect_everywhere(good, UnsupportedVersionError, match="weight map version 2 differs from the header's 1")


# checksum counts and form (I15's table)


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d["blocks"][0]["checksums"].append("0" * 16), r"blocks\[0\] \(F32\) has 2 checksums, expected 1"),
    (lambda d: d["blocks"][1].__setitem__("checksums", []), r"blocks\[1\] \(I64\) has 0 checksums, expected 1"),
    (lambda d: d["blocks"][0].__setitem__("checksums", ["zz" * 8]), "not 16 hex digits"),
    (lambda d: d["blocks"][0].__setitem__("checksums", ["abc"]), "not 16 hex digits"),
    (lambda d: d["blocks"][0].__setitem__("checksums", [123]), "not 16 hex digits"),
])
def test_i15_checksum_table(good, mutate, match):
    rewrite_weight_map(good, mutate)
    expect_everywhere(good, WeightMapError, match=match)


def test_i15_checksum_value_wrong(good):
    rewrite_weight_map(good, lambda d: d["blocks"][1].__setitem__("checksums", ["0123456789abcdef"]))
    with pytest.raises(ChecksumMismatchError, match=r"expected 0123456789abcdef.*'b'"):
        flashpack.load(good)
    with pytest.raises(ChecksumMismatchError):
        flashpack.verify(good)
    assert flashpack.load(good, verify=False)["b"].tolist() == [0, 1, 2, 3, 4]


# dtypes (I9)


def test_i9_unknown_tensor_dtype(good):
    rewrite_weight_map(good, lambda d: d["tensors"]["c"].__setitem__("dtype", "F33"))
    expect_everywhere(good, DtypeError, match="key 'c' has unknown dtype 'F33'")


def test_i9_unknown_block_dtype(good):
    rewrite_weight_map(good, lambda d: d["blocks"][1].__setitem__("dtype", "int64"))
    expect_everywhere(good, DtypeError, match="block 1 has unknown dtype 'int64'")


def test_i9_torch_name_is_not_a_file_name(good):
    rewrite_weight_map(good, lambda d: d["tensors"]["b"].__setitem__("dtype", "int64"))
    expect_everywhere(good, DtypeError, match="unknown dtype 'int64'")


# layout (I8, I10-I14)


def _set(d, path, value):
    obj = d
    for p in path[:-1]:
        obj = obj[p]
    obj[path[-1]] = value


LAYOUT_CASES = {
    "block_misaligned": ((["blocks", 1, "offset"], 8192 + 64), "block 1 \\(I64\\) at bytes \\[8256, 8296\\) is misaligned"),
    "block_before_payload": ((["blocks", 0, "offset"], 0), "block 0 \\(F32\\) at bytes \\[0, 76\\)"),
    "block_overlaps_previous": ((["blocks", 1, "offset"], 4096), "block 1 \\(I64\\) at bytes \\[4096, 4136\\)"),
    "block_past_weight_map": ((["blocks", 1, "nbytes"], 1 << 23), "leaves the payload region"),
    "block_negative_offset": ((["blocks", 0, "offset"], -4096), "block 0 \\(F32\\)"),
    "block_empty": ((["blocks", 1, "nbytes"], 0), "block 1 \\(I64\\) at bytes \\[8192, 8192\\) is misaligned, empty"),
    "nbytes_not_shape": ((["tensors", "c", "nbytes"], 16), "key 'c': nbytes 16 does not match shape \\[3\\] x 4 bytes \\(F32\\) = 12"),
    "shape_not_nbytes": ((["tensors", "c", "shape"], [4]), "key 'c': nbytes 12 does not match shape \\[4\\]"),
    "shape_2d_not_nbytes": ((["tensors", "a", "shape"], [3, 3]), "key 'a': nbytes 40 does not match shape \\[3, 3\\]"),
    "negative_dim": ((["tensors", "c", "shape"], [-3]), "key 'c': shape \\[-3\\] must be a list of non-negative integers"),
    "float_dim": ((["tensors", "c", "shape"], [3.0]), "must be a list of non-negative integers"),
    "bool_dim": ((["tensors", "c", "shape"], [True, 3]), "must be a list of non-negative integers"),
    "tensor_outside_block": ((["tensors", "c", "offset"], 4096 + 128), "key 'c' \\(F32\\) at bytes \\[4224, 4236\\) is outside its dtype block \\[4096, 4172\\)"),
    "tensor_before_block": ((["tensors", "b", "offset"], 4096), "key 'b' \\(I64\\) at bytes \\[4096, 4136\\) is outside its dtype block"),
    "tensor_in_header": ((["tensors", "a", "offset"], 0), "key 'a' \\(F32\\) at bytes \\[0, 40\\) is outside"),
    "tensor_negative_offset": ((["tensors", "a", "offset"], -40), "key 'a' \\(F32\\) at bytes \\[-40, 0\\) is outside"),
    "tensor_misaligned": ((["tensors", "a", "offset"], 4100), "key 'a': offset 4100 is not 64-byte aligned"),
    "tensors_overlap": ((["tensors", "c", "offset"], 4096), "keys 'c' \\[4096, 4108\\) and 'a' \\[4096, 4136\\) overlap"),
    "no_block_for_dtype": ((["tensors", "b", "dtype"], "F64"), "key 'b' \\(F64\\) at bytes \\[8192, 8232\\) is outside its dtype block \\(there is none\\)"),
    "empty_tensor_offset_out_of_range": ((["tensors", "e", "offset"], 1 << 40), "key 'e': offset 1099511627776 out of range"),
    "empty_tensor_negative_offset": ((["tensors", "e", "offset"], -1), "key 'e': offset -1 out of range"),
}


@pytest.mark.parametrize("case", list(LAYOUT_CASES))
def test_layout_invariants(good, case):
    (where, value), match = LAYOUT_CASES[case]
    rewrite_weight_map(good, lambda d: _set(d, where, value))
    expect_everywhere(good, LayoutError, match=match)


def test_layout_two_blocks_same_dtype(good):
    def dup(d):
        d["blocks"][1]["dtype"] = "F32"
        d["tensors"]["b"]["dtype"] = "F64"

    rewrite_weight_map(good, dup)
    expect_everywhere(good, LayoutError, match="two blocks of dtype F32")


def test_layout_blocks_out_of_order(good):
    rewrite_weight_map(good, lambda d: d.__setitem__("blocks", d["blocks"][::-1]))
    expect_everywhere(good, LayoutError, match="block 1 \\(F32\\) at bytes \\[4096, 4172\\)")


def test_layout_huge_shape_product(good):
    rewrite_weight_map(good, lambda d: d["tensors"]["c"].__setitem__("shape", [1 << 62, 1 << 62]))
    expect_everywhere(good, LayoutError, match="key 'c': nbytes 12 does not match shape")


def test_layout_huge_consistent_tensor(good):
    def big(d):
        d["tensors"]["c"]["shape"] = [1 << 40]
        d["tensors"]["c"]["nbytes"] = 4 << 40

    rewrite_weight_map(good, big)
    expect_everywhere(good, LayoutError, match="key 'c' \\(F32\\) at bytes \\[4160, .*outside its dtype block")


# aliases (I13, I14)


@pytest.mark.parametrize("aliases,match", [
    ({"tie": "missing"}, "alias 'tie' points to 'missing', which is not a stored tensor"),
    ({"tie": "a", "tie2": "tie"}, "alias 'tie2' points to 'tie', which is not a stored tensor"),
    ({"tie": 5}, "alias 'tie' points to 5"),
    ({"tie": None}, "alias 'tie' points to None"),
    ({"c": "a"}, "key 'c' is both a stored tensor and an alias"),
    ({"a": "a"}, "key 'a' is both a stored tensor and an alias"),
])
def test_alias_invariants(good, aliases, match):
    rewrite_weight_map(good, lambda d: d.__setitem__("aliases", aliases))
    expect_everywhere(good, WeightMapError, match=match)


def test_crafting_helper_keeps_a_sound_file_sound(good):
    """The rewrite helper itself breaks nothing: an identity rewrite loads exactly."""
    before = file_bytes(good)
    rewrite_weight_map(good, lambda d: None)
    assert file_bytes(good) == before
    out = flashpack.load(good)
    st = LoadStats()
    flashpack.load(good, stats=st)
    assert st.chunks_verified == 2
    for k, v in good_state_dict().items():
        assert torch.equal(out[k], v)
