"""Property: pack_to_file then load gives back every key bit-exactly, with its dtype and shape, over
random shapes (zero-size and 0-dim included), dtypes, tie patterns (the same tensor under several
keys, views and slices of one shared storage), target dtypes and load modes."""

from __future__ import annotations

import os
import tempfile

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flashpack
from flashpack import read_weight_map
from flashpack.serialization import _castable

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int16, torch.uint8,
          torch.bool, torch.complex64, torch.float8_e4m3fn]
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> bytes:
    if t.dtype.itemsize in _BITS:
        t = t.view(_BITS[t.dtype.itemsize])
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def make_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Deterministic tensor with finite values (so a cast is exactly reproducible)."""
    n = 1
    for d in shape:
        n *= d
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point or dtype.is_complex:
        base = torch.randint(-64, 64, (n,), generator=g).float() / 8
        if dtype.is_complex:
            return torch.complex(base, base.flip(0)).to(dtype).reshape(shape)
        return base.to(dtype).reshape(shape)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=g, dtype=dtype)


shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)


@st.composite
def state_dicts(draw):
    sd: dict[str, torch.Tensor] = {}
    n = draw(st.integers(0, 8))
    for i in range(n):
        kind = draw(st.sampled_from(["new", "new", "tie", "slice", "view"]) if sd else st.just("new"))
        key = f"k{i}"
        if kind == "new":
            sd[key] = make_tensor(draw(st.sampled_from(DTYPES)), draw(shapes), draw(st.integers(0, 2**31)))
        elif kind == "tie":
            sd[key] = sd[draw(st.sampled_from(sorted(sd)))]
        else:
            src = sd[draw(st.sampled_from(sorted(sd)))]
            flat = src.reshape(-1) if src.is_contiguous() else src.contiguous().reshape(-1)
            if flat.numel() == 0:
                sd[key] = flat
                continue
            lo = draw(st.integers(0, flat.numel() - 1))
            hi = draw(st.integers(lo, flat.numel()))
            piece = flat[lo:hi]
            if kind == "view" and piece.numel() >= 2 and piece.numel() % 2 == 0:
                piece = piece.view(2, -1).t()  # non-contiguous view into the shared storage
            sd[key] = piece
    return sd


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(sd=state_dicts(), target=st.sampled_from([None, None, torch.float16, torch.bfloat16]),
       mode=st.sampled_from(["plain", "mmap", "keys", "threads", "noverify"]))
def test_pack_load_round_trip(sd, target, mode):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "p.flashpack")
        flashpack.pack_to_file(sd, path, target_dtype=target)
        wm = read_weight_map(path)
        assert set(wm.keys()) == set(sd)
        # every stored byte counted once: aliases hold nothing
        assert wm.payload_nbytes == sum(
            sd[k].numel() * (target if target is not None and _castable(sd[k].dtype) else sd[k].dtype).itemsize
            for k in wm.tensors)

        kw = {"plain": {}, "mmap": {"mmap": True}, "threads": {"backend": "threads"},
              "noverify": {"verify": False}, "keys": {"keys": sorted(sd)[::2]}}[mode]
        out = flashpack.load(path, **kw)
        wanted = kw.get("keys", list(sd))
        assert sorted(out) == sorted(wanted)
        for k in wanted:
            t = sd[k]
            expect = t.to(target) if target is not None and _castable(t.dtype) else t
            assert out[k].dtype == expect.dtype, k
            assert out[k].shape == t.shape, k
            assert bits(out[k]) == bits(expect), k
        # the same tensor under several keys comes back as one tensor
        for a, b in wm.aliases.items():
            assert sd[a] is sd[b] or (sd[a].data_ptr() == sd[b].data_ptr() and sd[a].stride() == sd[b].stride()
                                      and sd[a].shape == sd[b].shape)
            if a in out and b in out:
                assert out[a] is out[b]
        for k1 in wanted:
            for k2 in wanted:
                if k1 < k2 and sd[k1] is sd[k2] and sd[k1].numel():
                    assert out[k1].data_ptr() == out[k2].data_ptr()
