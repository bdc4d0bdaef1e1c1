"""The staging ring: a few page-aligned host slots (pinned for CUDA) that file bytes pass through on their
way to a device; the scheduler that drives it is :mod:`flashpack.staging.scheduler`.

A load cuts its plan into *pieces* of at most one slot (never splitting a checksum chunk), then:

1. takes a free slot (:meth:`StagingRing.try_acquire`) and submits the piece's reads into it;
2. when every read of the slot is in, hands the slot to a *sink* (``sink.copy(slot, nbytes, offset)``),
   which starts copying it out and returns a *fence*; the slot's checksum chunks are verified on the
   slot meanwhile;
3. gives the slot back with ``release(slot, fence)``; the ring hands it out again only once the fence
   has completed, so a slot is never refilled while a copy still reads it.

Reads into other slots go on all the while. The ring and the scheduler know nothing about CUDA: a fence
is any object with ``done() -> bool`` and ``wait()``; :mod:`flashpack.staging.sinks` has the CUDA
stream/event sink, :class:`flashpack.testing.HostCopySink` a host stand-in for tests. Pinning is an injected :class:`Pinner` (``cudaHostRegister``
for CUDA), so everything here runs, and is tested, on a machine without a GPU.
"""

from __future__ import annotations

import collections
import threading
import warnings
from dataclasses import dataclass
from typing import Protocol

import torch

from ..settings import PAGE_NBYTES

#: Most of the *available* host memory (psutil) one ring may take, pinned or not.
MEMORY_FRACTION = 0.25


class Fence(Protocol):
    """Completes when a copy out of a slot has finished reading it."""

    def done(self) -> bool: ...

    def wait(self) -> None: ...


class Pinner(Protocol):
    """Page-locks host memory for a device (``cudaHostRegister``); injected so the ring stays generic."""

    name: str

    def register(self, tensor: torch.Tensor) -> str | None:
        """Pin ``tensor``'s bytes; return ``None`` on success, else the reason it failed (never raise)."""

    def unregister(self, tensor: torch.Tensor) -> None: ...


class Sink(Protocol):
    """Where slot bytes go. ``copy`` starts copying ``slot.tensor[:nbytes]`` to destination byte
    ``dest_offset`` and returns a fence; ``drain`` blocks until every copy started so far has finished
    (raising the first copy error); ``close`` is idempotent."""

    def copy(self, slot: "Slot", nbytes: int, dest_offset: int) -> Fence: ...

    def drain(self) -> None: ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------- accounting

_lock = threading.Lock()
_pinned_now = 0
_pinned_peak = 0
_live_rings: set[int] = set()
_pool: list["_Block"] = []  # at most one pinned block kept between loads


def pinned_nbytes() -> tuple[int, int]:
    """``(current, peak)`` bytes of host memory pinned by flashpack rings in this process (pooled
    memory included). The peak is since the last :func:`reset_pinned_peak`."""
    with _lock:
        return _pinned_now, _pinned_peak


def reset_pinned_peak() -> None:
    global _pinned_peak
    with _lock:
        _pinned_peak = _pinned_now


def live_rings() -> int:
    """Rings created and not yet closed (0 once every load has returned or raised)."""
    with _lock:
        return len(_live_rings)


def _count_pinned(delta: int) -> None:
    global _pinned_now, _pinned_peak
    with _lock:
        _pinned_now += delta
        _pinned_peak = max(_pinned_peak, _pinned_now)


def release_pinned_memory() -> int:
    """Unpin and free the staging memory kept for reuse between loads; returns the bytes released.

    GPU loads keep the last ring's pinned memory (at most ``FLASHPACK_PINNED_CAP_NBYTES``) because
    pinning costs tens of milliseconds per 256 MiB; call this when no further loads are expected."""
    with _lock:
        blocks, _pool[:] = list(_pool), []
    for b in blocks:
        b.free()
    return sum(b.nbytes for b in blocks)


class _Block:
    """One page-aligned host allocation, pinned by ``pinner`` or pageable (``pinner is None``)."""

    def __init__(self, nbytes: int, pinner: Pinner | None):
        raw = torch.empty(nbytes + PAGE_NBYTES, dtype=torch.uint8)
        off = (-raw.data_ptr()) % PAGE_NBYTES
        self.tensor = raw[off:off + nbytes]
        self.nbytes = nbytes
        self.pinner: Pinner | None = None
        if pinner is not None:
            why = pinner.register(self.tensor)
            if why is not None:
                self.error = why
                return
            self.pinner = pinner
            _count_pinned(nbytes)
        self.error = None

    @property
    def pinned(self) -> bool:
        return self.pinner is not None

    def free(self) -> None:
        if self.pinner is not None:
            pinner, self.pinner = self.pinner, None
            try:
                pinner.unregister(self.tensor)
            finally:
                _count_pinned(-self.nbytes)


def _take_pooled(nbytes: int, pinner: Pinner) -> _Block | None:
    """The pooled block if it has exactly this size and pinner; any other pooled block is freed (so
    pinned memory never exceeds one ring's worth plus nothing)."""
    with _lock:
        blocks, _pool[:] = list(_pool), []
    hit = None
    for b in blocks:
        if hit is None and b.nbytes == nbytes and b.pinner is not None and b.pinner.name == pinner.name:
            hit = b
        else:
            b.free()
    return hit


def _give_back(block: _Block) -> None:
    with _lock:
        old, _pool[:] = list(_pool), [block]
    for b in old:
        b.free()


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class RingGeometry:
    """How many slots of how many bytes, pinned or not, and why it differs from what was asked."""

    num_slots: int
    slot_nbytes: int
    pin: bool
    notes: tuple[str, ...] = ()


def ring_geometry(*, num_slots: int, slot_nbytes: int, pin: bool, cap_nbytes: int,
                  available_nbytes: int) -> RingGeometry:
    """Fit ``num_slots`` x ``slot_nbytes`` into the memory budget (pure; no allocation).

    The ring never takes more than :data:`MEMORY_FRACTION` of ``available_nbytes`` (fewer slots, at
    least one), and pinned memory never exceeds ``cap_nbytes``: fewer pinned slots when at least one
    fits, else pageable slots. ``notes`` says what was reduced (empty when nothing was).
    """
    notes = []
    budget = int(available_nbytes * MEMORY_FRACTION)
    if num_slots * slot_nbytes > budget:
        fit = max(1, budget // slot_nbytes)
        if fit < num_slots:
            notes.append(f"{num_slots} slots of {slot_nbytes} bytes exceed {MEMORY_FRACTION:.0%} of the available "
                         f"host memory ({available_nbytes} bytes); using {fit}")
            num_slots = fit
    if pin:
        fit = cap_nbytes // slot_nbytes
        if fit == 0:
            notes.append(f"the pinned-memory cap FLASHPACK_PINNED_CAP_NBYTES={cap_nbytes} is below one slot "
                         f"({slot_nbytes} bytes); staging through pageable memory (slower copies)")
            pin = False
        elif fit < num_slots:
            notes.append(f"the pinned-memory cap FLASHPACK_PINNED_CAP_NBYTES={cap_nbytes} holds {fit} of "
                         f"{num_slots} slots of {slot_nbytes} bytes; using {fit}")
            num_slots = fit
    return RingGeometry(num_slots, slot_nbytes, pin, tuple(notes))


# --------------------------------------------------------------------------- the ring


class Slot:
    """One staging slot: ``tensor`` is a CPU uint8 tensor of ``nbytes`` (page-aligned address, a
    multiple of 4096 bytes), ``view`` a writable memoryview of it. ``generation`` counts how often
    the slot has been handed out (a copy can check that its slot was not handed out again meanwhile)."""

    __slots__ = ("index", "tensor", "view", "nbytes", "generation")

    def __init__(self, index: int, tensor: torch.Tensor):
        self.index = index
        self.tensor = tensor
        self.nbytes = tensor.numel()
        self.view = memoryview(tensor.numpy()).cast("B")
        self.generation = 0

    def __repr__(self) -> str:
        return f"Slot({self.index}, nbytes={self.nbytes}, generation={self.generation})"


class StagingRing:
    """``num_slots`` slots of ``slot_nbytes`` page-aligned host bytes in one allocation.

    Args:
        num_slots: slots wanted (reduced to fit the budget, see :func:`ring_geometry`).
        slot_nbytes: bytes per slot, a multiple of 4096.
        pinner: pins the memory for a device (``None``: pageable memory, no warning).
        cap_nbytes: most pinned bytes (``FLASHPACK_PINNED_CAP_NBYTES``).
        available_nbytes: host memory available (default ``psutil.virtual_memory().available``).
        keep_pinned: on close, keep pinned memory for the next ring of the same size
            (:func:`release_pinned_memory` frees it).

    When pinning is capped or refused (RLIMIT_MEMLOCK, WSL2, containers), the ring has fewer slots or
    pageable memory, and says so in one ``RuntimeWarning``.

    Ownership: a slot taken with :meth:`try_acquire`/:meth:`acquire` is the caller's until it goes back
    through exactly one :meth:`release` call, with the fence of the copy reading it; the ring hands it
    out again only after that fence is done. Not thread-safe: one thread (the scheduler) drives it;
    fences may complete on any thread. A context manager; :meth:`close` is idempotent.
    """

    def __init__(self, num_slots: int, slot_nbytes: int, *, pinner: Pinner | None = None,
                 cap_nbytes: int = 1 << 30, available_nbytes: int | None = None, keep_pinned: bool = True):
        if num_slots < 1 or slot_nbytes < PAGE_NBYTES or slot_nbytes % PAGE_NBYTES:
            raise ValueError(f"a ring needs >= 1 slot of a positive multiple of {PAGE_NBYTES} bytes, "
                             f"got {num_slots} x {slot_nbytes}")
        if available_nbytes is None:
            import psutil

            available_nbytes = psutil.virtual_memory().available
        geo = ring_geometry(num_slots=num_slots, slot_nbytes=slot_nbytes, pin=pinner is not None,
                            cap_nbytes=cap_nbytes, available_nbytes=available_nbytes)
        notes = list(geo.notes)
        n = geo.num_slots
        block = None
        if geo.pin:
            assert pinner is not None
            block = _take_pooled(n * slot_nbytes, pinner)
            while block is None:
                block = _Block(n * slot_nbytes, pinner)
                if block.error is None:
                    break
                why, block = block.error, None
                if n == 1:
                    notes.append(f"pinning {slot_nbytes} bytes failed ({why}); staging through pageable memory "
                                 f"(slower copies); raise `ulimit -l` or lower FLASHPACK_SLOT_NBYTES")
                    break
                notes.append(f"pinning {n} slots ({n * slot_nbytes} bytes) failed ({why}); trying {n // 2}")
                n //= 2
        if block is None:
            block = _Block(n * slot_nbytes, None)
        if notes:
            warnings.warn("flashpack staging ring: " + "; ".join(notes), RuntimeWarning, stacklevel=3)
        self.notes = tuple(notes)
        self._block = block
        self._keep = keep_pinned
        self.slot_nbytes = slot_nbytes
        self.slots = [Slot(i, block.tensor[i * slot_nbytes:(i + 1) * slot_nbytes]) for i in range(n)]
        #: Free slots with the fence of their last copy, oldest first.
        self._free: collections.deque[tuple[Slot, Fence | None]] = collections.deque((s, None) for s in self.slots)
        self._out: set[int] = set()
        self.acquires = 0
        self._closed = False
        with _lock:
            _live_rings.add(id(self))

    @property
    def num_slots(self) -> int:
        return len(self.slots)

    @property
    def pinned(self) -> bool:
        return self._block.pinned

    @property
    def nbytes(self) -> int:
        return self._block.nbytes

    @property
    def checked_out(self) -> int:
        """Slots handed out and not yet released."""
        return len(self._out)

    @property
    def fenced(self) -> int:
        """Free slots whose last copy may still be running."""
        return sum(1 for _, f in self._free if f is not None)

    def _hand_out(self, i: int) -> Slot:
        slot, _ = self._free[i]
        del self._free[i]
        self._out.add(slot.index)
        slot.generation += 1
        self.acquires += 1
        return slot

    def try_acquire(self) -> Slot | None:
        """A free slot whose last copy has completed, or ``None`` at once if there is none."""
        self._check_open()
        for i, (_, fence) in enumerate(self._free):
            if fence is None or fence.done():
                return self._hand_out(i)
        return None

    def acquire(self) -> Slot:
        """A free slot, waiting for the oldest pending copy if every free slot is still being copied.

        Raises:
            RuntimeError: every slot is checked out (none can come back without a release).
        """
        self.wait_free()
        slot = self.try_acquire()
        assert slot is not None
        return slot

    def wait_free(self) -> None:
        """Block until :meth:`try_acquire` would return a slot (waits on the oldest pending copy).

        Raises:
            RuntimeError: every slot is checked out.
        """
        if any(f is None or f.done() for _, f in self._free):
            return
        if not self._free:
            raise RuntimeError(f"all {self.num_slots} staging slots are checked out; release one first")
        fence = self._free[0][1]
        assert fence is not None
        fence.wait()

    def is_out(self, slot: Slot) -> bool:
        """Whether ``slot`` is checked out (handed out and not released)."""
        return slot.index in self._out and self.slots[slot.index] is slot

    def release(self, slot: Slot, fence: Fence | None = None) -> None:
        """Give ``slot`` back; it is handed out again only after ``fence`` is done (``None``: no copy
        reads it). The single way a slot returns.

        Raises:
            ValueError: the slot is not checked out from this ring (a double release).
        """
        if not self.is_out(slot):
            raise ValueError(f"{slot!r} is not checked out from this ring (released twice?)")
        self._out.discard(slot.index)
        self._free.append((slot, fence))

    def drain(self) -> None:
        """Wait for every fence of the free slots (every copy out of the ring has finished)."""
        for i, (slot, fence) in enumerate(self._free):
            if fence is not None:
                fence.wait()
                self._free[i] = (slot, None)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the staging ring is closed")

    def close(self) -> None:
        """Wait for pending copies, then free (or pool) the memory; idempotent.

        Raises:
            RuntimeError: slots are still checked out (their memory is then not reused: it stays
                alive through the slots' tensors, unpinned only when ``keep_pinned`` is off).
        """
        if self._closed:
            return
        self._closed = True
        with _lock:
            _live_rings.discard(id(self))
        try:
            self.drain()
        finally:
            leaked = sorted(self._out)
            if self._block.pinned and self._keep and not leaked:
                _give_back(self._block)
            elif not leaked:
                self._block.free()
        if leaked:
            raise RuntimeError(f"staging ring closed with slots {leaked} still checked out")

    def __enter__(self) -> "StagingRing":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["Fence", "MEMORY_FRACTION", "Pinner", "RingGeometry", "Sink", "Slot", "StagingRing", "live_rings",
           "pinned_nbytes", "release_pinned_memory", "reset_pinned_peak", "ring_geometry"]
