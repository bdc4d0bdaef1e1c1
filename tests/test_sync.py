"""flashpack.io.sync: the latch and the task the readers use instead of threading.Event and
concurrent.futures.Future, and loads interrupted by SIGINT at random moments (the hang they prevent)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import CancelledError

import pytest

from flashpack.io.sync import Latch, Task


def test_latch_sets_once_wakes_every_waiter_and_times_out():
    latch = Latch()
    assert not latch.is_set() and latch.wait(0) is False
    t0 = time.monotonic()
    assert latch.wait(0.05) is False and time.monotonic() - t0 >= 0.04
    woke = []
    waiters = [threading.Thread(target=lambda: woke.append(latch.wait(10))) for _ in range(4)]
    for w in waiters:
        w.start()
    latch.set()
    latch.set()  # a second set is a no-op, not a RuntimeError from releasing an unheld lock
    for w in waiters:
        w.join(10)
    assert woke == [True] * 4 and latch.is_set() and latch.wait() is True


def test_latch_wait_interrupted_after_its_gate_was_taken_loses_nothing():
    """A waiter stopped between taking and giving back the gate (what an interrupt there would do) leaves the gate
    held; the latch was set, so every later wait returns at once from the flag."""
    latch = Latch()
    latch.set()
    assert latch._gate.acquire(False)  # the interrupted waiter
    assert latch.wait(5) is True and latch.wait() is True


def test_task_result_error_cancel_and_callbacks():
    calls = []
    task = Task(lambda: 1, ())
    task.add_done_callback(lambda t: calls.append(("first", t.done())))
    assert not task.done() and task.set_running_or_notify_cancel()
    assert task.cancel() is False  # running
    task.set_result(7)
    assert task.done() and not task.cancelled() and task.result(0) == 7 and task.exception() is None
    task.add_done_callback(lambda t: calls.append(("late", t.result())))  # done: runs at once
    assert calls == [("first", True), ("late", 7)] and task.call is None

    failed = Task.finished(error=ZeroDivisionError("x"))
    with pytest.raises(ZeroDivisionError):
        failed.result()
    assert isinstance(failed.exception(), ZeroDivisionError)

    queued = Task(print, ("not run",))
    seen = []
    queued.add_done_callback(lambda t: seen.append(t.cancelled()))
    assert queued.cancel() and queued.cancel()  # a cancelled task stays cancelled
    assert seen == [True] and queued.call is None  # holds nothing once cancelled
    assert queued.set_running_or_notify_cancel() is False
    with pytest.raises(CancelledError):
        queued.result()
    with pytest.raises(TimeoutError):
        Task(print, ()).result(timeout_s=0.01)


def test_a_raising_callback_does_not_stop_the_others(caplog):
    task, seen = Task(), []
    task.add_done_callback(lambda t: 1 // 0)
    task.add_done_callback(lambda t: seen.append(t.result()))
    task.set_result("ok")
    assert seen == ["ok"] and "done-callback raised" in caplog.text


_STRESS = textwrap.dedent("""
    import faulthandler, os, random, signal, sys, threading, time, _thread
    faulthandler.dump_traceback_later(200, exit=True)  # a hang fails with every thread's stack, before the timeout
    import torch
    import flashpack
    path = sys.argv[1]
    backend = sys.argv[2]
    random.seed(int(sys.argv[3]))
    model = sys.argv[5] == "model"  # from_flashpack: the read runs on EarlyLoad's thread while __init__ runs

    class Net(torch.nn.Module, flashpack.FlashPackMixin):
        def __init__(self):
            super().__init__()
            for i in range(16):
                self.register_parameter(f"w{i}", torch.nn.Parameter(torch.empty(256, 1024)))
    interrupted = done = 0
    for i in range(int(sys.argv[4])):
        if i % 3 == 0:
            os.posix_fadvise(os.open(path, os.O_RDONLY), 0, 0, os.POSIX_FADV_DONTNEED)  # some cold-ish loads
        timer = threading.Timer(random.uniform(0, 0.006), os.kill, (os.getpid(), signal.SIGINT))
        try:
            timer.start()
            if model:
                sd = Net.from_flashpack(path, backend=backend).state_dict()
            else:
                sd = flashpack.load(path, backend=backend)
            done += 1
            timer.join()  # the one interrupt of this round lands inside this try at the latest
            time.sleep(0.002)
        except KeyboardInterrupt:
            interrupted += 1
        timer.join()
    sd = flashpack.load(path, backend=backend)
    assert all(torch.equal(sd[k], torch.full_like(sd[k], 3)) for k in sd)
    print("STRESS", interrupted, done)
""")


@pytest.mark.parametrize("how", ["load", "model"])
@pytest.mark.parametrize("backend", ["threads", "auto"])
def test_loads_interrupted_at_random_moments_never_hang(tmp_path, backend, how):
    """Interrupt (SIGINT, as Ctrl-C) 150 loads of a small pack at random moments, cached and not: each load either
    returns or raises KeyboardInterrupt, the reader closes, and a last load is right. Before the readers used
    :mod:`flashpack.io.sync`, an interrupt inside a lock held by Python code hung such a run now and then (one in
    hundreds of loads); a hang fails here by the timeout. ``model``: ``from_flashpack``, whose read runs on
    :class:`flashpack.deserialization.EarlyLoad`'s thread while the model is built."""
    import torch

    import flashpack

    path = str(tmp_path / "m.flashpack")
    flashpack.pack_to_file({f"w{i}": torch.full((256, 1024), 3, dtype=torch.float32) for i in range(16)}, path)
    env = dict(os.environ, PYTHONFAULTHANDLER="1")
    proc = subprocess.run([sys.executable, "-c", _STRESS, path, backend, "12", "150", how], capture_output=True, text=True,
                          timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    interrupted, done = map(int, proc.stdout.split("STRESS")[1].split())
    assert interrupted > 0 and interrupted + done >= 150, proc.stdout


def test_bell_rings_once_until_heard_and_times_out():
    from flashpack.io.sync import Bell

    bell = Bell()
    assert bell.wait(0) is False
    bell.ring()
    bell.ring()  # a second ring before the wait is absorbed, not an error
    assert bell.wait(0) is True and bell.wait(0.02) is False
    heard = []
    waiter = threading.Thread(target=lambda: heard.append(bell.wait(10)))
    waiter.start()
    bell.ring()
    waiter.join(10)
    assert heard == [True]


def test_a_task_cancelled_without_its_latch_set_is_done_for_wait():
    """An interrupt inside ``Task.cancel`` after the state changed but before the latch was set (what the review
    provoked) leaves a cancelled task whose latch never opens; ``wait()`` without a timeout, as the reader's close
    calls it, must still return."""
    from flashpack.io import sync

    task = Task(print, ())
    with task._guard:
        task._state = sync._CANCELLED  # the state cancel() sets before its latch
    returned = []
    waiter = threading.Thread(target=lambda: returned.append(task.wait()), daemon=True)
    waiter.start()
    waiter.join(10)
    assert returned == [True] and not task._done.is_set()


_CANCEL_INTERRUPTED = textwrap.dedent("""
    import faulthandler, os, sys
    import torch, flashpack
    from flashpack.io import sync
    from flashpack.io.sync import Task
    path = sys.argv[1]
    SET_LINE = next(i for i, l in enumerate(open(sync.__file__), 1) if "self._done.set()" in l)
    fired = False
    def tracer(frame, event, arg):
        if frame.f_code is Task.cancel.__code__ and frame.f_back.f_code.co_name == "<genexpr>":  # _run_one_here
            def local(frame, event, arg):
                global fired
                if event == "line" and frame.f_lineno == SET_LINE and not fired:
                    fired = True
                    sys.settrace(None)
                    raise KeyboardInterrupt("simulated SIGINT")
                return local
            return local
        return None
    faulthandler.dump_traceback_later(60, exit=True)
    for attempt in range(20):
        fd = os.open(path, os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)
        sys.settrace(tracer)
        try:
            flashpack.load(path, backend="threads")
        except KeyboardInterrupt:
            pass
        sys.settrace(None)
        if fired:
            break
    print("FIRED", fired)
""")


def test_an_interrupt_inside_a_tasks_cancel_does_not_hang_the_close(tmp_path):
    """The review's reproduction: a KeyboardInterrupt raised inside the ``Task.cancel`` that the loading thread makes
    to run a queued task itself (``ThreadsReader._run_one_here``), before the task's latch is set; the reader's
    close then waited on that task forever (a hang, killed here by faulthandler after 60 s)."""
    import torch

    import flashpack

    path = str(tmp_path / "m.flashpack")
    flashpack.pack_to_file({f"w{i}": torch.randn(256, 1024) for i in range(16)}, path)
    proc = subprocess.run([sys.executable, "-c", _CANCEL_INTERRUPTED, path], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if "FIRED True" not in proc.stdout:
        pytest.skip("no load took a queued task back in 20 cold loads (the interrupt point was never reached)")


def test_prefetcher_close_never_returns_while_a_helper_cut_short_by_an_interrupt_runs(tmp_path, monkeypatch):
    """A KeyboardInterrupt raised right after ``_thread.start_new_thread`` returned (a SIGINT that arrived while the
    thread was created): close() either waits for the helper or abandons it before it runs, never returns while it
    runs, so it never works on an unmapped range or a closed descriptor (found by review), and never waits forever
    (the stress test below found that)."""
    import _thread

    import flashpack.io.pagecache as pc

    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(1 << 20))
    real_start, real_run, began, finished = _thread.start_new_thread, pc.Prefetcher._run, [], []

    def start(fn, args):
        real_start(fn, args)
        raise KeyboardInterrupt("after the thread was created")

    def run(self):
        began.append(time.monotonic())
        time.sleep(0.05)  # still running when close() is called
        try:
            real_run(self)
        finally:
            finished.append(time.monotonic())

    monkeypatch.setattr(_thread, "start_new_thread", start)
    monkeypatch.setattr(pc.Prefetcher, "_run", run)
    fd = os.open(path, os.O_RDONLY)
    try:
        for delay_s in (0.0, 0.02):  # close before the thread could run (abandoned), and after it began (waited)
            began.clear(), finished.clear()
            p = pc.Prefetcher(fd, 1 << 20)
            with pytest.raises(KeyboardInterrupt):
                p.add(0, 4096)
            time.sleep(delay_s)
            p.close()
            assert len(began) == len(finished), "close() returned while the helper thread still ran"
            seen = len(began)
            time.sleep(0.1)
            assert len(began) == seen, "an abandoned helper ran after close()"
            if delay_s:
                assert seen == 1
    finally:
        os.close(fd)


def test_file_handles_close_their_descriptors_when_the_prefetcher_close_is_interrupted(tmp_path, monkeypatch):
    """An interrupt while the prefetcher stops still unmaps and closes every descriptor (they leaked, found by a
    review's stress of interrupted loads)."""
    import flashpack.io.pagecache as pc
    from flashpack.io.base import FileHandles

    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(1 << 20))
    real_close = pc.Prefetcher.close

    def close(self):
        real_close(self)
        raise KeyboardInterrupt("while the prefetcher stopped")

    monkeypatch.setattr(pc.Prefetcher, "close", close)
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    pc.drop_from_cache(str(path))  # not cached: read_ahead starts the prefetcher
    files = FileHandles(str(path), direct="off", cache="keep")
    files.read_ahead(0, 1 << 20).wait(10)
    fd = files.fd
    with pytest.raises(KeyboardInterrupt):
        files.close()
    assert files.fd == -1
    with pytest.raises(OSError):
        os.fstat(fd)


def test_helper_thread_joins_after_the_function_returns_or_raises(monkeypatch):
    import _thread

    from flashpack.io.sync import HelperThread, Latch

    gate, seen = Latch(), []

    def work(tag):
        assert gate.wait(10)
        seen.append(tag)

    helper = HelperThread()
    helper.start(work, ("ran",))
    assert helper.running() and helper.join(0.05) is False  # still waiting on the gate
    gate.set()
    assert helper.join(10) and seen == ["ran"] and not helper.running()

    def fail():
        raise ValueError("boom")

    reported = Latch()  # _thread hands the thread's error to sys.unraisablehook, after the latch was set
    monkeypatch.setattr(sys, "unraisablehook", lambda u: reported.set() if isinstance(u.exc_value, ValueError) else None)
    failed = HelperThread()
    failed.start(fail)
    assert failed.join(10) and reported.wait(10)

    def refuse(fn, args):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(_thread, "start_new_thread", refuse)
    never = HelperThread()
    with pytest.raises(RuntimeError, match="can't start"):
        never.start(work, ("no",))
    assert never.join(0) is True and seen == ["ran"]


def test_helper_thread_cut_short_by_an_interrupt_is_abandoned_not_waited_for_forever():
    """What the interrupted-loads stress test hit (about one run in 40 before the fix): an interrupt before
    ``start_new_thread`` (no thread at all), or after it returned but before ``start`` recorded the launch (a thread
    that has not run yet). ``join`` must return at once in both cases, and an abandoned thread must not run ``fn``."""
    import _thread

    from flashpack.io.sync import HelperThread

    ran = []
    before = HelperThread()  # interrupted before start_new_thread: start() never ran
    assert before.join(None) is True and before.exited.is_set() and not before.running()

    unrecorded = HelperThread()  # launched, the record (start's second line) cut short
    hold = _thread.allocate_lock()
    hold.acquire()
    end = _thread.allocate_lock()
    end.acquire()
    _thread.start_new_thread(lambda: (hold.acquire(), unrecorded._run(ran.append, ("abandoned ran",)), end.release()), ())
    assert unrecorded.join(None) is True  # without the abandon this waited for the thread's end
    hold.release()  # now let the thread run: it finds itself abandoned
    assert end.acquire(True, 10) and ran == []

    started = HelperThread()  # the thread already marked itself started: join waits for fn
    gate = _thread.allocate_lock()
    gate.acquire()
    _thread.start_new_thread(started._run, (lambda: (gate.acquire(), ran.append("started ran")), ()))
    deadline = time.monotonic() + 10
    while started._state == 0 and time.monotonic() < deadline:  # _NEW
        time.sleep(0.001)
    assert started.join(0.05) is False
    gate.release()
    assert started.join(10) is True and ran == ["started ran"]


def test_gate_close_waits_for_running_tasks_and_skips_later_ones():
    """:class:`flashpack.io.sync.Gate`: what the staged loads close before they free a slot or a window, so that a task
    a KeyboardInterrupt kept them from recording cannot read freed memory."""
    from flashpack.io.sync import Gate

    gate, release, ran = Gate(), Latch(), []
    started = Latch()

    def slow(tag):
        started.set()
        assert release.wait(10)
        ran.append(tag)
        return tag

    task = gate.wrap(slow)
    waiter = threading.Thread(target=lambda: ran.append(("result", task("first"))))
    waiter.start()
    assert started.wait(10)
    assert gate.close(0.05) is False  # still running
    assert gate.wrap(slow)("late") is None  # closed: skipped without running
    release.set()
    assert gate.close(10) is True and gate.close(0) is True  # idempotent
    waiter.join(10)
    assert ran == ["first", ("result", "first")]
    assert Gate().close(0) is True  # nothing ever ran


def test_named_pools_are_kept_per_purpose_and_size_and_wait_all_reports_the_first_error():
    from flashpack.io.threads import named_pool, shared_pool, wait_all

    verify = named_pool("verify", 2)
    assert named_pool("verify", 2) is verify and named_pool("verify", 3) is not verify
    assert named_pool("window", 2) is not verify and verify is not shared_pool()
    with pytest.raises(ValueError):
        named_pool("verify", 0)

    gate, order = Latch(), []

    def work(i):
        assert gate.wait(10)
        order.append(i)
        if i in (1, 2):
            raise ValueError(f"task {i}")
        return i

    tasks = [verify.submit(work, i) for i in range(4)]
    gate.set()
    error = wait_all(tasks)
    assert isinstance(error, ValueError) and str(error) == "task 1"  # the first in order, not in time
    assert all(t.done() for t in tasks) and sorted(order) == [0, 1, 2, 3]
    assert wait_all([verify.submit(work, 0)]) is None


def test_a_pool_submit_interrupted_inside_its_lock_never_counts_a_thread_that_does_not_exist():
    """A Ctrl-C that arrives while ``ReadPool.submit`` waits for the pool's lock is raised at the first signal check
    once it has the lock (found by review, with this same trick: another thread holds the lock and trips the signal).
    Counting the new thread before starting it left a pool of one thread counting a thread that never started: the
    kept hashing pools (``named_pool``) then ran nothing again and every later verified GPU load hung."""
    import _thread

    from flashpack.io.threads import ReadPool

    pool = ReadPool(1)

    def holder():
        with pool._lock:
            time.sleep(0.2)  # the main thread now waits in submit() for the lock
            _thread.interrupt_main()  # the signal's flag only: the waiting acquire is not woken
            time.sleep(0.05)

    t = threading.Thread(target=holder)
    t.start()
    time.sleep(0.05)
    try:
        pool.submit(print, "maybe")
    except KeyboardInterrupt:
        pass
    t.join(10)
    assert pool._threads <= len(os.listdir("/proc/self/task"))
    assert pool.submit(lambda: "ran").result(timeout_s=5) == "ran"


def test_run_to_end_reruns_a_cleanup_step_after_every_interrupt_and_returns_the_first():
    from flashpack.io.sync import run_to_end

    calls = []

    def step():
        calls.append(1)
        if len(calls) <= 2:  # two quick Ctrl-Cs: re-running once (as before) skipped the rest of the cleanup
            raise KeyboardInterrupt(f"ctrl-c {len(calls)}")

    first = run_to_end(step)
    assert len(calls) == 3 and isinstance(first, KeyboardInterrupt) and str(first) == "ctrl-c 1"
    assert run_to_end(lambda: None) is None
    with pytest.raises(ValueError):
        run_to_end(lambda: int("x"))  # other errors are the step's own


def test_prefetcher_close_interrupted_while_joining_still_waits_for_the_helper_and_unmaps(tmp_path, monkeypatch):
    """Found by review: an interrupt in the helper's join left the helper running while the caller closed the
    descriptor it reads ahead on, and the file's mapping was never unmapped. close() now joins to the end, unmaps,
    then raises the interrupt."""
    import flashpack.io.pagecache as pc
    from flashpack.io import sync

    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(1 << 20))
    real_join, joins = sync.HelperThread.join, []

    def join(self, timeout_s=None):
        joins.append(1)
        if len(joins) == 1:
            raise KeyboardInterrupt("in join")
        return real_join(self, timeout_s)

    monkeypatch.setattr(sync.HelperThread, "join", join)
    fd = os.open(path, os.O_RDONLY)
    try:
        p = pc.Prefetcher(fd, 1 << 20)
        p.add(0, 1 << 20)
        helper = p._helper
        with pytest.raises(KeyboardInterrupt, match="in join"):
            p.close()
        assert len(joins) == 2 and helper.exited.is_set() and p._addr == 0
    finally:
        os.close(fd)


def test_deferred_interrupts_hold_ctrl_c_back_until_a_check_or_the_end():
    """:class:`flashpack.io.sync.DeferredInterrupts`, what ``flashpack.load`` runs under: a Ctrl-C during the block
    raises nothing there (no cleanup can be cut short); :meth:`check` raises it once; otherwise the block's end re-sends
    it to the program's handler, once."""
    import signal

    from flashpack.io.sync import DeferredInterrupts

    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt):
        with DeferredInterrupts() as held:
            assert held.active
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # plenty of signal checks: nothing is raised here
                len("x")
            assert held.pending
            reached_end = True
    assert reached_end and signal.getsignal(signal.SIGINT) is signal.default_int_handler

    with pytest.raises(KeyboardInterrupt):
        with DeferredInterrupts() as held:
            held.check()  # nothing pending: returns
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            try:
                held.check()
            except KeyboardInterrupt:
                held.check()  # raised once only: the cleanup's own checks pass
                raise
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    with pytest.raises(KeyboardInterrupt):  # nested (assign_from_file calling load): one record, one delivery
        with DeferredInterrupts() as outer:
            with DeferredInterrupts() as inner:
                assert inner.active
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.01)
            assert outer.pending  # the inner block's end delivers nothing
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    with DeferredInterrupts() as held:
        pass
    assert not held.pending  # no Ctrl-C: nothing raised at the end


def test_deferred_interrupts_leave_the_programs_own_handler_and_other_threads_alone():
    import signal

    from flashpack.io.sync import DeferredInterrupts

    seen = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:  # the program's own handler (found by review: it was bypassed, the load raised KeyboardInterrupt)
        with DeferredInterrupts() as held:
            assert not held.active
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            assert seen == [signal.SIGINT]  # at once, its business
            held.check()  # never raises for it
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # nohup, background jobs: ignored means ignored
        with DeferredInterrupts() as held:
            assert not held.active
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            held.check()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)

    states = []

    def worker():
        with DeferredInterrupts() as held:
            states.append((held.active, signal.getsignal(signal.SIGINT) is signal.default_int_handler))

    t = threading.Thread(target=worker)
    t.start()
    t.join(10)
    assert states == [(False, True)]


def test_a_load_interrupted_by_ctrl_c_stops_at_its_next_extent_and_raises_after_cleaning_up(tmp_path):
    """Ctrl-C during ``flashpack.load``: the load stops at the next finished extent (not at the end), raises
    KeyboardInterrupt once its cleanup ran, and the process's handler is back."""
    import signal

    import torch

    import flashpack

    path = str(tmp_path / "m.flashpack")
    flashpack.pack_to_file({f"w{i}": torch.full((1024, 1024), i, dtype=torch.float32) for i in range(32)}, path)
    calls = []

    def progress(done, total):
        calls.append(done)
        if len(calls) == 2:  # the first extent landed
            os.kill(os.getpid(), signal.SIGINT)

    whole = []
    flashpack.load(path, backend="threads", progress=lambda done, total: whole.append(done))
    assert len(whole) >= 4  # the start, then one call per finished extent (or batch of them)
    with pytest.raises(KeyboardInterrupt):
        flashpack.load(path, backend="threads", progress=progress)
    assert len(calls) == 2  # stopped at the next extent: its count never reached the callback
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    sd = flashpack.load(path)
    assert all(torch.equal(sd[f"w{i}"], torch.full((1024, 1024), i, dtype=torch.float32)) for i in range(32))
