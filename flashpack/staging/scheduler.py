"""The staging scheduler: cuts a load plan into slot-sized *pieces* and streams them from a reader through
a :class:`~flashpack.staging.ring.StagingRing` into a sink, keeping reads, copies and checksum work overlapping.

1. takes a free slot (:meth:`StagingRing.try_acquire`) and submits the piece's reads into it;
2. when every read of the slot is in, hands the slot to the sink (``sink.copy(slot, nbytes, offset)``),
   which starts copying it out and returns a *fence*; the slot's checksum chunks are verified on the
   slot meanwhile;
3. gives the slot back with ``release(slot, fence)``; the ring hands it out again only once the fence
   has completed, so a slot is never refilled while a copy still reads it.
"""

from __future__ import annotations

import bisect
import collections
import os
from dataclasses import dataclass
from typing import Sequence

from ..format import WeightMap, verify_chunk
from ..io import Extent, Reader
from ..io.sync import Gate, run_to_end
from ..io.threads import named_pool, wait_all
from ..plan import LoadPlan, round_up
from ..settings import PAGE_NBYTES
from .ring import Sink, Slot, StagingRing

#: How often the scheduler looks at copy fences while it also waits for reads, in seconds.
POLL_S = 0.001


# --------------------------------------------------------------------------- pieces


@dataclass(frozen=True)
class Piece:
    """What one slot carries: file bytes ``[file_offset, file_offset + nbytes)`` (clipped at EOF) that
    land at ``buffer_offset`` of the destination; ``span_nbytes`` (<= slot) is the plan bytes it covers;
    ``chunks`` are the plan's checksum chunks lying wholly inside it."""

    file_offset: int
    nbytes: int
    span_nbytes: int
    buffer_offset: int
    chunks: tuple[int, ...]


def cut_pieces(plan: LoadPlan, slot_nbytes: int, file_nbytes: int) -> list[Piece]:
    """Cut the plan's regions into pieces of at most ``slot_nbytes``, at page boundaries, never inside
    a checksum chunk (so every chunk is verified on one slot).

    Raises:
        ValueError: a checksum chunk is larger than a slot (see :func:`min_slot_nbytes`).
    """
    order = sorted(range(len(plan.chunks)), key=lambda i: plan.chunks[i].offset)
    starts = [plan.chunks[i].offset for i in order]
    out: list[Piece] = []
    for r in plan.regions:
        lo, hi = r.file_offset, r.file_offset + r.nbytes
        pos = lo
        while pos < hi:
            end = min(pos + slot_nbytes, hi)
            j = bisect.bisect_right(starts, end - 1) - 1
            if end < hi and j >= 0:
                c = plan.chunks[order[j]]
                if c.offset + c.nbytes > end:  # the cut would split chunk c: cut before it
                    if c.offset <= pos:
                        raise ValueError(f"checksum chunk of {c.nbytes} bytes at {c.offset} does not fit in a "
                                         f"{slot_nbytes}-byte slot")
                    end = c.offset
            a, b = bisect.bisect_left(starts, pos), bisect.bisect_left(starts, end)
            ids = tuple(order[a:b])
            if any(plan.chunks[i].offset + plan.chunks[i].nbytes > end for i in ids):  # pragma: no cover
                raise ValueError(f"checksum chunk crosses the piece boundary at {end}")
            read_end = min(end, file_nbytes)
            if read_end > pos:
                out.append(Piece(pos, read_end - pos, end - pos, r.buffer_offset + pos - lo, ids))
            pos = end
    return out


def min_slot_nbytes(plan: LoadPlan) -> int:
    """The smallest slot that holds every checksum chunk of the plan (4096 when there are none)."""
    return max([PAGE_NBYTES] + [round_up(c.nbytes) for c in plan.chunks])


# --------------------------------------------------------------------------- the scheduler


class _Fill:
    __slots__ = ("slot", "piece", "left")

    def __init__(self, slot: Slot, piece: Piece, left: int):
        self.slot, self.piece, self.left = slot, piece, left


def _read_extents(piece: Piece, slot: Slot, read_nbytes: int) -> list[Extent]:
    """The piece as reads of at most ``read_nbytes`` into the slot, tagged with the slot's index."""
    out = []
    for o in range(0, piece.nbytes, read_nbytes):
        n = min(read_nbytes, piece.nbytes - o)
        out.append(Extent(piece.file_offset + o, n, slot.view[o:o + n], slot.index))
    return out


def run_staged(reader: Reader, wm: WeightMap, plan: LoadPlan, pieces: Sequence[Piece], ring: StagingRing, sink: Sink,
               *, verify: bool, read_nbytes: int, hash_threads: int = 0) -> int:
    """Stream ``pieces`` from ``reader`` through ``ring`` into ``sink``; returns the chunks verified.

    Args:
        reader: an open reader of ``wm.path``; left open on success, closed (drained) on failure.
        wm, plan: the weight map and the plan the pieces were cut from (checksum chunks).
        pieces: from :func:`cut_pieces` with ``ring.slot_nbytes``.
        ring, sink: the staging ring and where slot bytes go; the sink is drained, not closed.
        verify: check each piece's checksum chunks on the slot while its copy runs.
        read_nbytes: most bytes per read request (a multiple of 4096); a slot takes several.
        hash_threads: threads hashing the chunks of one slot in parallel (0 or 1: in this thread).

    Raises:
        The first error (a read error, ChecksumMismatchError, a copy error), or KeyboardInterrupt, only
        after every submitted read and every started copy has finished and every slot is back in the
        ring; no thread started here is left running.
    """
    queue = collections.deque(pieces)
    filling: dict[int, _Fill] = {}
    error: BaseException | None = None
    verified = 0
    # the process's kept hashing pool (flashpack.io.threads.named_pool): interrupt-safe waits, no thread per load
    pool = named_pool("verify", hash_threads) if hash_threads > 1 else None
    checking: list = []  # the slot's checks in flight: waited for before this returns, whatever interrupted it
    gate = Gate()  # and any a KeyboardInterrupt kept out of `checking`

    def check(ci: int, slot: Slot, piece: Piece) -> None:
        c = plan.chunks[ci]
        so = c.offset - piece.file_offset
        verify_chunk(wm, c, slot.view[so:so + c.nbytes])

    check_task = gate.wrap(check)  # for the pool: skipped once the gate closed

    try:
        while True:
            while error is None and queue:
                slot = ring.try_acquire()
                if slot is None:
                    break
                piece = queue.popleft()
                exts = _read_extents(piece, slot, read_nbytes)
                filling[slot.index] = _Fill(slot, piece, len(exts))
                reader.submit(exts)
            if not filling:
                if error is not None or not queue:
                    break
                ring.wait_free()
                continue
            timeout = POLL_S if (queue and error is None and ring.fenced) else None
            for c in reader.wait(timeout):
                fill = filling[c.extent.tag]
                fill.left -= 1
                if c.error is not None:
                    error = error or c.error
                if fill.left:
                    continue
                if error is not None:
                    del filling[fill.slot.index]
                    ring.release(fill.slot, None)
                    continue
                fence = sink.copy(fill.slot, fill.piece.nbytes, fill.piece.buffer_offset)
                try:
                    if verify and fill.piece.chunks:
                        ids = fill.piece.chunks
                        if pool is not None and len(ids) > 1:
                            # every check ends before the slot goes back to the ring, the failed ones included
                            checking[:] = [pool.submit(check_task, ci, fill.slot, fill.piece) for ci in ids]
                            failed = wait_all(checking)
                            if failed is not None:
                                raise failed
                        else:
                            for ci in ids:
                                check(ci, fill.slot, fill.piece)
                        verified += len(ids)
                except Exception as e:  # noqa: BLE001 - raised after draining
                    error = e
                finally:
                    run_to_end(lambda: wait_all(checking))  # an interrupt in the wait above: checks still read it
                    ring.release(fill.slot, fence)
                    del filling[fill.slot.index]
            if error is not None:
                reader.cancel_pending()
    except BaseException as e:  # KeyboardInterrupt, or a failure of the sink or the reader itself
        if error is None or isinstance(e, KeyboardInterrupt):
            error = e
    finally:
        if error is not None:
            run_to_end(reader.close)  # drains every submitted read
        run_to_end(lambda: wait_all(checking))  # no hash task reads a slot once the ring may be freed
        run_to_end(gate.close)
        try:
            sink.drain()
        except BaseException as e:  # noqa: BLE001
            error = error or e
        for fill in filling.values():  # reads drained, copies done: nothing touches these slots
            if ring.is_out(fill.slot):
                ring.release(fill.slot, None)
        filling.clear()
    if error is not None:
        raise error
    return verified



def default_hash_threads() -> int:
    """Threads hashing the checksum chunks of one slot: half the cores, at most 8."""
    return max(1, min(8, (os.cpu_count() or 1) // 2))


__all__ = ["Piece", "cut_pieces", "default_hash_threads", "min_slot_nbytes", "run_staged"]
