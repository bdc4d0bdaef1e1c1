"""The ``threads`` backend: a pool of threads, each issuing large ``preadv(2)`` calls.

Each worker reads one whole extent at a time (:func:`flashpack.io.base.read_extent`): O_DIRECT into
the destination for cold, aligned ranges, buffered for cached ranges and tails. Copies out of the page cache that
need no read-ahead (fills and buffered reads the C shim's ``fp_copy_extents`` takes) are not handed out in fixed
batches: they wait in one queue, and helper tasks and the caller's thread, while it waits, each take the next few
extents in file order, a share that shrinks as the queue runs out (:meth:`ThreadsReader._claim`), and copy them in
one C call. ``os.preadv`` releases the GIL, so the workers' reads overlap with each other and with the caller's
work. At most ``queue_depth`` extents are handed out at once; the rest wait in a queue.
"""

from __future__ import annotations

import _thread
import os
import queue
import threading
import time
from collections import deque
from typing import Iterable

from .base import (MAX_THREADS, Completion, Extent, FileHandles, ReaderBase, ReaderStats, buffer_address,
                   native_batchable, read_extents)
from .sync import Bell, CancelledError, Latch, Task

#: Most bytes of copies one thread takes at once (unless one extent is larger), copied in one C call
#: (``fp_copy_extents``): each return from C waits for the GIL, up to the switch interval (5 ms) while another thread
#: runs Python. A claim also holds at most a ``2 * (helpers + caller)``-th of the bytes still queued
#: (:meth:`ThreadsReader._claim`).
COPY_BATCH_NBYTES = 32 * 1024 * 1024
#: CPUs this process may run on (sched_getaffinity(2)), read once: copies run on at most this many threads at once.
_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class ReadPool:
    """Threads that run read tasks, answered through :class:`flashpack.io.sync.Task` (``cancel`` before the task
    starts, ``result``, ``exception``, ``wait``; no lock held while Python code runs, unlike
    ``concurrent.futures.Future``, whose methods a KeyboardInterrupt could leave holding its Condition). A task goes
    to an idle thread, else to a new one while there are fewer than ``max_threads``, else waits for the next thread to
    finish. Neither the queue nor an idle thread holds a finished or cancelled task's arguments.

    Threads are started with ``_thread.start_new_thread``, which returns at once. ``threading.Thread.start``, which
    ``ThreadPoolExecutor`` uses, waits until the new thread has run: 0.3-3.5 ms per thread on the 2-vCPU VM while a
    copy held the other vCPU, so a cached 16 MiB load, the first of a process, took 9.6-10.8 ms (medians of 15)
    against 7.1-7.6 ms this way. The threads never end (each waits for its next task), are not ``threading.Thread``
    objects (``threading.enumerate`` does not list them), and, like daemon threads, do not hold the interpreter at
    exit.

    Raises (``submit``): RuntimeError: a needed thread cannot be started (the task is not queued).
    """

    def __init__(self, max_threads: int):
        self.max_threads = max_threads
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0  # threads waiting with no queued task promised to them; below zero: tasks no thread is free for

    def submit(self, fn, *args) -> Task:
        task = Task(fn, args)
        with self._lock:
            if self._idle <= 0 and self._threads < self.max_threads:
                # counted once it exists: an interrupt between counting and starting (on the `with` exit, where
                # CPython checks for signals) left a thread counted that never started; a kept pool of one thread
                # then ran nothing ever again (found by review). An interrupt after the start leaves an uncounted
                # thread, one more than needed, which takes tasks from the queue like the others.
                _thread.start_new_thread(self._run, ())
                self._threads += 1
            else:  # an idle thread's, or (below zero) the next to finish
                self._idle -= 1
        self._tasks.put(task)
        return task

    def _run(self) -> None:
        while True:
            task: Task = self._tasks.get()
            result = error = None
            run = task.set_running_or_notify_cancel()
            if run:
                fn, args = task.call
                task.call = None
                try:
                    result = fn(*args)
                except BaseException as e:  # noqa: BLE001 - the task's error goes to whoever waits on it
                    error = e
                fn = args = None  # the task's buffers are not held while this thread waits
            with self._lock:  # idle before the answer: a task submitted once it is seen finds this thread
                self._idle += 1
            if run:
                if error is None:
                    task.set_result(result)
                else:
                    task.set_exception(error)
            task = result = error = None


_shared_pool: tuple[int, ReadPool] | None = None
_shared_lock = threading.Lock()


def shared_pool() -> ReadPool:
    """The process's pool of read threads, shared by every reader and kept between loads: starting 16 threads
    took ~25 ms of a 45 ms BERT load on this 2-core machine. Threads start on demand up to ``MAX_THREADS``; a
    forked child makes its own (threads do not survive fork(2))."""
    global _shared_pool
    with _shared_lock:
        if _shared_pool is None or _shared_pool[0] != os.getpid():
            _shared_pool = (os.getpid(), ReadPool(MAX_THREADS))
        return _shared_pool[1]


_named_pools: dict[tuple[str, int], tuple[int, ReadPool]] = {}


def named_pool(purpose: str, max_threads: int) -> ReadPool:
    """A pool of at most ``max_threads`` threads kept for ``purpose`` (``"verify"``: hashing checksum chunks,
    ``"window"``: populating and registering windows of a GPU load) for the life of the process, as
    :func:`shared_pool` is for reads: its tasks are :class:`flashpack.io.sync.Task`, safe to wait on when a
    KeyboardInterrupt lands (``concurrent.futures`` is not: :mod:`flashpack.io.sync`), and no thread is started
    per load. Separate from the read pool, so such tasks never queue ahead of reads. A forked child makes its own.

    Raises:
        ValueError: ``max_threads`` < 1.
    """
    if max_threads < 1:
        raise ValueError(f"max_threads must be >= 1, got {max_threads}")
    key = (purpose, max_threads)
    with _shared_lock:
        held = _named_pools.get(key)
        if held is None or held[0] != os.getpid():
            held = _named_pools[key] = (os.getpid(), ReadPool(max_threads))
        return held[1]


def wait_all(tasks: Iterable[Task]) -> BaseException | None:
    """Wait for every task (an interrupt-safe wait, :class:`flashpack.io.sync.Task`); the first error among them in
    order (``None``: all finished without one). A cancelled task counts as no error."""
    first: BaseException | None = None
    for task in tasks:
        task.wait()
        if not task.cancelled():
            first = first or task.exception(0)
    return first


class ThreadsReader(ReaderBase):
    """Reads extents of one file with a pool of worker threads.

    Args:
        path, cfg, direct, queue_depth, threads, expect: see :class:`~flashpack.io.base.ReaderBase`
            (``threads``: worker threads; ``queue_depth``: extents handed to them at once).
        registered_buffers, registered_files: accepted and ignored (io_uring only), so one set of
            options suits every backend.

    Raises:
        OSError: the file cannot be opened. ReadError (``ESTALE``): it is not ``expect``.
        ValueError: an option is out of range.
    """

    name = "threads"

    def __init__(self, path, *, registered_buffers: bool | None = None, registered_files: bool | None = None,
                 **options):
        self._start()
        super().__init__(path, **options)

    @classmethod
    def sharing(cls, files: FileHandles, stats: ReaderStats, *, queue_depth: int, threads: int) -> "ThreadsReader":
        """A reader over another reader's open ``files`` that adds to its ``stats`` (the ``uring``
        backend's page-cache copier). Closing it leaves ``files`` open."""
        self = cls.__new__(cls)
        self._start()
        self._init_shared(files, stats, queue_depth, threads, owns_files=False)
        return self

    def _start(self) -> None:
        self._pool: ReadPool | None = None
        self._queue: deque[Extent] = deque()
        self._ahead = 0  # extents at the head of _queue already queued for read-ahead (cache="keep")
        self._ready: dict[int, Latch] = {}  # id(extent) -> set once it was read ahead
        self._pending: dict[Task, list[Extent]] = {}  # a task -> its extents, in order
        self._readies: dict[Task, Latch | None] = {}  # a task -> the read-ahead it waits for
        self._cancelled: list[Completion] = []
        # copies out of the page cache, taken in order by whichever thread comes next (_claim): the helpers and the
        # caller while it waits. Guarded by _lock, held with `with self._lock` (a C lock); _bell rings when a copy or
        # a task finishes. No threading.Condition: its Python code, cut by a KeyboardInterrupt, left the lock held
        # (hanging the reader's close) or released under the caller's `with` (found by review; flashpack.io.sync)
        self._lock = threading.Lock()
        self._bell = Bell()
        self._copies: deque[Extent] = deque()  # not taken yet
        self._copies_nbytes = 0  # their bytes
        self._copying = 0  # extents taken, not finished
        self._copied: list[tuple[Extent, ReaderStats, BaseException | None]] = []  # finished, not collected
        self._helpers: set[Task] = set()  # helper tasks queued or running
        self._copiers = 0  # of them, those not yet done taking copies (_copy_helper)

    @classmethod
    def probe(cls) -> tuple[bool, str]:
        """Available wherever ``os.preadv`` exists (Linux, Python >= 3.7)."""
        return (True, "") if hasattr(os, "preadv") else (False, "os.preadv is missing on this platform")

    def _work(self, exts: list[Extent],
              ready: Latch | None) -> list[tuple[ReaderStats, BaseException | None]]:
        stats = [ReaderStats() for _ in exts]
        if ready is not None:  # a batch of one
            ready.wait()  # cache="keep": the range is in the page cache (read ahead) before it is copied
            # counted once read ahead: how is known only then (the helper thread may have found populate refused)
            stats[0].bytes_prefetched += exts[0].nbytes
            stats[0].prefetch = self._files.prefetch_method
        return list(zip(stats, read_extents(self._files, exts, stats)))

    def _held(self) -> int:
        """Extents handed out and not yet collected: in tasks, and copies taken or not (at most ``queue_depth``)."""
        with self._lock:
            copies = len(self._copies) + self._copying + len(self._copied)
        return copies + sum(map(len, self._pending.values()))

    def _fill(self) -> None:
        slots = min(self.queue_depth, self.threads)  # tasks at once; extents at once: at most queue_depth
        while self._queue and (held := self._held()) < self.queue_depth:
            if self._pool is None:
                self._pool = shared_pool()
            head = self._head()
            if id(head) not in self._ready and self._batchable(head) and self._queue_copies(self.queue_depth - held):
                continue
            if len(self._pending) + self._copiers >= slots:  # helpers are workers too (``threads`` caps both)
                break
            ext = self._queue.popleft()
            self._ahead -= 1
            ready = self._ready.pop(id(ext), None)
            fut = self._pool.submit(self._work, [ext], ready)
            self._pending[fut], self._readies[fut] = [ext], ready
            fut.add_done_callback(self._wake)
        self._start_helpers(self._spread() - 1)
        # cache="keep": the prefetcher reads the next queue_depth extents into the page cache while the workers
        # copy the ones before them (bypass loads skip the look-ahead: nothing to queue)
        while self._files.cache == "keep" and self._ahead < min(len(self._queue), self.queue_depth):
            self._read_ahead(self._queue[self._ahead])
            self._ahead += 1

    def _head(self) -> Extent:
        """The extent at the head of the queue, its read-ahead queued first (``cache="keep"``; a no-op otherwise)."""
        if not self._ahead:
            self._read_ahead(self._queue[0])
            self._ahead = 1
        return self._queue[0]

    def _spread(self) -> int:
        """Threads that copy at once, the caller's included: a copy out of the page cache is CPU-bound, so as many
        as CPUs (or workers, if fewer)."""
        return max(1, min(self.queue_depth, self.threads, _CPUS))

    def _start_helpers(self, count: int) -> None:
        """Start pool tasks that copy (:meth:`_copy_helper`) until ``max(1, count)`` take copies, if there are
        copies to take and the tasks leave room (``threads`` caps tasks and helpers together). The caller's thread
        copies too while it waits without a timeout (:meth:`_collect`): one helper fewer than :meth:`_spread`, so the
        threads that copy are as many as the CPUs (a caller that waits with a timeout, or polls, gets the last helper
        in its place). On the 2-vCPU VM, with a helper per CPU besides the caller, the two helpers shared one CPU
        while the caller kept the other, and a cached 1 GiB load took 271 ms against 263 ms with one helper (medians
        of 7, fresh processes)."""
        if not self._copies:
            return
        if self._pool is None:
            self._pool = shared_pool()
        # ``threads`` caps the tasks and the helpers together; the caller's thread is not one of them
        want = min(max(1, count), min(self.queue_depth, self.threads) - len(self._pending))
        while self._copiers < want:
            with self._lock:  # counted before it can run: it uncounts itself when it finds nothing left to take
                self._copiers += 1
            try:
                fut = self._pool.submit(self._copy_helper)
            except BaseException:
                with self._lock:
                    self._copiers -= 1
                raise
            with self._lock:
                self._helpers.add(fut)
            fut.add_done_callback(self._helper_done)

    def _queue_copies(self, room: int) -> int:
        """Move up to ``room`` extents from the head of the queue to the copies while they are copies out of the
        page cache that wait for no read-ahead (:meth:`_batchable`); how many were moved."""
        taken = []
        while self._queue and len(taken) < room:
            nxt = self._head()
            if id(nxt) in self._ready or not self._batchable(nxt):
                break
            taken.append(self._queue.popleft())
            self._ahead -= 1
        with self._lock:
            self._copies.extend(taken)
            self._copies_nbytes += sum(ext.nbytes for ext in taken)
        return len(taken)

    def _claim(self) -> list[Extent]:
        """Take the next copies, oldest first (``_lock`` held): a share of the bytes left that shrinks as they run
        out (guided self-scheduling: the oldest extent, then the next ones while the batch stays within a
        ``2 * (helpers + caller)``-th of the bytes left and ``COPY_BATCH_NBYTES``), so the threads finish within
        about one small share of each other instead of one waiting for another's last large batch. In order,
        because a later extent may wait on an earlier one (a read into a page of the fill region that an earlier
        fill copies blocks in the kernel until it is copied), and the earlier one is then always being copied."""
        if not self._copies:
            return []
        share_nbytes = min(COPY_BATCH_NBYTES, -(-self._copies_nbytes // (2 * (self._copiers + 1))))
        batch = [self._copies.popleft()]
        nbytes = batch[0].nbytes
        while self._copies and nbytes + self._copies[0].nbytes <= share_nbytes:
            nbytes += self._copies[0].nbytes
            batch.append(self._copies.popleft())
        self._copies_nbytes -= nbytes
        self._copying += len(batch)
        return batch

    def _copy(self, batch: list[Extent]) -> None:
        """Copy ``batch`` (taken by :meth:`_claim`) in one C call where it can (:func:`read_extents`) and leave its
        completions for the caller. An error is its extents'; a KeyboardInterrupt (the caller's thread) is
        recorded for them too, then propagates."""
        stats = [ReaderStats() for _ in batch]
        stop: BaseException | None = None
        try:
            errors: list[BaseException | None] = read_extents(self._files, batch, stats)
        except BaseException as e:  # noqa: BLE001 - an Exception is the batch's, as from a task
            errors = [e] * len(batch)
            stop = None if isinstance(e, Exception) else e
        with self._lock:
            self._copying -= len(batch)
            self._copied += [(ext, st, err) for ext, st, err in zip(batch, stats, errors)]
            self._bell.ring()
        if stop is not None:
            raise stop

    def _copy_helper(self) -> None:
        """A pool task: copy until no copy is left to take. It stops counting as a copier in the same hold of
        ``_lock`` in which it finds nothing left, so copies queued a moment later start a new helper (while it
        counted until its task's done-callback ran, a caller that waits with a timeout could wait it out)."""
        counted = True
        try:
            while True:
                with self._lock:
                    batch = self._claim()
                    if not batch:
                        self._copiers -= 1
                        counted = False
                        return
                self._copy(batch)
        finally:
            if counted:  # stopped by an error (a KeyboardInterrupt delivered to this thread)
                with self._lock:
                    self._copiers -= 1

    def _wake(self, _fut: Task | None = None) -> None:
        with self._lock:
            self._bell.ring()

    def _helper_done(self, fut: Task) -> None:
        with self._lock:
            self._helpers.discard(fut)
            if fut.cancelled():  # never ran, so never uncounted itself
                self._copiers -= 1
            self._bell.ring()

    def _batchable(self, ext: Extent) -> bool:
        """Whether ``ext`` may share a worker with its neighbours: the C copy takes it and it is a copy out of the
        page cache (a cold buffered read waits for the disk, and more of them in flight read faster). Never raises."""
        if not native_batchable(self._files, ext):
            return False
        try:
            return self._files.copies_from_cache(buffer_address(ext.dest), ext.file_offset, ext.nbytes)
        except Exception:  # noqa: BLE001 - native_batchable judged the destination already; be safe anyway
            return False

    def _read_ahead(self, ext: Extent) -> None:
        ready = self._files.read_ahead(ext.file_offset, ext.nbytes)
        if ready is not None:
            self._ready[id(ext)] = ready

    def submit(self, extents: Iterable[Extent]) -> None:
        if self._closed:
            raise ValueError("submit on a closed reader")
        self._queue.extend(extents)
        self._fill()

    @property
    def in_flight(self) -> int:
        return len(self._queue) + self._held() + len(self._cancelled)

    def wait(self, timeout_s: float | None = None) -> list[Completion]:
        out, self._cancelled = self._cancelled, []
        out += self._collect(0 if out else timeout_s)
        self._fill()
        return out

    def _collect(self, timeout_s: float | None) -> list[Completion]:
        """The completions of the finished tasks and copies, waiting up to ``timeout_s`` for the first one (``None``:
        until one finishes, copying the next copies meanwhile, or running a task no worker has started); the stats
        of the extents read are added to the reader's."""
        deadline = None if not timeout_s else time.monotonic() + timeout_s
        if timeout_s is not None:  # a caller that polls (the uring reader reaping its ring) copies nothing: a helper
            self._start_helpers(self._spread())  # in its place
        while True:
            out = self._finished()
            if out or timeout_s == 0 or not self._held():
                return out
            if timeout_s is None:
                with self._lock:
                    batch = self._claim()
                if batch:
                    self._copy(batch)
                    continue
                if self._run_one_here():
                    continue
            with self._lock:
                idle = not self._copied and not any(f.done() for f in self._pending)
            if idle:  # a ring after this check is not lost: the bell stays rung until the wait hears it
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return []
                self._bell.wait(left)

    def _finished(self) -> list[Completion]:
        out = []
        for fut in [f for f in self._pending if f.done()]:
            batch = self._pending.pop(fut)
            self._readies.pop(fut, None)
            if fut.cancelled():
                out += [Completion(ext, CancelledError("read cancelled after an earlier error")) for ext in batch]
                continue
            err = fut.exception()
            if err is not None:
                out += [Completion(ext, err) for ext in batch]
                continue
            for ext, (st, error) in zip(batch, fut.result()):
                if error is None:
                    self.stats.add(st)
                out.append(Completion(ext, error))
        with self._lock:
            copied, self._copied = self._copied, []
        for ext, st, error in copied:
            if error is None:
                self.stats.add(st)
            out.append(Completion(ext, error))
        return out

    def _run_one_here(self) -> bool:
        """Run on the calling thread, which would otherwise block, the oldest task no worker has started (taken
        back with ``Task.cancel``, which fails for a running task); whether there was one. A worker woken for a
        task started 0.1-3.5 ms later on the 2-vCPU VM: a cached 16 MiB load was 7 or 10.5 ms by that alone. The
        oldest, because a later extent may wait on an earlier one (see :meth:`_claim`). Its result stands in a
        finished future under the same extents; a KeyboardInterrupt there is recorded for the task and
        propagates."""
        # cancel() of a cancelled future is True too: done() first
        fut = next((f for f in self._pending if not f.done() and f.cancel()), None)
        if fut is None:
            return False
        batch, ready = self._pending.pop(fut), self._readies.pop(fut, None)
        try:
            self._pending[Task.finished(self._work(batch, ready))] = batch
        except BaseException as e:  # noqa: BLE001 - an Exception is the task's, as from a worker
            self._pending[Task.finished(error=e)] = batch
            if not isinstance(e, Exception):
                raise
        return True

    def cancel_pending(self) -> None:
        err = CancelledError("read cancelled after an earlier error")
        self._cancelled.extend(Completion(ext, err) for ext in self._queue)
        self._queue.clear()
        self._ahead = 0
        self._ready.clear()
        for fut in self._pending:
            fut.cancel()
        with self._lock:
            self._cancelled.extend(Completion(ext, err) for ext in self._copies)
            self._copies.clear()
            self._copies_nbytes = 0
            helpers = list(self._helpers)
        for fut in helpers:
            fut.cancel()  # one not started holds the reader (and its buffers) until it runs

    def _close(self) -> None:
        self.cancel_pending()
        with self._lock:
            helpers = list(self._helpers)
        if self._pending or helpers:  # every read finished before the buffers go back (the pool itself stays)
            for task in [*self._pending, *helpers]:
                task.wait()
        with self._lock:  # the helpers have finished; the caller's thread, here, copies nothing either
            self._copied = []
            self._copying = 0  # a batch the caller claimed just before an interrupt, never copied, no longer counts
        self._pending.clear()
        self._readies.clear()
        self._cancelled = []
