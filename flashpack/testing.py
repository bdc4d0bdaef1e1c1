"""Test doubles and helpers that the tests and the perf scripts import; nothing in the load path uses them.

- :class:`HostCopySink` / :class:`HostFence`: a stand-in for CUDA streams and events (worker threads that copy
  staging slots out after random delays and check the ring's contract), so the staged path runs without a GPU.
- :class:`HostRegistrar`: a stand-in for read-only ``cudaHostRegister`` of page-cache windows (counts them), so the
  mapped path (:mod:`flashpack.staging.mapped`) runs without a GPU too.
- :func:`load_payload_host`, :func:`load_staged`: the staged load into host memory through that sink.
- :func:`free_port`, :func:`init_local_group`: a ``torch.distributed`` group of processes on this machine.
"""

from __future__ import annotations

import os
import queue
import random
import socket
import threading
import time
from datetime import timedelta
from typing import Iterable

import torch

from .format import WeightMap
from .loading.common import LoadStats, aligned_empty, assemble, parse_device, prepare
from .loading.staged import load_payload_cuda, load_payload_mapped, load_payload_staged
from .plan import LoadPlan
from .settings import Settings, settings

from .staging.mapped import Registrar, Window, host_tensor_at
from .source import read_pack_map
from .staging.ring import Pinner, Slot

# --------------------------------------------------------------------------- a host copy engine


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
            slot, generation, nbytes, dest_offset, delay_s, fence, src = job
            try:
                if delay_s:
                    time.sleep(delay_s)
                self.dest[dest_offset:dest_offset + nbytes].copy_(slot.tensor[:nbytes] if src is None else src)
                if slot is not None and slot.generation != generation:
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
        self._queues[self._next].put((slot, slot.generation, nbytes, dest_offset, delay, fence, None))
        self._next = (self._next + 1) % len(self._queues)
        self.copies += 1
        return fence

    def copy_from(self, src: torch.Tensor, dest_offset: int) -> HostFence:
        """Queue a copy of the CPU uint8 tensor ``src`` (a registered window,
        :class:`flashpack.staging.mapped.WindowSink`) to ``dest[dest_offset:]``; returns its fence.

        Raises:
            ValueError: the copy would fall outside ``dest``.
        """
        nbytes = src.numel()
        if dest_offset < 0 or dest_offset + nbytes > self.dest.numel():
            raise ValueError(f"copy of {nbytes} bytes to offset {dest_offset} is outside the "
                             f"{self.dest.numel()}-byte destination")
        fence = HostFence()
        delay = self._rng.uniform(0, self.max_delay_s) if self.max_delay_s else 0.0
        self._fences.append(fence)
        self._queues[self._next].put((None, 0, nbytes, dest_offset, delay, fence, src))
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


class HostRegistrar:
    """A stand-in for read-only ``cudaHostRegister`` of page-cache windows (:mod:`flashpack.staging.mapped`).

    "Registering" copies the populated window into private memory, as pinning holds the pages for the
    device: what the copy engine reads afterwards no longer goes through the mapping (a file truncated
    later cannot make the host copy fault). This copy is the test double's only CPU read of a mapping.

    Args:
        refuse: the reason every registration from the ``refuse_after``-th on (0-based) is refused with;
            ``None`` refuses none.
        on_register: called as ``on_register(window, index)`` after each registration (tests truncate the
            file there).

    Attributes:
        attempts, registered, unregistered: calls counted; ``live``/``peak_live``: windows registered now /
        at most at once; ``violations``: windows unregistered twice or before their copy's fence was done.
    """

    name = "host"

    def __init__(self, *, refuse: str | None = None, refuse_after: int = 0, on_register=None):
        self.refuse, self.refuse_after, self.on_register = refuse, refuse_after, on_register
        self.attempts = self.registered = self.unregistered = self.live = self.peak_live = 0
        self.violations: list[str] = []
        self._lock = threading.Lock()

    def register(self, window: Window) -> str | None:
        with self._lock:
            i, self.attempts = self.attempts, self.attempts + 1
        if self.refuse is not None and i >= self.refuse_after:
            return self.refuse
        window.tensor = host_tensor_at(window.address, window.piece.nbytes).clone()
        window.handle = i
        with self._lock:
            self.registered += 1
            self.live += 1
            self.peak_live = max(self.peak_live, self.live)
        if self.on_register is not None:
            self.on_register(window, i)
        return None

    def unregister(self, window: Window) -> None:
        with self._lock:
            if window.handle is None:
                self.violations.append(f"window at file offset {window.piece.file_offset} unregistered twice")
            elif window.fence is not None and not window.fence.done():
                self.violations.append(f"window at file offset {window.piece.file_offset} unregistered before "
                                       f"its copy's fence was done")
            window.handle = None
            self.live -= 1
            self.unregistered += 1


# --------------------------------------------------------------------------- staged loads into host memory


def load_payload_host(wm: WeightMap, plan: LoadPlan, *, backend: str | None, verify: bool, stats: LoadStats,
                      slot_nbytes: int | None = None, num_slots: int | None = None, num_workers: int = 2,
                      max_delay_s: float = 0.0, seed: int | None = None, pinner: Pinner | None = None,
                      hash_threads: int | None = None, cfg: Settings | None = None, mapped: str = "off",
                      registrar: Registrar | None = None) -> torch.Tensor:
    """The same staged load with a host copy engine: a new CPU uint8 tensor of ``plan.buffer_nbytes``.

    Args:
        num_workers, max_delay_s, seed: the copy engine (see :class:`HostCopySink`).
        pinner: a test pinner (default: pageable slots).
        mapped: ``"off"`` (default: the ring only), ``"auto"`` or ``"on"``: page-cache windows as for
            :func:`flashpack.loading.staged.load_payload_mapped`, registered by ``registrar`` (default a new
            :class:`HostRegistrar`).
        cfg: settings (default: read now). Others as :func:`flashpack.loading.staged.load_payload_cuda`.

    Raises:
        As :func:`flashpack.load`; also ``AssertionError`` when the engine saw a slot handed out again
        while its copy ran (a ring bug), or the registrar a window unregistered before its copy was done.
    """
    dest = aligned_empty(plan.buffer_nbytes)
    if plan.buffer_nbytes == 0:
        return dest
    with HostCopySink(dest, num_workers=num_workers, max_delay_s=max_delay_s, seed=seed) as sink:
        if mapped != "off":
            registrar = registrar if registrar is not None else HostRegistrar()
            load_payload_mapped(wm, plan, sink, registrar, backend=backend, verify=verify, stats=stats,
                                cfg=cfg or settings(), slot_nbytes=slot_nbytes, num_slots=num_slots, pinner=pinner,
                                hash_threads=hash_threads, mapped=mapped)
        else:
            load_payload_staged(wm, plan, sink, backend=backend, verify=verify, stats=stats, cfg=cfg or settings(),
                                slot_nbytes=slot_nbytes, num_slots=num_slots, pinner=pinner, hash_threads=hash_threads)
    violations = sink.violations + (getattr(registrar, "violations", None) or [])
    if violations:
        raise AssertionError("; ".join(violations))
    return dest


def load_staged(path: str | os.PathLike, *, device: str | torch.device = "cpu", backend: str | None = None,
                keys: Iterable[str] | None = None, verify: bool | None = None, stats: LoadStats | None = None,
                **ring_options) -> dict[str, torch.Tensor]:
    """:func:`flashpack.load` through the staging ring for any device: ``cuda`` takes the CUDA sink,
    ``cpu`` the host copy engine (``ring_options`` go to :func:`load_payload_host`). For tests and the
    perf scripts; ``flashpack.load`` reads CPU loads straight into their destination instead."""
    dev = parse_device(device)
    cfg = settings()
    stats = stats if stats is not None else LoadStats()
    job = prepare(read_pack_map(path, keys=keys), keys, verify=verify, cfg=cfg)  # a sharded pack too
    if dev.type == "cuda":
        buffer = load_payload_cuda(job.wm, job.plan, dev, backend=backend, verify=job.verify, stats=stats, cfg=cfg,
                                   **ring_options)
    else:
        buffer = load_payload_host(job.wm, job.plan, backend=backend, verify=job.verify, stats=stats, cfg=cfg,
                                   **ring_options)
    return assemble(job, buffer)


# --------------------------------------------------------------------------- a local process group


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (for a test's ``init_method``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def init_local_group(rank: int, world_size: int, port: int, *, backend: str = "gloo", host: str = "127.0.0.1",
                     timeout_s: float = 60.0):
    """Initialise torch.distributed's default group over TCP on one machine, for tests and benchmarks.

    This is the only place flashpack calls ``init_process_group``, and only when called: loaders use the
    group the caller initialised. Call ``torch.distributed.destroy_process_group()`` when done.

    Args:
        rank, world_size: this process's rank and the number of processes.
        port: a TCP port on ``host`` agreed by every process (rank 0 listens there; see :func:`free_port`).
        backend: ``"gloo"`` (CPU), ``"nccl"`` (CUDA), or a device map such as ``"cpu:gloo,cuda:nccl"``.
        timeout_s: seconds a collective may wait for the other ranks before raising.

    Returns:
        The default group (``torch.distributed.group.WORLD``).
    """
    import torch.distributed as dist

    dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    return dist.group.WORLD


__all__ = ["HostCopySink", "HostFence", "HostRegistrar", "free_port", "init_local_group", "load_payload_host", "load_staged"]
