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
    import os, random, signal, sys, threading, time, _thread
    import torch
    import flashpack
    path = sys.argv[1]
    backend = sys.argv[2]
    random.seed(int(sys.argv[3]))
    interrupted = done = 0
    for i in range(int(sys.argv[4])):
        if i % 3 == 0:
            os.posix_fadvise(os.open(path, os.O_RDONLY), 0, 0, os.POSIX_FADV_DONTNEED)  # some cold-ish loads
        timer = threading.Timer(random.uniform(0, 0.006), os.kill, (os.getpid(), signal.SIGINT))
        try:
            timer.start()
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


@pytest.mark.parametrize("backend", ["threads", "auto"])
def test_loads_interrupted_at_random_moments_never_hang(tmp_path, backend):
    """Interrupt (SIGINT, as Ctrl-C) 150 loads of a small pack at random moments, cached and not: each load either
    returns or raises KeyboardInterrupt, the reader closes, and a last load is right. Before the readers used
    :mod:`flashpack.io.sync`, an interrupt inside a lock held by Python code hung such a run now and then (one in
    hundreds of loads); a hang fails here by the timeout."""
    import torch

    import flashpack

    path = str(tmp_path / "m.flashpack")
    flashpack.pack_to_file({f"w{i}": torch.full((256, 1024), 3, dtype=torch.float32) for i in range(16)}, path)
    env = dict(os.environ, PYTHONFAULTHANDLER="1")
    proc = subprocess.run([sys.executable, "-c", _STRESS, path, backend, "12", "150"], capture_output=True, text=True,
                          timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    interrupted, done = map(int, proc.stdout.split("STRESS")[1].split())
    assert interrupted > 0 and interrupted + done >= 150, proc.stdout
