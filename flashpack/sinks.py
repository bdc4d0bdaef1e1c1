"""Where staging-slot bytes go: a host "copy engine" (worker threads and events, for tests and CPU
smoke runs) and a CUDA sink (a small pool of streams and events). Both implement the
:class:`flashpack.ring.Sink` protocol: ``copy(slot, nbytes, dest_offset) -> fence``, ``drain()``,
``close()``; a fence has ``done()`` and ``wait()``.
"""

from __future__ import annotations

import ctypes
import queue
import random
import threading
import time

import torch

from .ring import Slot

# --------------------------------------------------------------------------- host copy engine


class HostFence:
    """Completes when a :class:`HostCopySink` worker has copied a slot out (or failed to)."""

    __slots__ = ("_event", "error")

    def __init__(self):
        self._event = threading.Event()
        self.error: BaseException | None = None

    def done(self) -> bool:
        return self._event.is_set()

    def wait(self) -> None:
        self._event.wait()

    def _complete(self, error: BaseException | None = None) -> None:
        self.error = error
        self._event.set()


class HostCopySink:
    """A stand-in for CUDA streams: ``num_workers`` threads copy slots into ``dest`` (CPU uint8), each
    after a random delay of up to ``max_delay_s`` seconds, and complete a fence. With several workers,
    copies finish out of order, like copies on several streams.

    It also checks the ring's contract: a copy records its slot's ``generation`` when it is started and
    checks it again after copying; a slot handed out again before its copy finished is recorded in
    :attr:`violations` (must stay empty).

    Args:
        dest: destination, a contiguous CPU uint8 tensor.
        num_workers: copy threads ("streams").
        max_delay_s: most random delay before each copy, in seconds.
        seed: seeds the delays.

    Thread-safety: ``copy``/``drain``/``close`` from one thread. ``close`` joins the workers; idempotent.
    """

    def __init__(self, dest: torch.Tensor, *, num_workers: int = 2, max_delay_s: float = 0.0, seed: int | None = None):
        if dest.device.type != "cpu" or dest.dtype != torch.uint8 or not dest.is_contiguous():
            raise ValueError("HostCopySink needs a contiguous CPU uint8 destination")
        self.dest = dest
        self.max_delay_s = max_delay_s
        self._rng = random.Random(seed)
        self._queues: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in range(max(1, num_workers))]
        self._next = 0
        self._fences: list[HostFence] = []
        self.copies = 0
        self.violations: list[str] = []
        self._threads = [threading.Thread(target=self._work, args=(q,), name=f"flashpack-copy-{i}", daemon=True)
                         for i, q in enumerate(self._queues)]
        for t in self._threads:
            t.start()
        self._closed = False

    def _work(self, q: queue.SimpleQueue) -> None:
        while True:
            job = q.get()
            if job is None:
                return
            slot, generation, nbytes, dest_offset, delay_s, fence = job
            try:
                if delay_s:
                    time.sleep(delay_s)
                self.dest[dest_offset:dest_offset + nbytes].copy_(slot.tensor[:nbytes])
                if slot.generation != generation:
                    self.violations.append(f"{slot!r} was handed out again while its copy ran")
                fence._complete()
            except BaseException as e:  # noqa: BLE001 - reported through the fence and drain()
                fence._complete(e)

    def copy(self, slot: Slot, nbytes: int, dest_offset: int) -> HostFence:
        """Queue a copy of ``slot.tensor[:nbytes]`` to ``dest[dest_offset:]``; returns its fence.

        Raises:
            ValueError: the copy would fall outside ``dest``.
        """
        if dest_offset < 0 or dest_offset + nbytes > self.dest.numel() or nbytes > slot.nbytes:
            raise ValueError(f"copy of {nbytes} bytes to offset {dest_offset} is outside the "
                             f"{self.dest.numel()}-byte destination or the slot")
        fence = HostFence()
        delay = self._rng.uniform(0, self.max_delay_s) if self.max_delay_s else 0.0
        self._fences.append(fence)
        self._queues[self._next].put((slot, slot.generation, nbytes, dest_offset, delay, fence))
        self._next = (self._next + 1) % len(self._queues)
        self.copies += 1
        return fence

    def drain(self) -> None:
        """Wait for every copy queued so far.

        Raises:
            The first copy error, after all copies have finished.
        """
        fences, self._fences = self._fences, []
        for f in fences:
            f.wait()
        for f in fences:
            if f.error is not None:
                raise f.error

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.drain()
        finally:
            for q in self._queues:
                q.put(None)
            for t in self._threads:
                t.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- CUDA


def _clear_cuda_error() -> None:
    """Reset the CUDA runtime's last-error state after a handled failure (``cudaHostRegister``
    refused), so a later kernel-launch check in torch does not report it. Best effort: it needs the
    process's libcudart, which torch loads dynamically."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libcudart" in line and "/" in line}
        for p in paths:
            ctypes.CDLL(p).cudaGetLastError()
    except Exception:  # noqa: BLE001 - best effort
        pass


class CudaPinner:
    """Page-locks ring memory with ``cudaHostRegister`` (portable: pinned for every device).

    Registering our own page-aligned allocation, rather than ``torch.empty(pin_memory=True)``, pins
    exactly the ring's bytes (torch's host caching allocator rounds up to a power of two and keeps
    blocks), and a refusal (RLIMIT_MEMLOCK, WSL2) is a return code, not an exception."""

    name = "cuda"

    def register(self, tensor: torch.Tensor) -> str | None:
        if tensor.numel() == 0:
            return "nothing to pin"
        try:
            cudart = torch.cuda.cudart()
            rc = int(cudart.cudaHostRegister(tensor.data_ptr(), tensor.numel(), 1))  # 1: cudaHostRegisterPortable
        except Exception as e:  # noqa: BLE001 - no cudart bindings: stage through pageable memory
            return f"cudaHostRegister is unavailable ({type(e).__name__}: {e})"
        if rc == 0:
            return None
        _clear_cuda_error()
        try:
            text = cudart.cudaGetErrorString(cudart.cudaError(rc))
        except Exception:  # noqa: BLE001
            text = "see cudaError_t"
        return f"cudaHostRegister returned {rc}: {text}"

    def unregister(self, tensor: torch.Tensor) -> None:
        rc = int(torch.cuda.cudart().cudaHostUnregister(tensor.data_ptr()))
        if rc != 0:
            _clear_cuda_error()


class CudaFence:
    """A CUDA event recorded after a slot's copy on its stream."""

    __slots__ = ("event",)

    def __init__(self, event: torch.cuda.Event):
        self.event = event

    def done(self) -> bool:
        return self.event.query()

    def wait(self) -> None:
        self.event.synchronize()


class CudaSink:
    """Copies slots into ``dest`` (a CUDA uint8 tensor) on a small pool of streams, round-robin.

    Every stream first waits on ``ready``, an event the caller recorded on its current stream right
    after allocating ``dest``: memory the caching allocator recycled from a tensor that pending work on
    that stream still writes is not touched before that work is done (case C24). :meth:`close` makes
    the caller's stream wait for every copy stream, so work queued there afterwards sees the bytes.

    Args:
        dest: contiguous CUDA uint8 tensor.
        ready: event recorded on ``caller_stream`` after ``dest`` was allocated.
        caller_stream: the caller's current stream on ``dest.device``.
        num_streams: copy streams.

    Notes:
        Copies are ``cudaMemcpyAsync`` through ``Tensor.copy_(non_blocking=True)``; from pinned slots
        they run asynchronously on the copy engine, from pageable slots the driver stages them (the
        call returns once the slot has been read, so the fence is still correct).
    """

    def __init__(self, dest: torch.Tensor, *, ready: torch.cuda.Event, caller_stream: torch.cuda.Stream,
                 num_streams: int = 2):
        self.dest = dest
        self.device = dest.device
        self.caller_stream = caller_stream
        self.streams = [torch.cuda.Stream(device=self.device) for _ in range(max(1, num_streams))]
        for s in self.streams:
            s.wait_event(ready)
        self._next = 0
        self.copies = 0
        self._closed = False

    def copy(self, slot: Slot, nbytes: int, dest_offset: int) -> CudaFence:
        s = self.streams[self._next]
        self._next = (self._next + 1) % len(self.streams)
        with torch.cuda.stream(s):
            self.dest[dest_offset:dest_offset + nbytes].copy_(slot.tensor[:nbytes], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(s)
        self.copies += 1
        return CudaFence(ev)

    def drain(self) -> None:
        for s in self.streams:
            s.synchronize()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for s in self.streams:
            self.caller_stream.wait_stream(s)
        self.streams = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["CudaFence", "CudaPinner", "CudaSink", "HostCopySink", "HostFence"]
