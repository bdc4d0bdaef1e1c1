"""Each entry point reads and parses the weight map exactly once (issue: the layout; a from_pretrained_flashpack
used to parse it three times), and the settings once per load."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import flashpack
import flashpack.settings
import flashpack.source


@pytest.fixture
def counted(monkeypatch):
    """Counts of weight-map reads (``flashpack.source.read_weight_map_fd``) and of ``settings()`` calls."""
    calls = {"weight_map": 0, "settings": 0}
    real_fd, real_settings = flashpack.source.read_weight_map_fd, flashpack.settings.settings

    def fd(*a, **k):
        calls["weight_map"] += 1
        return real_fd(*a, **k)

    def cfg(*a, **k):
        calls["settings"] += 1
        return real_settings(*a, **k)

    monkeypatch.setattr(flashpack.source, "read_weight_map_fd", fd)
    import flashpack.deserialization as d

    monkeypatch.setattr(d, "settings", cfg)
    return calls


class Tiny(nn.Module, flashpack.FlashPackMixin):
    def __init__(self, n: int = 8):
        super().__init__()
        self.a = nn.Linear(n, n)
        self.b = nn.Linear(n, 2)


@pytest.fixture
def pack(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "m.flashpack"
    Tiny().save_flashpack(path)
    return path


def test_load_reads_the_weight_map_and_settings_once(pack, counted):
    flashpack.load(pack)
    assert counted == {"weight_map": 1, "settings": 1}


def test_load_of_a_weight_map_reads_nothing_more(pack, counted):
    wm = flashpack.read_weight_map(pack)
    sd = flashpack.load(wm, keys=["a.weight"])
    assert counted["weight_map"] == 1 and list(sd) == ["a.weight"]


def test_assign_from_file_reads_the_weight_map_once(pack, counted):
    with flashpack.init_empty_weights():
        m = Tiny()
    flashpack.assign_from_file(m, pack)
    assert counted == {"weight_map": 1, "settings": 1}
    assert m.a.weight.device.type == "cpu"


def test_from_flashpack_reads_the_weight_map_once(pack, counted):
    m = Tiny.from_flashpack(pack)
    assert counted["weight_map"] == 1 and not m.training


def test_from_pretrained_flashpack_reads_the_weight_map_once(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    from flashpack.integrations.transformers import FlashPackTransformersModelMixin

    class FlashPackGPT2(FlashPackTransformersModelMixin, transformers.GPT2LMHeadModel):
        pass

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16)
    FlashPackGPT2(cfg).save_pretrained_flashpack(tmp_path / "m")
    calls = []
    real = flashpack.source.read_weight_map_fd
    monkeypatch.setattr(flashpack.source, "read_weight_map_fd", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = FlashPackGPT2.from_pretrained_flashpack(tmp_path / "m")
    assert len(calls) == 1
    assert model.transformer.wte.weight is model.lm_head.weight  # tied, filled from the one read
