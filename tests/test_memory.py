"""Host load destinations (flashpack/loading/memory.py): alignment, huge pages on request, pre-faulting with
its fallback, the tensors owning the mapping, and loads identical whichever memory they land in."""

from __future__ import annotations

import errno
import gc
import os

import pytest
import torch

import flashpack
import flashpack.errors
import flashpack.settings
from flashpack.loading import memory
from flashpack.settings import MiB

HUGE = memory.HUGE_PAGE_NBYTES


@pytest.mark.parametrize("mode, kind_prefix", [("on", ("thp", "4k")), ("off", ("torch",))])
def test_host_buffer_size_alignment_and_kind(mode, kind_prefix):
    b = memory.host_buffer(16 * MiB + 4096, huge_pages=mode)
    t = b.tensor
    assert t.dtype == torch.uint8 and t.device.type == "cpu" and t.numel() == 16 * MiB + 4096
    assert t.data_ptr() % 4096 == 0 and b.kind.startswith(kind_prefix)
    if mode == "on":
        assert t.data_ptr() % HUGE == 0
    b.populate(0, t.numel())
    t.fill_(7)
    assert int(t.sum()) == 7 * t.numel()


def test_small_destinations_come_from_torch():
    b = memory.host_buffer(memory.MIN_MAPPED_NBYTES - 1, huge_pages="on")
    assert b.kind == "torch" and b.tensor.numel() == memory.MIN_MAPPED_NBYTES - 1


def test_auto_asks_for_huge_pages_only_when_free_blocks_cover_twice_the_load(monkeypatch):
    monkeypatch.setattr(memory, "reports_free_pages", lambda: False)
    monkeypatch.setattr(memory, "thp_enabled", lambda: True)
    monkeypatch.setattr(memory, "free_huge_nbytes", lambda: 2 * 8 * MiB - 1)
    assert memory.host_buffer(8 * MiB, huge_pages="auto").kind == "torch"
    monkeypatch.setattr(memory, "free_huge_nbytes", lambda: 2 * 8 * MiB)
    assert memory.host_buffer(8 * MiB, huge_pages="auto").kind in ("thp+populate", "4k+populate", "thp+touch", "4k+touch")


def test_auto_takes_no_huge_pages_where_free_memory_goes_back_to_the_hypervisor(monkeypatch):
    """On a VM whose balloon reports free pages, free 2 MiB blocks are the reported ones, slow on first touch."""
    monkeypatch.setattr(memory, "free_huge_nbytes", lambda: 1 << 40)
    monkeypatch.setattr(memory, "reports_free_pages", lambda: True)
    assert memory.host_buffer(8 * MiB, huge_pages="auto").kind == "torch"
    assert memory.host_buffer(8 * MiB, huge_pages="auto", fill=True, userfaultfd=False).kind == "torch"
    assert memory.host_buffer(8 * MiB, huge_pages="on").kind in ("thp+populate", "4k+populate", "thp+touch", "4k+touch")


def test_auto_takes_no_huge_pages_where_they_are_switched_off(monkeypatch, tmp_path):
    monkeypatch.setattr(memory, "reports_free_pages", lambda: False)
    monkeypatch.setattr(memory, "free_huge_nbytes", lambda: 1 << 40)
    real = memory.thp_enabled
    monkeypatch.setattr(memory, "thp_enabled", lambda: False)
    assert memory.host_buffer(8 * MiB, huge_pages="auto").kind == "torch"
    modes = tmp_path / "enabled"
    for text, want in (("always [madvise] never", True), ("[always] madvise never", True),
                       ("always madvise [never]", False)):
        modes.write_text(text + "\n")
        assert real(str(modes)) is want, text
    assert real(str(tmp_path / "missing")) is False


def test_huge_pages_of_a_load_from_the_page_cache_are_faulted_by_its_copies(monkeypatch):
    monkeypatch.setattr(memory, "reports_free_pages", lambda: False)
    monkeypatch.setattr(memory, "thp_enabled", lambda: True)
    monkeypatch.setattr(memory, "free_huge_nbytes", lambda: 1 << 40)
    for how in ({"huge_pages": "auto"}, {"huge_pages": "on"}, {"huge_pages": "on", "userfaultfd": False}):
        b = memory.host_buffer(8 * MiB, fill=True, **how)
        assert b.kind in ("thp+fault", "4k+fault") and b.region is None, how
        assert b.prefault is None and b.tensor.data_ptr() % HUGE == 0  # nothing pre-faulted: the reads fault it
    # without huge pages, the userfaultfd fill (where the kernel allows it) or torch's allocator
    assert memory.host_buffer(8 * MiB, huge_pages="off", fill=True, userfaultfd=False).kind == "torch"


def _balloon(root, features: str, order: str | None = "9"):
    dev = root / "bus" / "virtio" / "drivers" / "virtio_balloon" / "virtio3"
    dev.mkdir(parents=True)
    (dev / "features").write_text(features + "\n")
    if order is not None:
        params = root / "module" / "page_reporting" / "parameters"
        params.mkdir(parents=True)
        (params / "page_reporting_order").write_text(order + "\n")
    return str(root)


def test_free_page_reporting_read_from_the_balloons_feature_bits(tmp_path):
    buddy = tmp_path / "buddyinfo"
    #                order: 0  1  2  3  4  5  6  7  8  9  10
    buddy.write_text("Node 0, zone   Normal  9  9  9  9  9  9  9  9  9  3  2\n")
    # bit 5 (VIRTIO_BALLOON_F_REPORTING) of the features string, bit 0 first: what this VM's balloon offers
    on = _balloon(tmp_path / "on", "0110010100000000000000000000000010")
    assert memory.free_page_reporting(on, str(buddy)) == "virtio3"
    # the same device without bit 5 (stats and deflate-on-OOM only); no balloon at all
    assert memory.free_page_reporting(_balloon(tmp_path / "off", "0110000100000000"), str(buddy)) == ""
    assert memory.free_page_reporting(str(tmp_path / "bare"), str(buddy)) == ""
    # an order above the buddy allocator's largest (11 orders: 0-10) reports nothing: switched off
    assert memory.free_page_reporting(_balloon(tmp_path / "high", "000001", order="11"), str(buddy)) == ""
    assert memory.free_page_reporting(_balloon(tmp_path / "top", "000001", order="10"), str(buddy)) == "virtio3"
    # no order parameter (older kernels): the device's word
    assert memory.free_page_reporting(_balloon(tmp_path / "old", "000001", order=None), str(buddy)) == "virtio3"


def test_free_huge_nbytes_counts_blocks_of_2_mib_and_more(monkeypatch, tmp_path):
    fake = tmp_path / "buddyinfo"
    #               order: 0  1  2  3  4  5  6  7  8  9  10
    fake.write_text("Node 0, zone   Normal  9  9  9  9  9  9  9  9  9  3  2\n"
                    "Node 0, zone    DMA32  0  0  0  0  0  0  0  0  0  1  0\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: real_open(fake if p == "/proc/buddyinfo" else p, *a, **k))
    assert memory.free_huge_nbytes() == (3 + 1) * 2 * MiB + 2 * 4 * MiB


def test_populate_falls_back_to_touching_when_the_kernel_refuses(monkeypatch):
    monkeypatch.setattr(memory, "_populate_refused", False)
    real = memory._madvise
    monkeypatch.setattr(memory, "_madvise",
                        lambda a, n, adv: errno.EINVAL if adv == memory.MADV_POPULATE_WRITE else real(a, n, adv))
    b = memory.host_buffer(8 * MiB, huge_pages="on")
    b.populate(4096, 5 * MiB)
    assert b.kind.endswith("+touch")
    assert int(b.tensor[4096:4096 + 5 * MiB:4096].sum()) == 0  # touched pages read as zero


def test_the_tensors_own_the_mapping():
    b = memory.host_buffer(256 * MiB, huge_pages="on")
    view = b.tensor[MiB:2 * MiB]
    del b
    gc.collect()
    before = memory.resident_nbytes()
    view.fill_(1)  # still mapped through the view
    big = memory.host_buffer(256 * MiB, huge_pages="on")
    big.populate(0, 256 * MiB)
    assert memory.resident_nbytes() - before >= 200 * MiB
    grown = memory.resident_nbytes()
    del big
    gc.collect()
    assert grown - memory.resident_nbytes() >= 200 * MiB  # unmapped with its last tensor
    assert int(view.sum()) == MiB


@pytest.mark.parametrize("mode", ["on", "off", "auto"])
def test_loads_are_identical_in_any_memory(tmp_path, monkeypatch, backend, mode):
    monkeypatch.setenv("FLASHPACK_HUGE_PAGES", mode)
    monkeypatch.setenv("FLASHPACK_USERFAULTFD", "0")  # the kinds other than "uffd" (tests/test_uffd.py has that one)
    torch.manual_seed(0)
    sd = {"a": torch.randn(3 * MiB), "b": torch.arange(1000), "c": torch.randn(7, 5).bfloat16()}
    flashpack.pack_to_file(sd, tmp_path / "m.flashpack")
    stats = flashpack.LoadStats()
    out = flashpack.load(tmp_path / "m.flashpack", backend=backend, stats=stats)
    assert all(torch.equal(out[k], sd[k]) for k in sd)
    assert stats.memory in ("torch", "thp+populate", "thp+touch", "4k+populate", "4k+touch", "thp+fault", "4k+fault")
    if mode == "off":
        assert stats.memory == "torch"
    if mode == "on":  # a keep load (the small file fits the cache policy): the copies fault the huge pages in
        assert (stats.cache, stats.memory) in (("keep", "thp+fault"), ("keep", "4k+fault")), (stats.cache, stats.memory)
    out["a"].add_(1)  # private and writable
    assert torch.equal(out["a"], sd["a"] + 1)


def test_bad_setting_is_named(monkeypatch):
    monkeypatch.setenv("FLASHPACK_HUGE_PAGES", "maybe")
    with pytest.raises(flashpack.errors.SettingsError, match="FLASHPACK_HUGE_PAGES='maybe'"):
        flashpack.settings.settings()


def test_shared_buffer_sealed_and_mapped_copy_on_write():
    fd, b = memory.shared_buffer(3 * 4096 + 5, name="flashpack:test")
    try:
        assert (b.kind, b.nbytes, b.tensor.data_ptr() % 4096) == ("memfd", 3 * 4096 + 5, 0)
        b.tensor.copy_(torch.arange(3 * 4096 + 5) % 251)
        with pytest.raises(OSError) as busy:  # a writable shared mapping is alive: no write seal
            memory.seal_shared(fd)
        assert busy.value.errno == errno.EBUSY
        del b
        handle = memory.seal_shared(fd)
        assert (handle.pid, handle.fd, handle.nbytes) == (os.getpid(), fd, 3 * 4096 + 5)
        one, two = memory.map_shared(handle), memory.map_shared(handle)
        expect = torch.arange(3 * 4096 + 5) % 251
        assert torch.equal(one.long(), expect) and torch.equal(two.long(), expect)
        one[4096] = 7  # private: the other mapping and the memory file keep the old byte
        assert (int(one[4096]), int(two[4096]), int(memory.map_shared(handle)[4096])) == (7, 4096 % 251, 4096 % 251)
        with pytest.raises(OSError):  # sealed: the bytes can no longer be written through the descriptor
            os.pwrite(fd, b"x", 0)
    finally:
        os.close(fd)


def test_shared_buffer_of_4_mib_is_filled_with_uffdio_copy_then_sealed(tmp_path, monkeypatch):
    """A shared destination of >= 4 MiB is registered with a userfaultfd (kind "memfd+uffd"): a keep load given its
    region fills every shmem page with UFFDIO_COPY, releases it, and the memory file then seals and maps as one
    that was faulted in. Refused (a kernel without userfaultfd on shmem), it is plain "memfd", asked once."""
    from flashpack.io import uffd
    from flashpack.loading.common import assemble, prepare
    from flashpack.loading.host import read_into
    from flashpack.settings import settings
    from flashpack.source import read_pack_map

    if not uffd.probe()[0]:
        pytest.skip(f"userfaultfd refused here: {uffd.probe()[1]}")
    sd = {"w": torch.randn(1_200_000), "i": torch.arange(1001, dtype=torch.int16)}
    path = tmp_path / "m.flashpack"
    flashpack.pack_to_file(sd, path)
    cfg = settings()
    job = prepare(read_pack_map(str(path)), None, verify=True, cfg=cfg)
    fd, b = memory.shared_buffer(job.plan.buffer_nbytes, name="flashpack:test", userfaultfd=True)
    try:
        assert b.kind == "memfd+uffd" and b.region.mapping is None
        assert (b.region.address, b.region.nbytes) == (b.tensor.data_ptr(), -(-job.plan.buffer_nbytes // 4096) * 4096)
        st = flashpack.LoadStats()
        read_into(job.wm, job.plan, b.tensor, backend="threads", verify=True, stats=st, cfg=cfg, cache="keep",
                  fill=b.region)
        assert b.region.released and st.bytes_filled == st.bytes_read == job.plan.read_nbytes
        del b
        got = assemble(job, memory.map_shared(memory.seal_shared(fd)))
        assert all(torch.equal(got[k], v) for k, v in sd.items())
    finally:
        os.close(fd)
    refused = []

    def refuse(address, nbytes):
        refused.append(nbytes)
        raise OSError(refused_errno, os.strerror(refused_errno))

    monkeypatch.setattr(memory.FillRegion, "over", staticmethod(refuse))
    monkeypatch.setattr(memory, "_shared_fill_refused", "")
    for refused_errno, asked in ((errno.ENOMEM, 2), (errno.EPERM, 3)):  # a shortage is asked again; EPERM is kept
        for _ in range(2):
            fd, b = memory.shared_buffer(4 << 20, userfaultfd=True)
            assert (b.kind, b.region) == ("memfd", None)
            del b
            os.close(fd)
        assert len(refused) == asked
    assert memory._shared_fill_refused == "[Errno 1] Operation not permitted"
    monkeypatch.setattr(memory, "_shared_fill_refused", "")
    fd, b = memory.shared_buffer(4 << 20)  # not asked for (FLASHPACK_USERFAULTFD=0, or any other caller)
    assert (b.kind, b.region, len(refused)) == ("memfd", None, 3)
    del b
    os.close(fd)


def test_map_shared_refuses_what_is_not_the_sealed_memory():
    fd, b = memory.shared_buffer(4096)
    try:
        st = os.fstat(fd)
        unsealed = memory.SharedHandle(os.getpid(), fd, st.st_dev, st.st_ino, 4096)
        with pytest.raises(OSError) as e:
            memory.map_shared(unsealed)
        assert e.value.errno == errno.ESTALE and f"/proc/{os.getpid()}/fd/{fd} is not the sealed shared memory of 4096 bytes" in str(e.value)
        del b
        good = memory.seal_shared(fd)
        wrong = memory.SharedHandle(good.pid, good.fd, good.dev, good.ino + 1, good.nbytes)
        with pytest.raises(OSError) as e:
            memory.map_shared(wrong)
        assert e.value.errno == errno.ESTALE
    finally:
        os.close(fd)
    with pytest.raises(FileNotFoundError):  # the creator closed it (or is gone)
        memory.map_shared(good)


def test_shared_buffer_cuts_a_name_memfd_create_would_refuse():
    # memfd_create(2) takes at most 249 bytes of name: the distributed load names the memory after the file's
    # basename, which may be up to 255 bytes long (a 246-byte one failed the load with EINVAL on every rank)
    fd, b = memory.shared_buffer(4096, name="flashpack:" + "é" * 150)
    try:
        link = os.readlink(f"/proc/self/fd/{fd}")
        assert link.startswith("/memfd:flashpack:é") and b.kind == "memfd"
    finally:
        del b
        os.close(fd)
