"""The pack read while the model is built (``EarlyLoad``): ``from_flashpack`` and ``from_pretrained_flashpack`` start
the load before the skeleton exists, hand it to ``assign_from_file(early=)``, and never leave a read behind when the
build or the match fails."""

from __future__ import annotations

import _thread
import contextlib
import os
import threading

import pytest
import torch
from torch import nn

import flashpack
import flashpack.deserialization as deser
from flashpack import FlashPackMixin, ModelMismatchError, read_weight_map
from flashpack.deserialization import EarlyLoad, start_early_load

from _helpers import flip_byte, open_fds


class Net(nn.Module, FlashPackMixin):
    def __init__(self, n: int = 64, extra: bool = False, hook=None):
        super().__init__()
        if hook is not None:
            hook()
        self.a = nn.Linear(n, n)
        self.b = nn.Linear(n, n, bias=False)
        if extra:
            self.c = nn.Linear(n, 2)


_STARTED: list[EarlyLoad] = []


@pytest.fixture(autouse=True)
def started(monkeypatch):
    """Every ``EarlyLoad`` started during the test (``start_early_load`` creates them through the module name)."""
    _STARTED.clear()

    class Recorded(EarlyLoad):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            _STARTED.append(self)

    monkeypatch.setattr(deser, "EarlyLoad", Recorded)
    return _STARTED


def early_threads() -> list[str]:
    """One name per early load whose thread still runs (started with ``_thread``: not in ``threading.enumerate``)."""
    return ["flashpack-early-load" for e in _STARTED if e.running()]


def thread_label() -> str:
    """``MainThread``, or ``flashpack-early-load`` on another thread (the early load's ``_thread`` thread has no
    ``threading`` name; asking ``threading.current_thread()`` there would register a dummy thread)."""
    return "MainThread" if _thread.get_ident() == threading.main_thread().ident else "flashpack-early-load"


@pytest.fixture
def loads(monkeypatch):
    """Every ``flashpack.deserialization.load`` call: (thread label, keys asked for, outcome)."""
    calls = []
    real = deser.load

    def spy(path, **kw):
        entry = [thread_label(), kw.get("keys"), None]
        calls.append(entry)
        try:
            out = real(path, **kw)
        except BaseException as e:
            entry[2] = type(e).__name__
            raise
        entry[2] = "ok"
        return out

    monkeypatch.setattr(deser, "load", spy)
    return calls


def test_from_flashpack_loads_on_the_early_thread_while_building(tmp_path, loads, backend, monkeypatch):
    src = Net(64)
    path = tmp_path / "net.flashpack"
    src.save_flashpack(path)
    seen_during_build = []
    # the read is held at its start until __init__ has looked, so the check does not depend on how fast a 33 KiB
    # read is (CI once saw it finish before __init__ ran)
    gate = threading.Event()
    spy = deser.load

    def held(path, **kw):
        assert gate.wait(timeout=30), "__init__ never ran while the early load waited"
        return spy(path, **kw)

    monkeypatch.setattr(deser, "load", held)

    def hook():
        seen_during_build.append(early_threads())
        gate.set()

    m = Net.from_flashpack(path, 64, hook=hook, backend=backend)
    assert seen_during_build == [["flashpack-early-load"]]  # the read was running while __init__ ran
    assert [(name, outcome) for name, _, outcome in loads] == [("flashpack-early-load", "ok")]  # loaded once
    for k, v in src.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
    assert m.a.weight.device.type == "cpu" and isinstance(m.a.weight, nn.Parameter) and not m.training
    assert early_threads() == []


def test_build_failure_cancels_the_early_load(tmp_path, loads):
    path = tmp_path / "net.flashpack"
    Net(64).save_flashpack(path)
    fds = open_fds()

    def boom():
        raise RuntimeError("constructor failed")

    with pytest.raises(RuntimeError, match="constructor failed"):
        Net.from_flashpack(path, 64, hook=boom)
    assert early_threads() == []  # joined before the error propagated
    assert len(loads) == 1 and loads[0][2] in ("ok", "_Cancelled")  # finished, or stopped at an extent
    assert open_fds() == fds


def test_mismatch_after_the_build_cancels_the_early_load(tmp_path, loads):
    path = tmp_path / "net.flashpack"
    Net(64).save_flashpack(path)
    with pytest.raises(ModelMismatchError, match="missing keys"):
        Net.from_flashpack(path, 64, extra=True)  # c.weight, c.bias are not in the pack
    assert early_threads() == [] and len(loads) == 1


def test_unexpected_keys_fall_back_to_loading_only_the_assigned_keys(tmp_path, loads):
    src = Net(64, extra=True)
    path = tmp_path / "net.flashpack"
    src.save_flashpack(path)
    with pytest.warns(UserWarning, match="unexpected keys"):
        m = Net.from_flashpack(path, 64, strict=False)
    # the early load held c.* too: cancelled (or dropped), then only the model's keys loaded, so no tensor
    # of the result shares memory with bytes nobody asked for
    assert [name for name, _, _ in loads] == ["flashpack-early-load", "MainThread"]
    assert sorted(loads[1][1]) == ["a.bias", "a.weight", "b.weight"]
    for k in ("a.weight", "a.bias", "b.weight"):
        assert torch.equal(m.state_dict()[k], src.state_dict()[k]), k


def test_ignored_keys_are_not_read_early(tmp_path, loads):
    src = Net(64)
    path = tmp_path / "net.flashpack"
    src.save_flashpack(path)
    m = Net.from_flashpack(path, 64, ignore_prefixes=["b."])
    assert len(loads) == 1 and sorted(loads[0][1]) == ["a.bias", "a.weight"]
    assert m.b.weight.is_meta and torch.equal(m.a.weight, src.a.weight)


def test_damaged_pack_raises_from_the_early_load(tmp_path, loads):
    path = tmp_path / "net.flashpack"
    Net(64).save_flashpack(path)
    flip_byte(path, read_weight_map(path).tensors["b.weight"].offset + 5)
    with pytest.raises(flashpack.ChecksumMismatchError, match="b.weight"):
        Net.from_flashpack(path, 64)
    assert loads == [["flashpack-early-load", loads[0][1], "ChecksumMismatchError"]]
    assert early_threads() == []


@pytest.mark.parametrize("options", [dict(mmap=True), dict(use_distributed_loading=True),
                                     dict(process_group="default"), dict(ignore_prefixes=["a.", "b."])],
                         ids=["mmap", "distributed", "group", "everything-ignored"])
def test_no_early_load_where_it_cannot_start_before_the_model(tmp_path, options):
    path = tmp_path / "net.flashpack"
    Net(8).save_flashpack(path)
    cm = start_early_load(read_weight_map(path), "cpu", strict=True, **options)
    assert isinstance(cm, contextlib.nullcontext)
    with cm as early:
        assert early is None


def test_no_early_load_to_a_cuda_device(tmp_path):
    path = tmp_path / "net.flashpack"
    Net(8).save_flashpack(path)
    assert isinstance(start_early_load(read_weight_map(path), torch.device("cuda", 0)), contextlib.nullcontext)


def test_early_load_take_renames_and_orders(tmp_path):
    src = Net(8)
    path = tmp_path / "net.flashpack"
    src.save_flashpack(path)
    wm = read_weight_map(path)
    with start_early_load(wm, "cpu") as early:
        assert isinstance(early, EarlyLoad)
        early.rename({"a.weight": "x.weight"})
        sd = early.take(["b.weight", "x.weight", "a.bias"])
    assert list(sd) == ["b.weight", "x.weight", "a.bias"]
    assert torch.equal(sd["x.weight"], src.a.weight) and torch.equal(sd["b.weight"], src.b.weight)


def test_early_load_take_of_other_keys_cancels(tmp_path):
    path = tmp_path / "net.flashpack"
    Net(8).save_flashpack(path)
    with start_early_load(read_weight_map(path), "cpu") as early:
        assert early.take(["a.weight"]) is None  # a subset: the caller loads it itself
        assert not early.running()
    assert early_threads() == []


def test_a_raising_progress_callback_stops_the_load_cleanly(tmp_path, backend, monkeypatch):
    """What ``EarlyLoad.cancel`` relies on: an exception from ``progress`` ends the load at a finished extent, with
    every read finished, no descriptor left open and the userfaultfd region (if any) released."""
    monkeypatch.setenv("FLASHPACK_EXTENT_NBYTES", "1M")
    sd = {f"t{i}": torch.full((256, 1024), float(i)) for i in range(48)}  # 48 MiB of float32
    path = tmp_path / "big.flashpack"
    flashpack.pack_to_file(sd, path)
    fds = open_fds()
    seen = []

    class Stop(Exception):
        pass

    def progress(done, total):
        seen.append((done, total))
        if done > 0:
            raise Stop()

    with pytest.raises(Stop):
        flashpack.load(path, backend=backend, cache="keep", progress=progress)
    assert seen[-1][0] < seen[-1][1]  # stopped before the end
    assert open_fds() == fds
    again = flashpack.load(path, backend=backend, cache="keep")  # nothing left registered or half-open
    assert all(torch.equal(again[k], v) for k, v in sd.items())


def test_take_after_cancel_or_a_second_take_returns_none(tmp_path):
    """A second ``take`` (or one after ``cancel``) hands nothing out instead of failing: the caller loads itself."""
    path = tmp_path / "net.flashpack"
    Net(8).save_flashpack(path)
    wm = read_weight_map(path)
    with start_early_load(wm, "cpu") as early:
        first = early.take(wm.keys())
        assert first is not None and list(first) == wm.keys()
        assert early.take(wm.keys()) is None
    with start_early_load(wm, "cpu") as early:
        early.cancel()
        assert early.take(wm.keys()) is None
    assert early_threads() == []


def test_early_load_of_another_file_or_option_is_not_used(tmp_path, loads):
    """``assign_from_file(early=)`` takes the early result only when it read the same files with the same
    ``verify``/``backend``: an early load of another pack with the same keys, or without verification, is
    cancelled and the model gets the bytes of the pack it named."""
    a, b = Net(8), Net(8)
    pa, pb = tmp_path / "a.flashpack", tmp_path / "b.flashpack"
    a.save_flashpack(pa)
    b.save_flashpack(pb)
    wa, wb = read_weight_map(pa), read_weight_map(pb)
    with start_early_load(wa, "cpu") as early:
        assert early.serves(wa) and not early.serves(wb) and not early.serves(wa, verify=False)
        m = Net(8).to("meta")
        flashpack.assign_from_file(m, wb, "cpu", early=early)
    for k, v in b.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
    assert [name for name, _, _ in loads] == ["flashpack-early-load", "MainThread"] and loads[1][2] == "ok"
    loads.clear()
    with start_early_load(wa, "cpu") as early:
        m = Net(8).to("meta")
        flashpack.assign_from_file(m, wa, "cpu", verify=False, early=early)
    assert [name for name, _, _ in loads] == ["flashpack-early-load", "MainThread"]
    for k, v in a.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
    assert early_threads() == []


def test_early_load_survives_the_pack_being_replaced_before_assign(tmp_path, loads):
    """The pack replaced (a new file at the same path) between the early start and the assign: the map read
    again names other file identity, so the early result of the old file is not used."""
    path = tmp_path / "net.flashpack"
    Net(8).save_flashpack(path)
    old = read_weight_map(path)
    new_src = Net(8)
    with start_early_load(old, "cpu") as early:
        new_src.save_flashpack(path)  # atomic replace: a new inode
        new = read_weight_map(path)
        assert not early.serves(new)
        m = Net(8).to("meta")
        flashpack.assign_from_file(m, new, "cpu", early=early)
    for k, v in new_src.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k


def test_early_load_of_a_pack_rewritten_in_place_with_its_mtime_set_back_is_not_used(tmp_path, loads):
    """``cp -p`` of a same-size pack over the file (same inode, size and mtime; found by a reviewer): the ctime in
    the file identity differs, so the early result of the old bytes is not used and the model gets the new ones."""
    path, other = tmp_path / "net.flashpack", tmp_path / "other.flashpack"
    Net(8).save_flashpack(path)
    new_src = Net(8)
    new_src.save_flashpack(other)
    assert os.path.getsize(other) == os.path.getsize(path)
    old = read_weight_map(path)
    before = os.stat(path)
    with start_early_load(old, "cpu") as early:
        early.wait()  # the old bytes are loaded before the rewrite
        with open(path, "r+b") as f:
            f.write(other.read_bytes())
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        new = read_weight_map(path)
        assert (os.stat(path).st_ino, os.stat(path).st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
        assert not early.serves(new)
        m = Net(8).to("meta")
        flashpack.assign_from_file(m, new, "cpu", early=early)
    for k, v in new_src.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
    assert early_threads() == []
