"""Synchronisation the readers share with their threads, built only on ``_thread`` locks.

A KeyboardInterrupt (SIGINT) is raised in the main thread between any two bytecodes of Python code. The standard
library's ``threading.Condition.__enter__``/``__exit__``, ``threading.Event.wait``/``set`` and every method of
``concurrent.futures.Future`` run Python code while they hold a lock; an interrupt landing there leaves the lock
held, and the next thread to take it (a worker finishing a task, the prefetcher setting an event) blocks forever, so
closing the reader hangs (a review interrupting hundreds of loads hung a few). Here every lock is taken and
released by C calls (``with lock``, ``lock.acquire``/``release``), so an interrupt can only land before or after
them; a waiter checks a flag before it waits, so a wait cut short by an interrupt loses nothing.
"""

from __future__ import annotations

import _thread
import logging
import signal
import threading
from concurrent.futures import CancelledError

log = logging.getLogger(__name__)


class Latch:
    """A one-shot event: :meth:`set` once by any thread (again: a no-op), waited on by any. Unlike
    ``threading.Event`` it holds no lock while Python code runs (module docstring): its ``_gate`` is a lock created
    held and released by :meth:`set`; a waiter reads the flag first, then acquires and releases the gate."""

    __slots__ = ("_flag", "_gate", "_guard")

    def __init__(self) -> None:
        self._flag = False
        self._guard = _thread.allocate_lock()
        self._gate = _thread.allocate_lock()
        self._gate.acquire()

    def set(self) -> None:
        with self._guard:
            if self._flag:
                return
            self._flag = True
        self._gate.release()

    def is_set(self) -> bool:
        return self._flag

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait until set, or ``timeout_s`` seconds (``None``: without limit); whether it is set."""
        if self._flag:
            return True
        if self._gate.acquire(True, -1 if timeout_s is None else max(0.0, timeout_s)):
            self._gate.release()  # an interrupt before this leaves the gate held: later waiters read the flag
            return True
        return self._flag


class Bell:
    """Wakes one waiting thread: :meth:`ring` from any thread, :meth:`wait` in the one that waits. A ``_thread`` lock
    held while nobody rang: ``ring`` releases it (a second ring before the wait is absorbed), ``wait`` acquires it.
    The waiter checks its condition before waiting, so a ring between that check and the wait is not lost (the
    wait returns at once), and an interrupt anywhere leaves a lock that is either held or not, both valid states;
    unlike ``threading.Condition.wait``/``notify``, whose Python code an interrupt can cut between releasing and
    re-taking the caller's lock (found by review)."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = _thread.allocate_lock()
        self._lock.acquire()

    def ring(self) -> None:
        try:
            self._lock.release()
        except RuntimeError:  # already rung, not yet heard
            pass

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait for a ring (one since the last wait counts), at most ``timeout_s`` seconds; whether one came."""
        return self._lock.acquire(True, -1 if timeout_s is None else max(0.0, timeout_s))


_NEW, _STARTED, _ABANDONED = range(3)


class HelperThread:
    """One background thread running ``fn(*args)``, which :meth:`join` can always wait for, whatever moment a
    KeyboardInterrupt cut the starting code short.

    The thread starts with ``_thread.start_new_thread``, which returns at once (``threading.Thread.start`` waits for
    the new thread on a ``threading.Event``, Python code holding a lock: module docstring). An interrupt can land
    before ``start_new_thread`` is called, or after it returned and before the caller recorded that it did (CPython
    checks for signals when a call returns): setting a latch in the thread alone made :meth:`join` wait forever
    for a thread that never existed (found by the interrupted-loads stress test, about one run in 40). Here the
    thread, once running, marks itself started under a C lock, and only if :meth:`join` has not abandoned it first;
    :meth:`join` abandons a thread not yet started that :meth:`start` has not recorded as launched: such a thread,
    if it exists, returns without calling ``fn``.

    Attributes:
        exited: a :class:`Latch` set once ``fn`` has returned or raised, or the thread was abandoned.
    """

    __slots__ = ("exited", "_guard", "_state", "_launched")

    def __init__(self) -> None:
        self.exited = Latch()
        self._guard = _thread.allocate_lock()
        self._state = _NEW
        self._launched = False

    def start(self, fn, args: tuple = ()) -> None:
        """Start the thread (once). ``fn``'s errors go to ``sys.unraisablehook`` (as ``_thread``'s).

        Raises:
            RuntimeError: no thread could start (:meth:`join` then returns at once).
        """
        _thread.start_new_thread(self._run, (fn, args))
        self._launched = True

    def _run(self, fn, args: tuple) -> None:
        try:
            with self._guard:
                if self._state != _NEW:
                    return  # abandoned by join() before it ran: the caller has moved on
                self._state = _STARTED
            fn(*args)
        finally:
            self.exited.set()

    def running(self) -> bool:
        """Whether ``fn`` may still run (started or launched, and not yet returned)."""
        return not self.exited.is_set()

    def join(self, timeout_s: float | None = None) -> bool:
        """Wait until ``fn`` has returned, at most ``timeout_s`` seconds (``None``: without limit); whether it has.
        A thread never launched (no :meth:`start`, or one an interrupt cut short) is abandoned: returns ``True`` at
        once, and ``fn`` will not run."""
        with self._guard:
            if self._state == _NEW and not self._launched:
                self._state = _ABANDONED
            abandoned = self._state == _ABANDONED
        if abandoned:
            self.exited.set()
            return True
        return self.exited.wait(timeout_s)


class Gate:
    """Lets one load's pool tasks run until :meth:`close`, which returns once none of them runs and none will start.

    A caller that tracks the tasks it submitted can still lose one: a KeyboardInterrupt can land after
    ``submit`` returned and before the task was recorded, and that task may then read a buffer the caller frees
    on its way out (a staging slot, a window). Each task, wrapped by :meth:`wrap`, enters the gate when it starts
    (or is skipped: it returns ``None`` without running, once the gate is closed) and leaves it when it ends; all
    under a C lock, so an interrupt in the caller cannot leave the count wrong. Close it after waiting for the
    tasks you tracked, so the skipped ones are only those nobody waits for.
    """

    __slots__ = ("_guard", "_running", "_closed", "_idle")

    def __init__(self) -> None:
        self._guard = _thread.allocate_lock()
        self._running = 0
        self._closed = False
        self._idle = Latch()

    def wrap(self, fn):
        """``fn`` as a task of this gate (same arguments; returns ``None`` without calling ``fn`` once closed)."""
        def gated(*args):
            with self._guard:
                if self._closed:
                    return None
                self._running += 1
            try:
                return fn(*args)
            finally:
                with self._guard:
                    self._running -= 1
                    idle = self._closed and self._running == 0
                if idle:
                    self._idle.set()
        return gated

    def close(self, timeout_s: float | None = None) -> bool:
        """Let no task start any more and wait, at most ``timeout_s`` seconds (``None``: without limit), until none
        runs; whether none does. Idempotent (run it again after an interrupt)."""
        with self._guard:
            self._closed = True
            idle = self._running == 0
        if idle:
            self._idle.set()
        return self._idle.wait(timeout_s)


def run_to_end(fn) -> KeyboardInterrupt | None:
    """Run a cleanup step (``fn()``, which must finish: a wait for tasks that end, an unregister) to its end,
    running it again after every KeyboardInterrupt that lands in it; the first such interrupt, or ``None``. The caller
    re-raises it once its other cleanup steps ran too, or drops it when the load already has its error. Re-running
    once only (as before) let a second quick Ctrl-C skip the rest of a cleanup (found by review)."""
    first: KeyboardInterrupt | None = None
    while True:
        try:
            fn()
            return first
        except KeyboardInterrupt as e:
            first = first or e


class DeferredInterrupts:
    """Holds Ctrl-C (SIGINT) back while a load reads in the main thread, so that no KeyboardInterrupt lands inside its
    cleanup: the load stops at its next :meth:`check` (each finished extent or slot, through
    :class:`flashpack.progress.Progress`), or, if none comes, the interrupt is delivered when the block ends.

    Why: a KeyboardInterrupt is raised at any signal check of the main thread: after any call returns, at any
    function's first bytecode. Cleanup code (closing a reader, unregistering windows, waiting for tasks) cut at such a
    point leaked a registration or left a thread writing into freed memory, whatever re-runs guarded it (found by
    review). With the handler swapped for one that only records (signal(2), Python's ``signal.signal``: handlers run
    in the main thread between bytecodes), the load raises KeyboardInterrupt itself, at a point where its cleanup then
    runs to the end.

    On entry, in the main thread, Python's default SIGINT handler (``signal.default_int_handler``, which raises
    KeyboardInterrupt) is replaced by a recorder (nested blocks share the outer one's record). Any other handler
    (``SIG_IGN``, ``SIG_DFL``, the program's own, or one not set from Python) is left alone, as is every thread but the
    main one, where Python raises no KeyboardInterrupt. On exit the default handler is put back and a Ctrl-C that was
    recorded and not yet raised by :meth:`check` is re-sent with ``signal.raise_signal``: KeyboardInterrupt, once.
    Hold it back only around work that reaches :meth:`check` often (the reads of a load): a Ctrl-C while a read is
    stuck in the kernel waits for that read, as it did before (the reader's close waits for it).
    """

    __slots__ = ("pending", "raised", "_owner")

    def __init__(self) -> None:
        self.pending = False  # a Ctrl-C arrived and was not delivered yet
        self.raised = False  # check() raised it
        self._owner: DeferredInterrupts | None = None  # the block whose handler records (self, or an outer one)

    def _record(self, signum, frame) -> None:
        self.pending = True

    def __enter__(self) -> "DeferredInterrupts":
        if _thread.get_ident() != threading.main_thread().ident:  # only it sees KeyboardInterrupt (signal docs)
            return self
        current = signal.getsignal(signal.SIGINT)
        outer = getattr(current, "__self__", None)
        if isinstance(outer, DeferredInterrupts):
            self._owner = outer._owner
            return self
        if current is not signal.default_int_handler:
            return self  # SIG_IGN, SIG_DFL, the program's own handler: its Ctrl-C is its business (found by review)
        try:
            signal.signal(signal.SIGINT, self._record)
            self._owner = self
        except ValueError:  # not the main interpreter
            return self
        except BaseException:  # another signal's handler raised in between: leave no recorder behind
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise
        return self

    @property
    def active(self) -> bool:
        """Whether Ctrl-C is being held back for this block (main thread, Python's default handler in place)."""
        return self._owner is not None

    def check(self) -> None:
        """Raise KeyboardInterrupt if Ctrl-C was pressed since the block began (once).

        Raises:
            KeyboardInterrupt: at a point where the caller's cleanup may run (it is not cut short: Ctrl-C is held back
                until the block ends).
        """
        owner = self._owner
        if owner is not None and owner.pending and not owner.raised:
            owner.raised = True
            raise KeyboardInterrupt

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._owner is not self:
            return
        if signal.getsignal(signal.SIGINT) == self._record:  # not if code inside installed a handler of its own
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if self.pending and not self.raised and not (exc_type is not None and issubclass(exc_type, KeyboardInterrupt)):
            self.raised = True
            signal.raise_signal(signal.SIGINT)  # the program's handler now; by default KeyboardInterrupt from here


_PENDING, _RUNNING, _CANCELLED, _FINISHED = range(4)


class Task:
    """The answer of one pool task, with the part of ``concurrent.futures.Future``'s interface the readers use
    (``cancel`` before it starts, ``done``, ``cancelled``, ``result``, ``exception``, ``add_done_callback``,
    ``wait``) and none of its Python-held locks (module docstring). It holds what it runs (``call``) until it starts
    or is cancelled: a task cancelled before it started (taken back by the caller, or after an error) waits in the
    pool's queue until a thread takes it, and must not keep the load's buffers alive meanwhile (a shared destination
    could not be sealed: ``EBUSY``).

    Raises (``result``, ``exception``): ``concurrent.futures.CancelledError`` for a cancelled task, ``TimeoutError``
    when ``timeout_s`` passes first; ``result`` raises the task's own error.
    """

    __slots__ = ("call", "_state", "_result", "_error", "_callbacks", "_guard", "_done")

    def __init__(self, fn=None, args: tuple = ()):
        self.call: tuple | None = None if fn is None else (fn, args)
        self._state = _PENDING
        self._result = None
        self._error: BaseException | None = None
        self._callbacks: list = []
        self._guard = _thread.allocate_lock()
        self._done = Latch()

    @classmethod
    def finished(cls, result=None, error: BaseException | None = None) -> "Task":
        """A task already done with ``result`` (or ``error``), for work the caller ran itself."""
        task = cls()
        task._finish(result, error)
        return task

    def done(self) -> bool:
        return self._state >= _CANCELLED

    def cancelled(self) -> bool:
        return self._state == _CANCELLED

    def cancel(self) -> bool:
        """Cancel the task if it has not started; whether it is cancelled (``False`` once running or finished)."""
        with self._guard:
            if self._state == _CANCELLED:
                return True
            if self._state != _PENDING:
                return False
            self._state = _CANCELLED
            self.call = None
            callbacks, self._callbacks = self._callbacks, []
        self._done.set()
        self._run_callbacks(callbacks)
        return True

    def set_running_or_notify_cancel(self) -> bool:
        """For the pool thread that took the task: mark it running; ``False`` if it was cancelled (do not run it)."""
        with self._guard:
            if self._state == _CANCELLED:
                return False
            self._state = _RUNNING
            return True

    def set_result(self, result) -> None:
        self._finish(result, None)

    def set_exception(self, error: BaseException) -> None:
        self._finish(None, error)

    def _finish(self, result, error: BaseException | None) -> None:
        with self._guard:
            self._result, self._error, self._state = result, error, _FINISHED
            self.call = None
            callbacks, self._callbacks = self._callbacks, []
        self._done.set()
        self._run_callbacks(callbacks)

    def _run_callbacks(self, callbacks: list) -> None:
        for fn in callbacks:
            try:
                fn(self)
            except Exception:  # noqa: BLE001 - as concurrent.futures: a callback's error must not stop the others
                log.exception("flashpack: a task's done-callback raised")

    def add_done_callback(self, fn) -> None:
        """Call ``fn(task)`` once the task is done (cancelled or finished), at once if it is."""
        with self._guard:
            if self._state < _CANCELLED:
                self._callbacks.append(fn)
                return
        self._run_callbacks([fn])

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait until done, or ``timeout_s`` seconds (``None``: without limit); whether it is done. The state is
        read first: an interrupt inside :meth:`cancel` can leave a task cancelled whose latch was never set (found
        by review: closing the reader then waited on it forever)."""
        return self.done() or self._done.wait(timeout_s) or self.done()

    def exception(self, timeout_s: float | None = None) -> BaseException | None:
        if not self.wait(timeout_s):
            raise TimeoutError(f"task not done after {timeout_s} s")
        if self._state == _CANCELLED:
            raise CancelledError()
        return self._error

    def result(self, timeout_s: float | None = None):
        error = self.exception(timeout_s)
        if error is not None:
            raise error
        return self._result
