"""Where staging-slot bytes go on a GPU: :class:`CudaSink` (a small pool of CUDA streams and events),
:class:`CudaPinner` (``cudaHostRegister`` for the ring's slots) and :class:`CudaRegistrar` (read-only
``cudaHostRegister`` for page-cache windows of a file mapping, :mod:`flashpack.staging.mapped`). The sink implements the
:class:`flashpack.staging.ring.Sink` protocol: ``copy(slot, nbytes, dest_offset) -> fence``, ``drain()``,
``close()``; a fence has ``done()`` and ``wait()``. A host stand-in for tests is
:class:`flashpack.testing.HostCopySink`.
"""

from __future__ import annotations

import ctypes

import torch

from .mapped import Window, host_tensor_at
from .ring import Slot

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


def _refusal(cudart, rc: int, call: str) -> str:
    """The reason a CUDA runtime call returned ``rc`` (cudaGetErrorString), after clearing the error state."""
    _clear_cuda_error()
    try:
        text = cudart.cudaGetErrorString(cudart.cudaError(rc))
    except Exception:  # noqa: BLE001
        text = "see cudaError_t"
    return f"{call} returned {rc}: {text}"


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
        return None if rc == 0 else _refusal(cudart, rc, "cudaHostRegister")

    def unregister(self, tensor: torch.Tensor) -> None:
        rc = int(torch.cuda.cudart().cudaHostUnregister(tensor.data_ptr()))
        if rc != 0:
            _clear_cuda_error()


#: ``cudaHostRegister`` flags (CUDA runtime API, "Memory Management": cudaHostRegister): portable (the memory is
#: page-locked for every CUDA context) and read-only (the device only reads it: the flag a ``PROT_READ`` file
#: mapping needs; CUDA >= 11.1, on devices with ``cudaDevAttrHostRegisterReadOnlySupported``).
HOST_REGISTER_PORTABLE = 0x1
HOST_REGISTER_READ_ONLY = 0x8


class CudaRegistrar:
    """Registers page-cache windows of a read-only file mapping (:mod:`flashpack.staging.mapped`) with
    ``cudaHostRegister(ptr, nbytes, cudaHostRegisterPortable | cudaHostRegisterReadOnly)`` so the copy engine
    reads them directly (DMA; no CPU copy), and unregisters them with ``cudaHostUnregister``.

    Registration pins the window's pages (the driver faults them in first: a page beyond the end of the
    file makes it fail, it never raises SIGBUS). A refusal (CUDA < 11.1 or a device without read-only
    registration: ``cudaErrorInvalidValue``/``cudaErrorNotSupported``; RLIMIT_MEMLOCK; a file system whose
    pages cannot be pinned) is returned as its reason, never raised, and the runtime's last error is
    cleared. Calls run with ``device`` current, so a worker thread creates no context on another device.

    Args:
        device: the CUDA device the copies go to.
    """

    name = "cuda-readonly"

    def __init__(self, device: torch.device):
        self.device = torch.device(device)

    def register(self, window: Window) -> str | None:
        n = window.piece.nbytes
        try:
            cudart = torch.cuda.cudart()
            with torch.cuda.device(self.device):
                rc = int(cudart.cudaHostRegister(window.address, n, HOST_REGISTER_PORTABLE | HOST_REGISTER_READ_ONLY))
        except Exception as e:  # noqa: BLE001 - no cudart bindings: stage through the ring
            return f"cudaHostRegister is unavailable ({type(e).__name__}: {e})"
        if rc != 0:
            return _refusal(cudart, rc, "cudaHostRegister(cudaHostRegisterPortable | cudaHostRegisterReadOnly)")
        window.tensor = host_tensor_at(window.address, n)
        return None

    def unregister(self, window: Window) -> None:
        window.tensor = None
        with torch.cuda.device(self.device):
            rc = int(torch.cuda.cudart().cudaHostUnregister(window.address))
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

    def copy_from(self, src: torch.Tensor, dest_offset: int) -> CudaFence:
        """Start copying a host uint8 tensor (a registered window: DMA, the CPU reads nothing) to
        ``dest[dest_offset:]`` on the next stream; returns its fence (an event recorded after it)."""
        s = self.streams[self._next]
        self._next = (self._next + 1) % len(self.streams)
        with torch.cuda.stream(s):
            self.dest[dest_offset:dest_offset + src.numel()].copy_(src, non_blocking=True)
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


__all__ = ["CudaFence", "CudaPinner", "CudaRegistrar", "CudaSink", "HOST_REGISTER_PORTABLE", "HOST_REGISTER_READ_ONLY"]
