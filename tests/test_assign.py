"""assign_from_file and FlashPackMixin: ties (C01, C03), mismatches (C10), buffers (C11), strictness
(C12), eval mode (C13), writable memory (C14), building on meta without random init."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import flashpack
from flashpack import FlashPackMixin, ModelMismatchError, assign_from_file, init_empty_weights, read_weight_map

from _helpers import flip_byte


class Tied(nn.Module, FlashPackMixin):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(2, 2, bias=False)
        self.proj = nn.Linear(2, 2, bias=False)
        self.proj.weight = self.embed.weight


class LM(nn.Module, FlashPackMixin):
    """A first ordinary layer, then a tie (wte <-> lm_head)."""

    def __init__(self, tie: bool = True):
        super().__init__()
        self.norm = nn.Linear(3, 3)
        self.wte = nn.Embedding(5, 3)
        self.lm_head = nn.Linear(3, 5, bias=False)
        if tie:
            self.lm_head.weight = self.wte.weight


def snapshot(m: nn.Module) -> dict:
    """Object identity, device and values of every parameter and buffer."""
    return {n: (id(t), t.device.type, None if t.device.type == "meta" else t.detach().clone())
            for n, t in [*m.named_parameters(remove_duplicate=False), *m.named_buffers(remove_duplicate=False)]}


def assert_unchanged(m: nn.Module, snap: dict) -> None:
    now = snapshot(m)
    assert now.keys() == snap.keys()
    for k, (i, dev, val) in snap.items():
        assert now[k][0] == i and now[k][1] == dev, k
        if val is not None:
            assert torch.equal(now[k][2], val), k


# --------------------------------------------------------------------------- C01


def test_c01_tie_kept_and_stored_once(pack):
    src = Tied()
    with torch.no_grad():
        src.embed.weight.copy_(torch.ones(2, 2))
    path = pack(src)
    wm = read_weight_map(path)
    assert list(wm.tensors) == ["embed.weight"] and wm.aliases == {"proj.weight": "embed.weight"}
    assert wm.payload_nbytes == 16 and [b.nbytes for b in wm.blocks] == [16]

    for build in (Tied, lambda: _on_meta(Tied)):
        m = build()
        res = assign_from_file(m, path)
        assert res.missing_keys == [] and res.unexpected_keys == []
        assert m.embed.weight is m.proj.weight
        assert isinstance(m.embed.weight, nn.Parameter) and m.embed.weight.requires_grad
        assert len(list(m.named_parameters())) == 1
        assert torch.equal(m.embed.weight, torch.ones(2, 2))
    m = Tied.from_flashpack(path)
    assert m.embed.weight is m.proj.weight and m.embed.weight.device.type == "cpu"


def _on_meta(cls, *a, **k):
    with init_empty_weights():
        return cls(*a, **k)


def test_c01_kind_tie_file_stored_twice_equal_values(pack):
    w = torch.randn(5, 3)
    src = LM(tie=False)
    sd = {k: v for k, v in src.state_dict().items()}
    sd["wte.weight"], sd["lm_head.weight"] = w.clone(), w.clone()  # equal, but two copies
    path = pack(sd)
    assert read_weight_map(path).aliases == {}
    m = _on_meta(LM)
    assign_from_file(m, path)
    assert m.wte.weight is m.lm_head.weight and torch.equal(m.wte.weight, w)


# --------------------------------------------------------------------------- C03


def test_c03a_file_stores_one_name_of_a_tie(pack):
    src = LM(tie=False)
    sd = {k: v for k, v in src.state_dict().items() if k != "wte.weight"}
    path = pack(sd)
    for m in (_on_meta(LM), LM()):
        res = assign_from_file(m, path, strict=True)
        assert res.missing_keys == [] and res.unexpected_keys == []
        assert m.wte.weight is m.lm_head.weight
        assert torch.equal(m.wte.weight, src.lm_head.weight)
        assert not any(t.is_meta for t in [*m.parameters(), *m.buffers()])
    m = LM.from_flashpack(path)
    assert m.wte.weight is m.lm_head.weight and torch.equal(m.lm_head.weight, src.lm_head.weight)


def test_c03b_tied_names_with_different_values_rejected_model_untouched(pack):
    src = LM(tie=False)
    path = pack(src)  # wte.weight and lm_head.weight differ
    for m in (_on_meta(LM), LM()):
        snap = snapshot(m)
        with pytest.raises(ModelMismatchError) as ei:
            assign_from_file(m, path)
        msg = str(ei.value)
        assert "'wte.weight'" in msg and "'lm_head.weight'" in msg and path in msg
        assert isinstance(ei.value, ValueError)
        assert_unchanged(m, snap)  # norm.* (assigned before the tie in the old code) is untouched too
        assert m.wte.weight is m.lm_head.weight


# --------------------------------------------------------------------------- C10


class Vec(nn.Module, FlashPackMixin):
    def __init__(self, n: int = 8, dtype=torch.float32):
        super().__init__()
        self.a = nn.Linear(2, 2)
        self.w = nn.Parameter(torch.zeros(n, dtype=dtype))


def test_c10_shape_mismatch_names_key_and_shapes(pack):
    path = pack({"a.weight": torch.ones(2, 2), "a.bias": torch.ones(2), "w": torch.ones(4)})
    m = Vec(8)
    snap = snapshot(m)
    with pytest.raises(ModelMismatchError) as ei:
        assign_from_file(m, path)
    msg = str(ei.value)
    assert "key 'w'" in msg and "[4]" in msg and "[8]" in msg and path in msg
    assert_unchanged(m, snap)
    assert m.w.shape == (8,)
    with pytest.raises(ModelMismatchError):
        Vec.from_flashpack(path, 8)


def test_c10_dtype_mismatch_names_key_and_dtypes(pack):
    path = pack({"a.weight": torch.ones(2, 2), "a.bias": torch.ones(2), "w": torch.ones(8)})
    m = Vec(8, torch.bfloat16)
    snap = snapshot(m)
    with pytest.raises(ModelMismatchError) as ei:
        assign_from_file(m, path)
    msg = str(ei.value)
    assert "key 'w'" in msg and "torch.float32" in msg and "torch.bfloat16" in msg and path in msg
    assert_unchanged(m, snap)
    assert m.w.dtype == torch.bfloat16


@pytest.mark.parametrize("file_t,model_shape,model_dtype", [
    (torch.ones(2, 4), (4, 2), torch.float32),      # same numel, other shape
    (torch.ones(8, 1), (8,), torch.float32),
    (torch.tensor(1.0), (1,), torch.float32),         # 0-dim vs (1,)
    (torch.ones(8, dtype=torch.int64), (8,), torch.float64),
    (torch.ones(8, dtype=torch.float16), (8,), torch.bfloat16),
])
def test_c10_kind_mismatches(pack, file_t, model_shape, model_dtype):
    path = pack({"a.weight": torch.ones(2, 2), "a.bias": torch.ones(2), "w": file_t})
    m = Vec()
    m.w = nn.Parameter(torch.zeros(model_shape, dtype=model_dtype))
    snap = snapshot(m)
    with pytest.raises(ModelMismatchError, match="key 'w'"):
        assign_from_file(m, path, strict=False)
    assert_unchanged(m, snap)


# --------------------------------------------------------------------------- C11


class WithBuffers(nn.Module, FlashPackMixin):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.register_buffer("scale", torch.full((8,), 3.0))
        self.register_buffer("position_ids", torch.arange(8), persistent=False)


def test_c11_non_persistent_buffers_real(pack, monkeypatch):
    monkeypatch.setenv("ACCELERATE_INIT_INCLUDE_BUFFERS", "true")
    src = WithBuffers()
    path = pack(src)
    assert "position_ids" not in read_weight_map(path).keys()
    m = WithBuffers.from_flashpack(path)
    assert m.position_ids.device.type == "cpu" and torch.equal(m.position_ids, torch.arange(8))
    assert m.scale.device.type == "cpu" and torch.equal(m.scale, torch.full((8,), 3.0))
    assert torch.equal(m.lin.weight, src.lin.weight) and torch.equal(m.lin.bias, src.lin.bias)
    assert not any(t.is_meta for t in [*m.parameters(), *m.buffers()])
    x = torch.randn(2, 8)
    assert torch.equal(m.lin(x), src.lin(x))


def test_one_walk_finds_the_default_device_and_each_non_persistent_buffer_once(pack):
    """assign_from_file's one walk over the modules (``_model_slots``): every key of a module shared under two names,
    its non-persistent buffer listed once (it is moved once), and the default device: the first parameter's not on
    meta, else the first buffer's, persistent or not, else none (the CPU)."""
    from flashpack.deserialization import _model_slots

    shared = WithBuffers()
    outer = nn.Module()
    outer.a, outer.b = shared, shared
    _, kinds, owners, loose, device = _model_slots(outer)
    assert sorted(kinds) == sorted(f"{p}.{k}" for p in "ab" for k in ("lin.weight", "lin.bias", "scale"))
    assert owners["b.scale"] == (shared, "scale") and kinds["b.lin.weight"] == ("param", shared.lin.weight)
    assert [(mod is shared, name) for mod, name, _ in loose] == [(True, "position_ids")]
    assert device == torch.device("cpu")
    with torch.device("meta"):
        m = WithBuffers()
    assert _model_slots(m)[4] is None
    m.position_ids = torch.arange(8)  # the non-persistent buffer on the CPU, everything else on meta
    assert _model_slots(m)[4] == torch.device("cpu")
    src = WithBuffers()
    assign_from_file(m, pack(src))  # no device given: the buffer's
    assert m.lin.weight.device.type == "cpu" and torch.equal(m.lin.weight, src.lin.weight)
    assert torch.equal(m.position_ids, torch.arange(8))


def test_c11_persistent_buffer_value_from_file(pack):
    src = WithBuffers()
    src.scale.fill_(5.0)
    m = WithBuffers.from_flashpack(pack(src))
    assert m.scale.tolist() == [5.0] * 8


# --------------------------------------------------------------------------- C12


class Extra(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 2)
        self.only_model = nn.Parameter(torch.zeros(3))


def _c12_path(pack):
    return pack({"a.weight": torch.ones(2, 2), "a.bias": torch.full((2,), 2.0), "only_file": torch.ones(1)})


def test_c12_strict_raises_listing_keys_model_untouched(pack):
    path = _c12_path(pack)
    m = _on_meta(Extra)
    snap = snapshot(m)
    with pytest.raises(ModelMismatchError) as ei:
        assign_from_file(m, path, strict=True)
    msg = str(ei.value)
    assert "missing keys ['only_model']" in msg and "unexpected keys ['only_file']" in msg and path in msg
    assert_unchanged(m, snap)


def test_c12_non_strict_warns_names_meta_returns_lists(pack):
    path = _c12_path(pack)
    m = _on_meta(Extra)
    with pytest.warns(UserWarning) as rec:
        res = assign_from_file(m, path, strict=False)
    assert res.missing_keys == ["only_model"] and res.unexpected_keys == ["only_file"]
    text = " ".join(str(w.message) for w in rec)
    assert "missing keys ['only_model']" in text and "unexpected keys ['only_file']" in text
    assert "still on the meta device (no data): ['only_model']" in text
    assert torch.equal(m.a.weight, torch.ones(2, 2)) and m.a.bias.tolist() == [2.0, 2.0]
    assert m.only_model.is_meta


def test_c12_non_strict_real_model_no_meta_named(pack):
    path = _c12_path(pack)
    m = Extra()
    with pytest.warns(UserWarning) as rec:
        res = assign_from_file(m, path, strict=False)
    assert (res.missing_keys, res.unexpected_keys) == (["only_model"], ["only_file"])
    assert "meta" not in " ".join(str(w.message) for w in rec)
    assert m.only_model.tolist() == [0.0, 0.0, 0.0]


def test_c12_exact_match_no_warning(pack):
    src = Extra()
    path = pack(src)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = assign_from_file(_on_meta(Extra), path, strict=False)
    assert res.missing_keys == [] and res.unexpected_keys == []


# --------------------------------------------------------------------------- C13


class Net(nn.Module, FlashPackMixin):
    def __init__(self, n: int = 8, *, p: float = 0.5):
        super().__init__()
        self.lin = nn.Linear(n, n)
        self.drop = nn.Dropout(p)

    def forward(self, x):
        return self.drop(self.lin(x))


def test_c13_from_flashpack_returns_eval_mode(tmp_path):
    src = Net(8, p=0.5).train()
    path = tmp_path / "net.flashpack"
    assert src.save_flashpack(path) == path.stat().st_size
    m = Net.from_flashpack(path, 8, p=0.5)
    assert not m.training and not m.drop.training and not m.lin.training
    x = torch.randn(4, 8)
    y1, y2 = m(x), m(x)
    assert torch.equal(y1, y2)
    assert torch.equal(y1, src.lin(x))


def test_from_flashpack_no_random_init_builds_on_meta(tmp_path, monkeypatch):
    path = tmp_path / "net.flashpack"
    Net(8).save_flashpack(path)
    seen = []
    real = nn.Linear.reset_parameters

    def spy(self):
        seen.append((self.weight.device.type, self.bias.device.type))
        real(self)

    monkeypatch.setattr(nn.Linear, "reset_parameters", spy)
    torch.manual_seed(1234)
    rng = torch.get_rng_state()
    m = Net.from_flashpack(path, 8)
    assert seen == [("meta", "meta")]  # init ran on meta tensors: no memory, no random numbers
    assert torch.equal(torch.get_rng_state(), rng)
    assert m.lin.weight.device.type == "cpu"
    assert isinstance(m.lin.weight, nn.Parameter)
    # the patch on register_parameter is gone afterwards
    assert not nn.Linear(2, 2).weight.is_meta


def test_save_flashpack_target_dtype_and_metadata(tmp_path):
    path = tmp_path / "net.flashpack"
    src = Net(4)
    src.save_flashpack(path, torch.bfloat16, metadata={"k": "v"})
    wm = read_weight_map(path)
    assert wm.metadata == {"k": "v"} and {t.dtype for t in wm.tensors.values()} == {"BF16"}
    m = _on_meta(Net, 4).to(torch.bfloat16)
    assign_from_file(m, path)
    assert torch.equal(m.lin.weight, src.lin.weight.detach().to(torch.bfloat16))


def test_from_flashpack_damaged_file_raises(tmp_path):
    path = tmp_path / "net.flashpack"
    Net(8).save_flashpack(path)
    flip_byte(path, read_weight_map(path).tensors["lin.weight"].offset)
    with pytest.raises(flashpack.ChecksumMismatchError):
        Net.from_flashpack(path, 8)


def test_requires_grad_kept(pack):
    src = Net(4)
    src.lin.bias.requires_grad_(False)
    path = pack(src)
    m = _on_meta(Net, 4)
    m.lin.bias.requires_grad_(False)
    assign_from_file(m, path)
    assert m.lin.weight.requires_grad and not m.lin.bias.requires_grad


# --------------------------------------------------------------------------- C14


def test_c14_in_place_and_sgd_after_load(pack):
    w0 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    path = pack({"lin.weight": w0, "lin.bias": torch.tensor([0.5, -0.5])})
    sd = flashpack.load(path)
    sd["lin.weight"].add_(1)
    assert sd["lin.weight"].tolist() == [[2.0, 3.0], [4.0, 5.0]]

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

    for kw in ({}, {"mmap": True}):
        m = _on_meta(M)
        assign_from_file(m, path, **kw)
        with torch.no_grad():
            m.lin.weight.add_(1)
        assert m.lin.weight.tolist() == [[2.0, 3.0], [4.0, 5.0]]
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        x = torch.tensor([[1.0, 1.0]])
        m.lin(x).sum().backward()
        # d(sum(Wx+b))/dW = [[1, 1], [1, 1]], /db = [1, 1]
        opt.step()
        assert m.lin.weight.tolist() == [[1.5, 2.5], [3.5, 4.5]]
        assert m.lin.bias.tolist() == [0.0, -1.0]
    # the file never changed
    again = flashpack.load(path)
    assert torch.equal(again["lin.weight"], w0)
