"""The byte layout: header fields at their offsets, the weight map's fields, chunk checksums, the dtype
table, and the pure encode/decode functions of flashpack.format."""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch
import xxhash

import flashpack
from flashpack import format as fmt
from flashpack import read_weight_map
from flashpack.errors import DtypeError, HeaderError, NotAFlashPackError, TrailingBytesError, TruncatedFileError, WeightMapError

from _helpers import file_bytes, read_parts


def test_constants():
    assert fmt.MAGIC == b"\x89FPACK\r\n" and len(fmt.MAGIC) == 8
    assert fmt.FAL_MAGIC == b"FLASHPK\x00"
    assert fmt.HEADER_NBYTES == 4096 and fmt.BLOCK_ALIGN == 4096 and fmt.TENSOR_ALIGN == 64
    assert fmt.CHECKSUM_ALGORITHM == "xxh3_64"


def test_header_bytes_at_documented_offsets():
    h = fmt.encode_header(10_000, 9_000, 1_000, 0xDEADBEEF)
    assert len(h) == 4096
    assert h[0:8] == fmt.MAGIC
    assert struct.unpack_from("<I", h, 8)[0] == fmt.FORMAT_VERSION
    assert struct.unpack_from("<I", h, 12)[0] == 4096
    assert struct.unpack_from("<QQQQ", h, 16) == (10_000, 9_000, 1_000, 0xDEADBEEF)
    assert struct.unpack_from("<Q", h, 48)[0] == xxhash.xxh3_64_intdigest(h[:48])
    assert h[56:] == bytes(4096 - 56)
    hd = fmt.decode_header(h, "p", 10_000)
    assert (hd.version, hd.header_nbytes, hd.file_nbytes, hd.index_offset, hd.index_nbytes, hd.index_digest) == \
        (1, 4096, 10_000, 9_000, 1_000, 0xDEADBEEF)


def test_decode_header_size_checks():
    h = fmt.encode_header(10_000, 9_000, 1_000, 0)
    with pytest.raises(TruncatedFileError, match="p: truncated: the header says 10000 bytes, the file has 9999 \\(1 missing\\)"):
        fmt.decode_header(h, "p", 9_999)
    with pytest.raises(TrailingBytesError, match="p: 2 trailing bytes after byte 10000"):
        fmt.decode_header(h, "p", 10_002)
    with pytest.raises(NotAFlashPackError, match="p: not a flashpack file"):
        fmt.decode_header(b"x" * 64, "p", 64)
    bad = bytearray(h)
    bad[20] ^= 1
    with pytest.raises(HeaderError):
        fmt.decode_header(bytes(bad), "p", 10_000)


def test_file_header_and_weight_map_fields(pack):
    w = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    sd = {"w": w, "t": w, "i": torch.tensor([1, 2], dtype=torch.int32), "s": torch.tensor(1.0, dtype=torch.bfloat16)}
    path = pack(sd, metadata={"k": "v"})
    data = file_bytes(path)
    header, payload, doc = read_parts(path)
    assert header.file_nbytes == len(data)
    assert header.index_offset + header.index_nbytes == len(data)
    assert header.index_digest == xxhash.xxh3_64_intdigest(data[header.index_offset:])
    assert set(doc) == {"format", "version", "byte_order", "metadata", "checksum", "blocks", "tensors", "aliases"}
    assert doc["format"] == "flashpack" and doc["version"] == 1 and doc["byte_order"] == "little"
    assert doc["metadata"] == {"k": "v"}
    assert doc["checksum"] == {"algorithm": "xxh3_64", "chunk_nbytes": 8 * 1024 * 1024}
    assert doc["tensors"] == {
        "w": {"dtype": "F32", "shape": [2, 3], "offset": 4096, "nbytes": 24},
        "i": {"dtype": "I32", "shape": [2], "offset": 8192, "nbytes": 8},
        "s": {"dtype": "BF16", "shape": [], "offset": 12288, "nbytes": 2},
    }
    assert doc["aliases"] == {"t": "w"}
    assert [(b["dtype"], b["offset"], b["nbytes"]) for b in doc["blocks"]] == [("F32", 4096, 24), ("I32", 8192, 8),
                                                                               ("BF16", 12288, 2)]
    for b in doc["blocks"]:
        assert b["checksums"] == [f"{xxhash.xxh3_64_intdigest(data[b['offset']:b['offset'] + b['nbytes']]):016x}"]
    # payload bytes: little-endian, row-major
    assert data[4096:4096 + 24] == struct.pack("<6f", 0, 1, 2, 3, 4, 5)
    assert data[8192:8200] == struct.pack("<2i", 1, 2)
    assert data[12288:12290] == struct.pack("<H", 0x3F80)
    # gaps are zeros
    assert data[4096 + 24:8192] == bytes(8192 - 4096 - 24)
    assert header.index_offset == 12290


def test_chunk_checksums_cover_each_chunk(pack):
    sd = {"a": torch.arange(5000, dtype=torch.float32), "b": torch.arange(3000, dtype=torch.float32)}
    path = pack(sd, chunk_nbytes=8192)
    data = file_bytes(path)
    wm = read_weight_map(path)
    (blk,) = wm.blocks
    assert blk.nbytes == 20032 + 12000  # b starts at the next 64-byte boundary after 20000
    assert wm.tensors["b"].offset == 4096 + 20032
    n = math.ceil(blk.nbytes / 8192)
    assert len(blk.checksums) == n == 4
    chunks = list(wm.chunks())
    assert [(c.offset, c.nbytes) for c in chunks] == [(4096 + i * 8192, min(8192, blk.nbytes - i * 8192)) for i in range(n)]
    for c in chunks:
        assert c.digest == xxhash.xxh3_64_intdigest(data[c.offset:c.offset + c.nbytes])
    with pytest.raises(ValueError, match="chunk_nbytes"):
        flashpack.pack_to_file(sd, path, chunk_nbytes=1000)


def test_pack_is_deterministic(tmp_path):
    g = torch.Generator().manual_seed(3)
    sd = {"a": torch.randn(100, generator=g), "b": torch.randint(0, 9, (7,), generator=g), "c": torch.tensor(True)}
    flashpack.pack_to_file(sd, tmp_path / "1")
    flashpack.pack_to_file(sd, tmp_path / "2")
    assert file_bytes(tmp_path / "1") == file_bytes(tmp_path / "2")


def test_weight_map_in_state_dict_order(pack):
    sd = {"z": torch.ones(1), "i": torch.ones(1, dtype=torch.int8), "a": torch.ones(1), "y": torch.ones(1)}
    sd["alias"] = sd["a"]
    path = pack(sd)
    _, _, doc = read_parts(path)
    assert list(doc["tensors"]) == ["z", "i", "a", "y"]
    assert read_weight_map(path).keys() == ["z", "i", "a", "y", "alias"]
    assert list(flashpack.load(path)) == ["z", "i", "a", "y", "alias"]


def test_encode_decode_weight_map_pure():
    t = [fmt.TensorInfo("x", "F32", (2,), 4096, 8), fmt.TensorInfo("e", "F16", (0, 3), 0, 0)]
    blocks = [fmt.BlockInfo("F32", 4096, 8, (0x1234,))]
    index = fmt.encode_weight_map(metadata={"m": "1"}, tensors=t, aliases={"y": "x"}, blocks=blocks)
    hdr = fmt.Header(1, 4096, 4104 + len(index), 4104, len(index), xxhash.xxh3_64_intdigest(index))
    wm = fmt.decode_weight_map(hdr, index, "mem")
    assert wm.tensors == {"x": t[0], "e": t[1]}
    assert wm.aliases == {"y": "x"} and wm.blocks == blocks and wm.metadata == {"m": "1"}
    assert wm.payload_nbytes == 8 and wm.keys() == ["x", "e", "y"]
    assert json.loads(index)["blocks"][0]["checksums"] == ["0000000000001234"]


def test_dtype_table_errors():
    with pytest.raises(DtypeError, match="unknown dtype 'F33' \\(key 'k' in p\\)"):
        fmt.torch_dtype("F33", key="k", path="p")
    assert fmt.torch_dtype("BF16") is torch.bfloat16
    assert fmt.DTYPE_ITEMSIZE["C128"] == 16 and fmt.DTYPE_ITEMSIZE["C32"] == 4 and fmt.DTYPE_ITEMSIZE["F8_E8M0"] == 1
