"""Dtypes: C08 (target_dtype casts floating tensors only) and C09 (every dtype of this torch round-trips
bit-exactly; a dtype this torch lacks is named in the error; quantized dtypes are rejected)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import flashpack
from flashpack import read_weight_map
from flashpack.format import DTYPE_ITEMSIZE, DTYPE_NAMES, dtype_name, torch_dtype

QUANTIZED = {torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4}


def torch_dtypes() -> list[torch.dtype]:
    """Every distinct dtype object this torch exposes."""
    seen = {}
    for name in dir(torch):
        v = getattr(torch, name)
        if isinstance(v, torch.dtype):
            seen[str(v)] = v
    return [seen[k] for k in sorted(seen)]


STORABLE = [d for d in torch_dtypes() if d not in QUANTIZED]


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def as_bytes(t: torch.Tensor) -> bytes:
    """Raw bits in logical row-major order (through a same-size integer view: torch cannot copy
    sub-byte dtypes)."""
    if t.dtype.itemsize in _BITS:
        t = t.view(_BITS[t.dtype.itemsize])
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def patterned(dtype: torch.dtype, shape=(3, 4), seed: int = 0) -> torch.Tensor:
    """A tensor of ``dtype`` with position-dependent raw bits (built through a byte view: numpy and
    most ops know nothing about fp8, sub-byte or bits dtypes)."""
    n = torch.Size(shape).numel() * dtype.itemsize
    raw = ((torch.arange(n, dtype=torch.int64) * 37 + seed * 11 + 5) % 251).to(torch.uint8)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


# --------------------------------------------------------------------------- C09


def test_dtype_table_covers_every_storable_torch_dtype():
    for dt in STORABLE:
        name = dtype_name(dt)
        assert torch_dtype(name) is dt
        assert DTYPE_ITEMSIZE[name] == dt.itemsize, name


def test_safetensors_dtype_names():
    assert dtype_name(torch.float32) == "F32" and dtype_name(torch.bfloat16) == "BF16"
    assert dtype_name(torch.float8_e4m3fn) == "F8_E4M3" and dtype_name(torch.float8_e5m2) == "F8_E5M2"
    assert dtype_name(torch.bool) == "BOOL" and dtype_name(torch.complex64) == "C64"
    assert dtype_name(torch.int64) == "I64" and dtype_name(torch.uint16) == "U16"


@pytest.mark.parametrize("dtype", STORABLE, ids=str)
def test_c09_every_dtype_round_trips_bit_exact(pack, dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # complex32 is "experimental"
        t = patterned(dtype)
        z = patterned(dtype, shape=())
        nc = patterned(dtype, shape=(4, 3), seed=1).t()  # non-contiguous
        sd = {"t": t, "z": z, "nc": nc, "e": torch.empty((0, 2), dtype=dtype)}
        path = pack(sd)
        assert {ti.dtype for ti in read_weight_map(path).tensors.values()} == {dtype_name(dtype)}
        for kw in ({}, {"mmap": True}, {"backend": "threads"}):
            out = flashpack.load(path, **kw)
            for k, v in sd.items():
                assert out[k].dtype == dtype and out[k].shape == v.shape, k
                assert as_bytes(out[k]) == as_bytes(v), k


def test_c09_all_dtypes_in_one_file(pack):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd = {str(d): patterned(d, shape=(5,), seed=i) for i, d in enumerate(STORABLE)}
        path = pack(sd)
        wm = read_weight_map(path)
        assert len(wm.blocks) == len(STORABLE)
        out = flashpack.load(path)
        for k, v in sd.items():
            assert out[k].dtype == v.dtype and as_bytes(out[k]) == as_bytes(v), k


def test_c09_float8_special_values_bit_exact(pack):
    # NaN encodings and negative zero survive (no numeric conversion on the way)
    raw = torch.tensor([0x00, 0x80, 0x7F, 0xFF, 0x7E, 0x01], dtype=torch.uint8)
    sd = {n: raw.view(getattr(torch, a)) for n, a in DTYPE_NAMES.items() if n.startswith("F8")}
    out = flashpack.load(pack(sd))
    for k in sd:
        assert torch.equal(out[k].view(torch.uint8), raw), k


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("qdtype", [torch.qint8, torch.quint8, torch.qint32])
def test_c09_quantized_rejected_clearly(tmp_path, qdtype):
    q = torch.quantize_per_tensor(torch.randn(4), 0.1, 10 if qdtype != torch.qint8 else 0, qdtype)
    p = tmp_path / "q.flashpack"
    with pytest.raises(flashpack.FlashPackError, match=r"key 'q'.*quantized"):
        flashpack.pack_to_file({"w": torch.ones(1), "q": q}, p)
    assert not p.exists()
    with pytest.raises(flashpack.DtypeError, match="quantized"):
        dtype_name(qdtype)


def test_c09_file_dtype_missing_from_torch(pack, monkeypatch):
    sd = {"scales": torch.tensor([0x7F, 0x80], dtype=torch.uint8).view(torch.float8_e8m0fnu),
          "w": torch.ones(2)}
    path = pack(sd)
    monkeypatch.delattr(torch, "float8_e8m0fnu")
    with pytest.raises(flashpack.DtypeError) as ei:
        flashpack.load(path)
    msg = str(ei.value)
    assert "'scales'" in msg and "F8_E8M0" in msg and "float8_e8m0fnu" in msg and path in msg
    assert isinstance(ei.value, ValueError)
    # the other keys still load
    assert torch.equal(flashpack.load(path, keys=["w"])["w"], torch.ones(2))
    # read_weight_map and verify only need the name's itemsize, not the torch dtype
    assert read_weight_map(path).tensors["scales"].dtype == "F8_E8M0"
    assert flashpack.verify(path).chunks_verified == 2


def test_c09_missing_dtype_via_table(pack, monkeypatch):
    from flashpack import format as fmt

    path = pack({"x": torch.ones(2, dtype=torch.float8_e5m2)})
    monkeypatch.setitem(fmt.DTYPE_NAMES, "F8_E5M2", "float8_e5m2_not_in_this_torch")
    with pytest.raises(flashpack.DtypeError, match=r"'F8_E5M2'.*key 'x'"):
        flashpack.load(path)


def test_c09_import_without_float8_e8m0fnu(tmp_path):
    """An older torch without the attribute: flashpack imports, packs and loads the rest, and names
    the dtype when a file holds it."""
    sd_path = tmp_path / "with_e8m0.flashpack"
    flashpack.pack_to_file({"s": torch.zeros(3, dtype=torch.uint8).view(torch.float8_e8m0fnu),
                            "w": torch.arange(3.0)}, sd_path)
    code = textwrap.dedent(f"""
        import torch
        del torch.float8_e8m0fnu
        import flashpack
        p = {str(tmp_path / 'plain.flashpack')!r}
        flashpack.pack_to_file({{"w": torch.arange(4.0), "f8": torch.ones(2).to(torch.float8_e4m3fn)}}, p)
        out = flashpack.load(p)
        assert out["w"].tolist() == [0.0, 1.0, 2.0, 3.0], out
        assert out["f8"].dtype == torch.float8_e4m3fn
        assert flashpack.load({str(sd_path)!r}, keys=["w"])["w"].tolist() == [0.0, 1.0, 2.0]
        try:
            flashpack.load({str(sd_path)!r})
        except flashpack.DtypeError as e:
            print("ERR", e)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "ERR" in r.stdout and "'s'" in r.stdout and "F8_E8M0" in r.stdout


# --------------------------------------------------------------------------- C08


def c08_state_dict():
    return {
        "mask": torch.tensor([True, False, True]),
        "freqs": torch.tensor([1 + 2j, -0.5j], dtype=torch.complex64),
        "ids": torch.tensor([1000, 1001, 1002, 1003, 1004], dtype=torch.int64),
        "w": torch.tensor([1.0, -2.5, 3.140625], dtype=torch.bfloat16),
    }


def test_c08_exact_round_trip_without_target(pack):
    sd = c08_state_dict()
    out = flashpack.load(pack(sd))
    for k, v in sd.items():
        assert out[k].dtype == v.dtype and torch.equal(out[k], v), k
    assert out["ids"].tolist() == [1000, 1001, 1002, 1003, 1004]


@pytest.mark.parametrize("target", [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn])
def test_c08_target_casts_floating_only(pack, target):
    sd = c08_state_dict()
    path = pack(sd, "t.flashpack", target)
    out = flashpack.load(path)
    assert out["mask"].dtype == torch.bool and out["mask"].tolist() == [True, False, True]
    assert out["freqs"].dtype == torch.complex64 and torch.equal(out["freqs"], sd["freqs"])
    assert out["ids"].dtype == torch.int64 and out["ids"].tolist() == [1000, 1001, 1002, 1003, 1004]
    assert out["w"].dtype == target
    assert torch.equal(out["w"], sd["w"].to(target))


INT_LIKE = [d for d in STORABLE if not d.is_floating_point and not d.is_complex]
COMPLEX = [d for d in STORABLE if d.is_complex]
FLOATING = [d for d in STORABLE if d.is_floating_point and d != torch.float4_e2m1fn_x2]


@pytest.mark.parametrize("target", [torch.bfloat16, torch.float8_e5m2])
def test_c08_kind_every_int_bool_complex_dtype_untouched(pack, target):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd = {str(d): patterned(d, shape=(6,), seed=i) for i, d in enumerate(INT_LIKE + COMPLEX)}
        out = flashpack.load(pack(sd, "t.flashpack", target_dtype=target))
        for k, v in sd.items():
            assert out[k].dtype == v.dtype and as_bytes(out[k]) == as_bytes(v), k


@pytest.mark.parametrize("target", [torch.bfloat16, torch.float16, torch.float32])
def test_c08_kind_every_float_dtype_cast(pack, target):
    vals = torch.tensor([0.0, 1.0, -2.0, 0.5, 4.0, 0.25])
    sd = {str(d): vals.to(d) for d in FLOATING if d != torch.float8_e8m0fnu}
    sd["e8m0"] = torch.tensor([0.5, 1.0, 2.0, 4.0]).to(torch.float8_e8m0fnu)
    out = flashpack.load(pack(sd, "t.flashpack", target))
    for k, v in sd.items():
        assert out[k].dtype == target, k
        assert torch.equal(out[k], v.to(target)), k
    assert out["e8m0"].tolist() == [0.5, 1.0, 2.0, 4.0]


def test_c08_packed_float4_kept_under_target(pack):
    """float4_e2m1fn_x2 packs two values per byte: no cast is defined, it is stored as is."""
    raw = torch.tensor([0x12, 0x34, 0xFE], dtype=torch.uint8)
    sd = {"f4": raw.view(torch.float4_e2m1fn_x2), "w": torch.ones(2)}
    out = flashpack.load(pack(sd, "t.flashpack", torch.bfloat16))
    assert out["f4"].dtype == torch.float4_e2m1fn_x2
    assert torch.equal(out["f4"].view(torch.uint8), raw)
    assert out["w"].dtype == torch.bfloat16


def test_c08_fp8_to_fp16_cast_exact(pack):
    x = torch.tensor([0.5, -1.5, 448.0, 0.0]).to(torch.float8_e4m3fn)
    out = flashpack.load(pack({"x": x}, "t.flashpack", torch.float16))
    assert out["x"].dtype == torch.float16 and out["x"].tolist() == [0.5, -1.5, 448.0, 0.0]
