"""Faults found by trying to break flashpack as a user would (each was a real bug)."""

import os

import pytest
import torch
from torch import nn

import flashpack
from flashpack import deserialization
import flashpack.deserialization
import flashpack.mixin
from flashpack.errors import ModelMismatchError, ReadError

from _helpers import rewrite_weight_map


def test_training_with_inplace_buffer_updates_after_load(tmp_path):
    """All tensors of a dtype share one block; they must not share one autograd version counter, or a
    BatchNorm updating running_mean in train mode breaks backward() of every weight (C14's kind)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.BatchNorm1d(4))
    path = tmp_path / "bn.flashpack"
    flashpack.pack_to_file(m, path)
    for kw in ({}, {"mmap": True}):
        fresh = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.BatchNorm1d(4))
        flashpack.assign_from_file(fresh, path, **kw)
        fresh.train()
        opt = torch.optim.SGD(fresh.parameters(), lr=0.1)
        before = fresh[0].weight.detach().clone()
        fresh(torch.randn(3, 4)).sum().backward()  # raised "modified by an inplace operation" before the fix
        opt.step()
        assert fresh[0].weight.grad is not None and not torch.equal(fresh[0].weight, before)
        assert int(fresh[2].num_batches_tracked) == 1


def test_tensors_of_one_block_have_separate_version_counters(tmp_path):
    path = tmp_path / "v.flashpack"
    flashpack.pack_to_file({"a": torch.ones(4), "b": torch.ones(4)}, path)
    sd = flashpack.load(path)
    va = sd["a"]._version
    sd["b"].add_(1)
    assert sd["a"]._version == va and torch.equal(sd["a"], torch.ones(4)) and torch.equal(sd["b"], torch.full((4,), 2.0))
    assert sd["a"].untyped_storage().data_ptr() == sd["b"].untyped_storage().data_ptr()  # still zero-copy


@pytest.mark.parametrize("how", [{}, {"mmap": True}, {"cache": "bypass"}])
def test_torch_save_of_a_loaded_multi_dtype_state_dict(tmp_path, backend, how):
    """torch.save refused every load holding more than one dtype ("Cannot save multiple tensors or storages that view
    the same data as different types": one storage viewed as bf16, int64, fp32): a model filled by assign_from_file
    could not be saved with torch.save(model.state_dict()). Each dtype block now has its own storage over the one
    allocation: the save round-trips, a saved tensor carries its block (not the whole load), memory is still shared."""
    torch.manual_seed(0)
    sd = {"w": torch.randn(64, 64).bfloat16(), "ids": torch.arange(1000), "b": torch.randn(300),
          "w2": torch.randn(7).bfloat16(), "flag": torch.tensor([True, False]), "e": torch.empty(0, 3)}
    path = tmp_path / "mix.flashpack"
    flashpack.pack_to_file(sd, path)
    out = flashpack.load(path, backend=backend, **how)
    saved = tmp_path / "sd.pt"
    torch.save(out, saved)
    back = torch.load(saved)
    assert list(back) == list(sd) and all(back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k]) for k in sd)
    # one storage per dtype block: w and w2 share theirs; the int64 block is not the bf16 one
    assert out["w"].untyped_storage().data_ptr() == out["w2"].untyped_storage().data_ptr()
    assert out["ids"].untyped_storage().data_ptr() != out["w"].untyped_storage().data_ptr()
    assert out["ids"].untyped_storage().nbytes() < 8192 + 64  # its block, not the whole 16 KiB+ load
    one = tmp_path / "ids.pt"
    torch.save(out["ids"], one)
    assert os.path.getsize(one) < os.path.getsize(path)  # a saved tensor carries its block only
    out["ids"].add_(1)  # still private and writable, still the loaded memory
    assert torch.equal(out["ids"], sd["ids"] + 1)
    model = nn.Module()
    model.lin = nn.Linear(64, 64, bias=False).bfloat16()
    model.register_buffer("ids", torch.zeros(1000, dtype=torch.int64))
    flashpack.pack_to_file({"lin.weight": sd["w"], "ids": sd["ids"]}, tmp_path / "m.flashpack")
    flashpack.assign_from_file(model, tmp_path / "m.flashpack", backend=backend, mmap=how.get("mmap", False))
    torch.save(model.state_dict(), tmp_path / "m.pt")
    got = torch.load(tmp_path / "m.pt")
    assert torch.equal(got["lin.weight"], sd["w"]) and torch.equal(got["ids"], sd["ids"])


class _Pair(nn.Module):
    def __init__(self, tie: bool):
        super().__init__()
        self.a = nn.Linear(2, 2, bias=False)
        self.b = nn.Linear(2, 2, bias=False)
        if tie:
            self.b.weight = self.a.weight


def test_tie_in_file_into_untied_model_gives_independent_memory(tmp_path):
    path = tmp_path / "t.flashpack"
    src = _Pair(tie=True)
    flashpack.pack_to_file(src, path)
    assert flashpack.read_weight_map(path).aliases == {"b.weight": "a.weight"}
    u = _Pair(tie=False)
    flashpack.assign_from_file(u, path)
    assert u.a.weight is not u.b.weight
    assert u.a.weight.data_ptr() != u.b.weight.data_ptr()
    assert torch.equal(u.a.weight, src.a.weight) and torch.equal(u.b.weight, src.a.weight)
    with torch.no_grad():
        u.a.weight.add_(1)
    assert torch.equal(u.b.weight, src.a.weight)  # updating one leaves the other alone


def _replace_after_weight_map(monkeypatch, path, other):
    real = deserialization.read_weight_map

    def then_replace(p):
        wm = real(p)
        os.replace(other, path)  # a trainer publishing a new checkpoint under the same name
        return wm

    monkeypatch.setattr(deserialization, "read_weight_map", then_replace)
    monkeypatch.setattr(flashpack.deserialization, "read_weight_map", then_replace)  # assign_from_file reads it there


@pytest.mark.parametrize("kw", [{}, {"verify": False}, {"mmap": True}, {"backend": "threads"}])
def test_file_replaced_mid_load_is_detected_not_mixed(tmp_path, monkeypatch, kw):
    path, other = tmp_path / "m.flashpack", tmp_path / "new.flashpack"
    flashpack.pack_to_file({"a": torch.full((4,), 1.0), "b": torch.full((4,), 2.0)}, path)
    flashpack.pack_to_file({"b": torch.full((4,), 3.0), "a": torch.full((4,), 4.0)}, other)
    _replace_after_weight_map(monkeypatch, path, other)
    with pytest.raises(ReadError, match="replaced, truncated or rewritten while it was being loaded") as ei:
        flashpack.load(path, **kw)
    assert ei.value.filename == str(path)


def test_assign_checks_the_weight_map_it_loads(tmp_path, monkeypatch):
    path, other = tmp_path / "m.flashpack", tmp_path / "new.flashpack"
    flashpack.pack_to_file(nn.Linear(4, 4), path)
    flashpack.pack_to_file({"weight": torch.ones(2, 8), "bias": torch.ones(4)}, other)
    _replace_after_weight_map(monkeypatch, path, other)
    m = nn.Linear(4, 4)
    w = m.weight
    with pytest.raises(ReadError):
        flashpack.assign_from_file(m, path)
    assert m.weight is w and m.weight.shape == (4, 4)


def test_assign_keys_subset_counts_the_rest_as_missing(tmp_path):
    path = tmp_path / "s.flashpack"
    flashpack.pack_to_file(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), path)
    with torch.device("meta"):
        m = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    with pytest.raises(ModelMismatchError, match=r"missing keys \['0.bias', '1.weight', '1.bias'\]"):
        flashpack.assign_from_file(m, path, keys=["0.weight"])
    with pytest.warns(UserWarning, match="still on the meta device"):
        res = flashpack.assign_from_file(m, path, keys=["0.weight"], strict=False)
    assert res.missing_keys == ["0.bias", "1.weight", "1.bias"] and res.unexpected_keys == []
    assert m[0].weight.device.type == "cpu" and m[1].weight.device.type == "meta"


@pytest.mark.parametrize("bad", [torch.int8, torch.bool, torch.complex64, "float16", 16])
def test_target_dtype_must_be_a_floating_torch_dtype(tmp_path, bad):
    with pytest.raises(TypeError, match="target_dtype must be a floating-point torch.dtype"):
        flashpack.pack_to_file({"a": torch.randn(4)}, tmp_path / "x.flashpack", bad)
    assert not os.listdir(tmp_path)  # nothing written, no temporary file left


def test_zero_size_tensor_with_a_dimension_past_int64_is_a_layout_error(tmp_path):

    path = tmp_path / "z.flashpack"
    flashpack.pack_to_file({"z": torch.zeros(0, 3)}, path)

    def edit(doc):
        doc["tensors"]["z"]["shape"] = [0, 2**63]

    rewrite_weight_map(str(path), edit)
    with pytest.raises(flashpack.errors.LayoutError, match="each at most 2\\*\\*63 - 1"):
        flashpack.load(path)
    with pytest.raises(flashpack.errors.LayoutError):
        flashpack.verify(path)


def test_checksum_chunk_larger_than_1_gib_is_rejected(tmp_path):

    path = tmp_path / "c.flashpack"
    flashpack.pack_to_file({"a": torch.ones(8)}, path)
    rewrite_weight_map(str(path), lambda doc: doc["checksum"].update(chunk_nbytes=2**50))
    with pytest.raises(flashpack.errors.WeightMapError, match="chunk_nbytes"):
        flashpack.verify(path)


@pytest.mark.parametrize("value", ["100000", "4097", "8192", "0", "-3", "many"])
def test_queue_depth_out_of_range_is_named(monkeypatch, value):
    from flashpack.settings import settings

    monkeypatch.setenv("FLASHPACK_QUEUE_DEPTH", value)
    with pytest.raises(ValueError, match=f"FLASHPACK_QUEUE_DEPTH='{value}': expected an integer from 1 to 4096"):
        settings()


def test_queue_depth_at_the_bound_loads_with_auto(monkeypatch, tmp_path):
    # 4096 is the C side's bound too (native/fp_uring.h FP_MAX_QUEUE_DEPTH): auto must load, never EINVAL
    monkeypatch.setenv("FLASHPACK_QUEUE_DEPTH", "4096")
    flashpack.pack_to_file({"a": torch.arange(10)}, tmp_path / "q.flashpack")
    assert torch.equal(flashpack.load(tmp_path / "q.flashpack", backend="auto")["a"], torch.arange(10))


def test_revert_to_pt_of_sub_byte_dtypes_is_a_usage_error_naming_the_dtype(tmp_path, capsys):
    """torch.save cannot store uint1-7/int1-7: the revert says so (exit 2, input unusable), not "damaged"."""
    from flashpack.tools.cli import main

    sd = {"u1": torch.tensor([1, 0, 1], dtype=torch.uint8).view(torch.uint1)}
    path = tmp_path / "s.flashpack"
    flashpack.pack_to_file(sd, path)
    assert main(["revert", str(path), str(tmp_path / "s.pt"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "['U1']" in err and "key 'u1'" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["s.flashpack"]  # no partial or temporary file


def test_folders_and_missing_folders_are_named(tmp_path):
    with pytest.raises(IsADirectoryError) as ei:
        flashpack.load(tmp_path)
    assert ei.value.filename == str(tmp_path)
    with pytest.raises(IsADirectoryError):
        flashpack.pack_to_file({"a": torch.ones(1)}, tmp_path)
    missing = tmp_path / "no" / "such" / "x.flashpack"
    with pytest.raises(FileNotFoundError, match="folder does not exist") as ei:
        flashpack.pack_to_file({"a": torch.ones(1)}, missing)
    assert ei.value.filename == str(missing)


def test_keys_given_as_one_string_mean_that_key(tmp_path):
    path = tmp_path / "k.flashpack"
    flashpack.pack_to_file({"ab": torch.ones(2), "a": torch.zeros(1), "b": torch.zeros(1)}, path)
    assert list(flashpack.load(path, keys="ab")) == ["ab"]
