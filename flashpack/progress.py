"""Progress of long loads and saves: a ``progress=(bytes done, bytes total)`` callback for programs, and one
tqdm bar in bytes on a terminal.

The bar is shown only for work over :data:`BAR_MIN_NBYTES` (1 GiB), only when stderr is a terminal, and never
with ``FLASHPACK_PROGRESS=0``. A sharded pack gets one bar for all its shards.
"""

from __future__ import annotations

import sys
import threading
from typing import Callable

from .settings import GiB, Settings

#: Loads and saves of more bytes than this show a bar (on a terminal).
BAR_MIN_NBYTES = 1 * GiB

#: ``progress=`` callbacks: called with (bytes done, bytes total), done going from 0 up to total.
ProgressCallback = Callable[[int, int], None]


def want_bar(total_nbytes: int, cfg: Settings, stream=None) -> bool:
    """Whether a bar is shown: more than 1 GiB, ``FLASHPACK_PROGRESS`` on, and ``stream`` (stderr) a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        tty = bool(stream.isatty())
    except (AttributeError, ValueError):
        tty = False
    return total_nbytes > BAR_MIN_NBYTES and cfg.progress and tty


class Progress:
    """Counts bytes done of ``total_nbytes`` and reports them to ``callback`` and, when :func:`want_bar`
    says so, a tqdm bar. Thread-safe; :meth:`close` ends the bar (the callback gets the last count).

    Args:
        total_nbytes: bytes the work will do.
        callback: ``callback(done, total)`` or ``None``; called at start (0), on every :meth:`add`.
        cfg: the settings read once by the caller.
        desc: the bar's label (``"load model.flashpack"``).
        stop: ``None``, or called first on every :meth:`add` and may raise to stop the work there
            (:meth:`flashpack.io.sync.DeferredInterrupts.check`: a Ctrl-C held back during a load).
    """

    def __init__(self, total_nbytes: int, callback: ProgressCallback | None, cfg: Settings, desc: str = "",
                 stop: Callable[[], None] | None = None):
        self.total = int(total_nbytes)
        self.done = 0
        self._cb = callback
        self._stop = stop
        self._lock = threading.Lock()
        self._bar = None
        if want_bar(self.total, cfg):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                             leave=False, file=sys.stderr)
        if self._cb is not None:
            self._cb(0, self.total)

    @property
    def active(self) -> bool:
        """Whether anyone listens (a callback, a bar or a stop check): callers may skip the counting otherwise."""
        return self._cb is not None or self._bar is not None or self._stop is not None

    def add(self, nbytes: int) -> None:
        """``nbytes`` more are done (capped at the total).

        Raises:
            Whatever ``stop`` raises (KeyboardInterrupt), before counting.
        """
        if self._stop is not None:
            self._stop()
        with self._lock:
            step = max(0, min(nbytes, self.total - self.done))
            self.done += step
            done = self.done
            if self._bar is not None and step:
                self._bar.update(step)
        if self._cb is not None:
            self._cb(done, self.total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


__all__ = ["BAR_MIN_NBYTES", "Progress", "ProgressCallback", "want_bar"]
