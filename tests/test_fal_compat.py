"""Reading files written by fal's flashpack 0.2-0.4 (``flashpack_v3`` and ``flashpack_v4``).

The files are built here from the layout the issue describes: payload blocks from byte 0, then a UTF-8
JSON footer, then the footer's length as a little-endian u64, then the 8 magic bytes ``FLASHPK\\0``.
Blocks and tensors are 128-byte aligned; ``offset``/``length`` are element counts within the block;
dtypes are torch names; bf16, fp8 and complex32 payloads are raw bits.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import flashpack
from flashpack import LoadStats, assign_from_file, read_weight_map
from flashpack.errors import DtypeError, FormatError, LayoutError, NotAFlashPackError, UnsupportedVersionError, WeightMapError

FAL_MAGIC = b"FLASHPK\x00"
ALIGN = 128

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def raw(t: torch.Tensor) -> bytes:
    if t.dtype.itemsize in _BITS:
        t = t.view(_BITS[t.dtype.itemsize])
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def torch_name(dt: torch.dtype, prefixed: bool = False) -> str:
    return str(dt) if prefixed else str(dt).removeprefix("torch.")


def fal_layout(groups: list[tuple[torch.dtype, list[tuple[str, torch.Tensor]]]], *, prefixed: bool = False):
    """(payload bytes, macroblocks, index) the way fal's flashpack lays out a state_dict."""
    payload = bytearray()
    macroblocks, index = [], []
    for mbi, (dt, items) in enumerate(groups):
        payload += bytes(-len(payload) % ALIGN)
        block_off = len(payload)
        item = dt.itemsize
        elems = 0
        for name, t in items:
            assert t.dtype == dt
            elems += -elems % (ALIGN // item)
            index.append({"name": name, "shape": list(t.shape), "offset": elems, "length": t.numel(),
                          "macroblock": mbi})
            end = block_off + elems * item
            payload += bytes(end - len(payload))
            payload += raw(t)
            elems += t.numel()
        macroblocks.append({"dtype": torch_name(dt, prefixed), "offset_bytes": block_off,
                            "length_bytes": elems * item, "length_elems": elems})
    return bytes(payload), macroblocks, index


def write_fal(path, footer: dict | bytes, payload: bytes) -> str:
    body = footer if isinstance(footer, bytes) else json.dumps(footer).encode("utf-8")
    with open(path, "wb") as f:
        f.write(payload + body + len(body).to_bytes(8, "little") + FAL_MAGIC)
    return str(path)


def fal_v3(path, items: list[tuple[str, torch.Tensor]], dtype: torch.dtype, **extra) -> str:
    payload, mbs, index = fal_layout([(dtype, items)])
    for rec in index:
        del rec["macroblock"]
    footer = {"format": "flashpack_v3", "target_dtype": torch_name(dtype), "align_bytes": ALIGN,
              "total_elems": mbs[0]["length_elems"], "index": index, **extra}
    return write_fal(path, footer, payload)


def fal_v4(path, groups, *, prefixed: bool = False, **extra) -> str:
    payload, mbs, index = fal_layout(groups, prefixed=prefixed)
    return write_fal(path, {"format": "flashpack_v4", "macroblocks": mbs, "index": index, **extra}, payload)


def assert_exact(out: dict, items) -> None:
    for name, t in items:
        assert out[name].dtype == t.dtype and out[name].shape == t.shape, name
        assert raw(out[name]) == raw(t), name


# --------------------------------------------------------------------------- v3


def test_v3_float32_exact(tmp_path):
    items = [("a.weight", torch.randn(3, 5)), ("a.bias", torch.randn(5)), ("scalar", torch.tensor(2.5)),
             ("empty", torch.empty(0, 4)), ("odd", torch.arange(33.0))]
    path = fal_v3(tmp_path / "v3.fp", items, torch.float32)
    wm = read_weight_map(path)
    assert wm.source == "fal-flashpack-v3" and wm.checksum_algorithm is None and wm.aliases == {}
    # tensors are 128-byte aligned, element offsets turned into bytes
    assert [wm.tensors[n].offset for n in ("a.weight", "a.bias", "scalar", "odd")] == [0, 128, 256, 384]
    for kw in ({}, {"backend": "threads"}, {"mmap": True}, {"verify": True}):
        out = flashpack.load(path, **kw)
        assert list(out) == [n for n, _ in items]
        assert_exact(out, items)
    assert flashpack.load(path)["scalar"].shape == ()


def test_v3_bfloat16_raw_bits(tmp_path):
    bits = torch.from_numpy(np.array([0x3F80, 0xC000, 0x7FC1, 0xFF80, 0x0001, 0x8000], dtype=np.uint16).view(np.int16))
    items = [("w", bits.view(torch.bfloat16)), ("v", torch.tensor([1.0, -2.0, 0.5]).to(torch.bfloat16))]
    path = fal_v3(tmp_path / "v3bf.fp", items, torch.bfloat16)
    out = flashpack.load(path)
    assert_exact(out, items)
    assert out["v"].tolist() == [1.0, -2.0, 0.5]
    assert torch.equal(out["w"].view(torch.int16), bits)


def test_v3_torch_prefixed_dtype_name(tmp_path):
    items = [("x", torch.arange(4, dtype=torch.float16))]
    payload, mbs, index = fal_layout([(torch.float16, items)])
    footer = {"format": "flashpack_v3", "target_dtype": "torch.float16", "align_bytes": 128,
              "total_elems": 4, "index": [{k: v for k, v in r.items() if k != "macroblock"} for r in index]}
    out = flashpack.load(write_fal(tmp_path / "p.fp", footer, payload))
    assert out["x"].tolist() == [0.0, 1.0, 2.0, 3.0] and out["x"].dtype == torch.float16


def test_v3_keys_and_verify_report(tmp_path):
    items = [("big", torch.arange(200_000, dtype=torch.float32)), ("small", torch.arange(3, dtype=torch.float32))]
    path = fal_v3(tmp_path / "v3.fp", items, torch.float32)
    st = LoadStats()
    out = flashpack.load(path, keys=["small"], stats=st)
    assert out["small"].tolist() == [0.0, 1.0, 2.0]
    assert st.bytes_read <= 2 * 4096
    rep = flashpack.verify(path)
    assert rep.source == "fal-flashpack-v3" and rep.checksum_algorithm is None
    assert rep.chunks_verified == 0 and rep.tensors == 2 and rep.file_nbytes == os.path.getsize(path)


# --------------------------------------------------------------------------- v4


def v4_groups():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c32 = torch.from_numpy(np.array([0x3C00_4000, 0xBC00_0000], dtype=np.uint32).view(np.int32)).view(torch.complex32)
    return [
        (torch.float32, [("f32.a", torch.randn(4, 3)), ("f32.b", torch.tensor(7.0))]),
        (torch.bfloat16, [("bf", torch.randn(5, 7).to(torch.bfloat16)), ("bf.e", torch.empty(0, dtype=torch.bfloat16))]),
        (torch.int64, [("ids", torch.tensor([1000, 1001, 1002, 1003, 1004]))]),
        (torch.bool, [("mask", torch.tensor([True, False, True, True]))]),
        (torch.float8_e4m3fn, [("f8", torch.tensor([0x00, 0x7F, 0x80, 0x38], dtype=torch.uint8).view(torch.float8_e4m3fn))]),
        (torch.complex64, [("c64", torch.tensor([1 + 2j, -3j], dtype=torch.complex64))]),
        (torch.complex32, [("c32", c32)]),
        (torch.float16, [("h", torch.tensor([0.5, 65504.0], dtype=torch.float16))]),
        (torch.uint8, [("u8", torch.arange(200, dtype=torch.uint8))]),
    ]


@pytest.mark.parametrize("prefixed", [False, True])
def test_v4_many_dtypes_exact(tmp_path, prefixed):
    groups = v4_groups()
    path = fal_v4(tmp_path / "v4.fp", groups, prefixed=prefixed)
    wm = read_weight_map(path)
    assert wm.source == "fal-flashpack-v4"
    assert [b.dtype for b in wm.blocks] == ["F32", "BF16", "I64", "BOOL", "F8_E4M3", "C64", "C32", "F16", "U8"]
    assert all(b.offset % 128 == 0 for b in wm.blocks)
    items = [it for _, its in groups for it in its]
    for kw in ({}, {"backend": "threads"}, {"mmap": True}):
        out = flashpack.load(path, **kw)
        assert list(out) == [n for n, _ in items]
        assert_exact(out, items)
    out = flashpack.load(path)
    assert out["ids"].tolist() == [1000, 1001, 1002, 1003, 1004]
    assert out["f32.b"].shape == () and out["f32.b"].item() == 7.0


def test_v4_macroblock_default_zero(tmp_path):
    items = [("x", torch.arange(6.0)), ("y", torch.ones(2, 2))]
    payload, mbs, index = fal_layout([(torch.float32, items)])
    for rec in index:
        del rec["macroblock"]
    out = flashpack.load(write_fal(tmp_path / "d.fp", {"format": "flashpack_v4", "macroblocks": mbs, "index": index},
                                   payload))
    assert_exact(out, items)


def test_v4_keys_partial(tmp_path):
    groups = v4_groups()
    path = fal_v4(tmp_path / "v4.fp", groups)
    out = flashpack.load(path, keys=["mask", "c64"])
    assert list(out) == ["mask", "c64"]
    assert out["mask"].tolist() == [True, False, True, True]
    assert out["c64"].tolist() == [1 + 2j, -3j]


def test_v4_assign_into_model(tmp_path):
    src = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    sd = src.state_dict()
    path = fal_v4(tmp_path / "m.fp", [(torch.float32, list(sd.items()))])
    with flashpack.init_empty_weights():
        m = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    res = assign_from_file(m, path)
    assert res.missing_keys == [] and res.unexpected_keys == []
    for k, v in sd.items():
        assert torch.equal(m.state_dict()[k], v)


def test_fal_metadata_read(tmp_path):
    path = fal_v4(tmp_path / "m.fp", [(torch.float32, [("x", torch.ones(1))])], metadata={"a": "b", "n": 1})
    assert read_weight_map(path).metadata == {"a": "b", "n": "1"}


# --------------------------------------------------------------------------- damaged fal files


def _good_v4(tmp_path):
    groups = [(torch.float32, [("a", torch.arange(40.0)), ("b", torch.ones(3))]),
              (torch.int64, [("i", torch.arange(4))])]
    payload, mbs, index = fal_layout(groups)
    return payload, {"format": "flashpack_v4", "macroblocks": mbs, "index": index}


def expect_fal_error(path, exc, match):
    for fn in (lambda: flashpack.load(path), lambda: read_weight_map(path), lambda: flashpack.verify(path),
               lambda: flashpack.load(path, mmap=True)):
        with pytest.raises(exc, match=match) as ei:
            fn()
        assert isinstance(ei.value, FormatError) and isinstance(ei.value, ValueError)
        assert str(path) in str(ei.value)


def test_fal_good_file_is_good(tmp_path):
    payload, footer = _good_v4(tmp_path)
    out = flashpack.load(write_fal(tmp_path / "g.fp", footer, payload))
    assert out["a"].tolist() == [float(i) for i in range(40)] and out["i"].tolist() == [0, 1, 2, 3]


def _mutated(tmp_path, mutate):
    payload, footer = _good_v4(tmp_path)
    res = mutate(footer)
    return write_fal(tmp_path / "bad.fp", res if isinstance(res, bytes) else footer, payload)


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda f: b"{not json", WeightMapError, "fal flashpack footer at byte .* is not UTF-8 JSON"),
    (lambda f: b"\xff\xfe", WeightMapError, "is not UTF-8 JSON"),
    (lambda f: b"[1, 2]", WeightMapError, "fal flashpack footer is not a JSON object"),
    (lambda f: f.__setitem__("format", "flashpack_v9"), UnsupportedVersionError, "'flashpack_v9' is not supported"),
    (lambda f: f.pop("format"), UnsupportedVersionError, "format None is not supported"),
    (lambda f: f.pop("index"), WeightMapError, "missing or has a malformed field: KeyError\\('index'\\)"),
    (lambda f: f.pop("macroblocks"), WeightMapError, "KeyError\\('macroblocks'\\)"),
    (lambda f: f["index"][0].pop("shape"), WeightMapError, "KeyError\\('shape'\\)"),
    (lambda f: f["index"][0].__setitem__("offset", "x"), WeightMapError, "malformed field"),
    (lambda f: f["macroblocks"][0].__setitem__("dtype", "float128"), DtypeError, "fal flashpack dtype 'float128' is unknown"),
    (lambda f: f["macroblocks"][0].__setitem__("dtype", "F32"), DtypeError, "dtype 'F32' is unknown"),
    (lambda f: f["macroblocks"][1].__setitem__("length_elems", 5), LayoutError, "macroblock 1: length_elems and length_bytes disagree"),
    (lambda f: f["index"][0].__setitem__("length", 41), LayoutError, "key 'a': length 41 does not match shape \\[40\\]"),
    (lambda f: f["index"][0].__setitem__("shape", [-40]), LayoutError, "key 'a': negative dimension"),
    (lambda f: f["index"][1].__setitem__("offset", 1000), LayoutError, "key 'b' \\(F32\\) at bytes \\[4000, 4012\\) is outside its dtype block"),
    (lambda f: f["index"][1].__setitem__("offset", -1), LayoutError, "key 'b' \\(F32\\) at bytes \\[-4, 8\\) is outside"),
    (lambda f: f["index"][1].__setitem__("offset", 10), LayoutError, "keys 'a' \\[0, 160\\) and 'b' \\[40, 52\\) overlap"),
    (lambda f: f["index"][2].__setitem__("macroblock", 2), LayoutError, "key 'i': macroblock 2 does not exist"),
    (lambda f: f["index"][2].__setitem__("macroblock", -1), LayoutError, "key 'i': macroblock -1 does not exist"),
    (lambda f: f["index"][1].__setitem__("name", "a"), LayoutError, "name 'a' is not a string or appears twice"),
    (lambda f: f["index"][1].__setitem__("name", 7), LayoutError, "name 7 is not a string"),
    (lambda f: f["macroblocks"][1].__setitem__("offset_bytes", 64), LayoutError, "block 1 \\(I64\\) at bytes \\[64, 96\\)"),
    (lambda f: f["macroblocks"][1].__setitem__("length_bytes", 1 << 20) or f["macroblocks"][1].__setitem__("length_elems", 1 << 17),
     LayoutError, "leaves the payload region"),
])
def test_fal_damaged_footer(tmp_path, mutate, exc, match):
    expect_fal_error(_mutated(tmp_path, mutate), exc, match)


def test_fal_v3_unknown_target_dtype(tmp_path):
    path = fal_v3(tmp_path / "x.fp", [("x", torch.ones(2))], torch.float32)
    data = open(path, "rb").read().replace(b'"target_dtype": "float32"', b'"target_dtype": "float33"')
    data = data[:-16] + data[-16:]  # same length: footer length unchanged
    open(path, "wb").write(data)
    expect_fal_error(path, DtypeError, "'float33' is unknown")


def test_fal_footer_only_file_rejected(tmp_path):
    """C29 for fal files: the footer's tensors would point into the JSON text itself."""
    _, footer = _good_v4(tmp_path)
    expect_fal_error(write_fal(tmp_path / "f.fp", footer, b""), LayoutError, "leaves the payload region")


def test_fal_footer_length_beyond_file(tmp_path):
    path = tmp_path / "x.fp"
    with open(path, "wb") as f:
        f.write(b"{}" + (1 << 40).to_bytes(8, "little") + FAL_MAGIC)
    expect_fal_error(str(path), NotAFlashPackError, f"fal flashpack footer length {1 << 40} exceeds the file size 18")


def test_fal_truncated_loses_magic(tmp_path):
    payload, footer = _good_v4(tmp_path)
    path = write_fal(tmp_path / "t.fp", footer, payload)
    os.truncate(path, os.path.getsize(path) - 1)
    expect_fal_error(path, NotAFlashPackError, "not a flashpack file")


def test_fal_truncated_payload(tmp_path):
    """Cutting payload bytes shifts the footer: its length no longer points at valid JSON."""
    payload, footer = _good_v4(tmp_path)
    path = write_fal(tmp_path / "t.fp", footer, payload[:-20])
    with pytest.raises(LayoutError, match="leaves the payload region"):
        flashpack.load(path)


def test_fal_trailing_byte(tmp_path):
    payload, footer = _good_v4(tmp_path)
    path = write_fal(tmp_path / "t.fp", footer, payload)
    with open(path, "ab") as f:
        f.write(b"\0")
    expect_fal_error(path, NotAFlashPackError, "not a flashpack file")
