"""Every ``FLASHPACK_*`` environment variable, read in this one place.

==============================  ===========  ==========================================================
variable                        default      meaning
==============================  ===========  ==========================================================
``FLASHPACK_BACKEND``           ``auto``     reader backend: ``auto``, ``uring`` or ``threads``
                                             (``auto``: ``threads`` for a file wholly in the page
                                             cache, else ``uring`` where io_uring runs)
``FLASHPACK_VERIFY``            ``1``        verify payload checksums on load (``0`` to skip)
``FLASHPACK_DIRECT``            ``auto``     O_DIRECT policy: ``auto`` (direct when the pages are not
                                             cached), ``on`` (always direct), ``off`` (always buffered)
``FLASHPACK_QUEUE_DEPTH``       ``32``       reads in flight per reader, every backend (1 to
                                             ``MAX_QUEUE_DEPTH``, 4096)
``FLASHPACK_THREADS``           ``16``       worker threads of the ``threads`` backend (and of
                                             ``uring``'s copies out of the page cache)
``FLASHPACK_EXTENT_NBYTES``     8 MiB        bytes per read request (a multiple of 4096)
``FLASHPACK_SLOT_NBYTES``       64 MiB       bytes per pinned staging slot (GPU loads)
``FLASHPACK_NUM_SLOTS``         ``4``        staging slots per GPU load
``FLASHPACK_PINNED_CAP_NBYTES`` 1 GiB        most pinned host memory one load may hold
``FLASHPACK_DISTRIBUTED``       ``0``        ``1``: use the default process group when initialised
``FLASHPACK_DEBUG``             ``0``        ``1``: the CLI prints tracebacks
``FLASHPACK_URING_BUFFERS``     ``0``        ``1``: ``uring`` registers destination buffers (READ_FIXED);
                                             pins them, counted against RLIMIT_MEMLOCK
``FLASHPACK_URING_FILES``       ``1``        ``uring`` registers the file's descriptors with the ring
``FLASHPACK_HUGE_PAGES``        ``auto``     host load destinations in transparent huge pages (pre-faulted
                                             ahead of O_DIRECT reads, faulted by the copies of ``keep``
                                             loads): ``on``, ``auto`` (when free 2 MiB blocks cover twice
                                             the load, /proc/buddyinfo, and the machine does not report
                                             free pages to a hypervisor), ``off`` (4 KiB pages: torch's
                                             allocator, or the userfaultfd fill)
``FLASHPACK_USERFAULTFD``       ``1``        fill fresh host destinations of ``keep`` loads with userfaultfd's
                                             ``UFFDIO_COPY`` straight from the page cache (no zeroed page
                                             and no fault per 4 KiB; falls back by itself where the kernel
                                             or a seccomp filter refuses); ``0``: never
                                             (:mod:`flashpack.io.uffd`)
``FLASHPACK_PROGRESS``          ``1``        ``0``: no tqdm bar for loads and saves over 1 GiB (a bar is
                                             shown only when stderr is a terminal)
``FLASHPACK_CACHE``             ``auto``     page-cache policy of a load: ``keep`` (read through the page
                                             cache, readahead ahead of the copies, so the next load is
                                             served from it), ``bypass`` (O_DIRECT, leaves nothing
                                             cached), ``auto`` (``keep`` when the bytes read are at most
                                             ``CACHE_KEEP_FRACTION`` (50%) of MemAvailable, else
                                             ``bypass``); see :mod:`flashpack.io.pagecache`
==============================  ===========  ==========================================================

Build time only (read by ``native/build_uring.py``, not here): ``FLASHPACK_NO_URING_BUILD=1`` installs
without the io_uring extension.

Sizes accept plain byte counts or a ``K``/``M``/``G`` suffix (powers of 1024): ``FLASHPACK_SLOT_NBYTES=16M``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import SettingsError

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

#: Alignment of O_DIRECT offsets, lengths and buffer addresses, and of every block in a pack.
#: 4096 covers the logical block size of every common device (see open(2), "O_DIRECT").
PAGE_NBYTES = 4096

#: The most reads one reader keeps in flight (``FLASHPACK_QUEUE_DEPTH``, the ``queue_depth`` option): the
#: io_uring shim's ``FP_MAX_QUEUE_DEPTH`` (native/fp_uring.h). Written here too so settings work without
#: the extension; native/build_uring.py refuses to build when the two differ.
MAX_QUEUE_DEPTH = 4096

#: ``FLASHPACK_CACHE`` and the ``cache=`` argument of :func:`flashpack.load`.
CACHE_POLICIES = ("auto", "keep", "bypass")


def parse_nbytes(text: str) -> int:
    """Parse ``"123"``, ``"64K"``, ``"16M"``, ``"2G"`` (powers of 1024) into a byte count.

    Raises:
        ValueError: the text is not a non-negative size.
    """
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": KiB, "M": MiB, "G": GiB}.get(t[-1:], 1)
    if mult != 1:
        t = t[:-1]
    try:
        value = int(t) * mult
    except ValueError:
        raise ValueError(f"not a byte count: {text!r} (use e.g. 4096, 64K, 16M, 2G)") from None
    if value < 0:
        raise ValueError(f"byte count must be >= 0, got {text!r}")
    return value


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default).strip()


def _env_bool(name: str, default: bool) -> bool:
    v = _env(name, "1" if default else "0").lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise SettingsError(f"{name}={v!r}: expected 0 or 1")


@dataclass(frozen=True)
class Settings:
    backend: str
    verify: bool
    direct: str
    queue_depth: int
    threads: int
    extent_nbytes: int
    slot_nbytes: int
    num_slots: int
    pinned_cap_nbytes: int
    distributed: bool
    debug: bool
    uring_buffers: bool = False
    uring_files: bool = True
    huge_pages: str = "auto"
    progress: bool = True
    cache: str = "auto"
    userfaultfd: bool = True


def settings() -> Settings:
    """Read the environment now (cheap; callers read it once per load).

    Raises:
        SettingsError (a ``ValueError``): a variable holds a value of the wrong form; the message names it.
    """
    def size(name: str, default: str) -> int:
        try:
            return parse_nbytes(_env(name, default))
        except ValueError as e:
            raise SettingsError(f"{name}: {e}") from None

    def count(name: str, default: int, most: int = 4096) -> int:
        v = _env(name, str(default))
        try:
            n = int(v)
        except ValueError:
            n = 0
        if not 1 <= n <= most:
            raise SettingsError(f"{name}={v!r}: expected an integer from 1 to {most}")
        return n

    direct = _env("FLASHPACK_DIRECT", "auto").lower()
    if direct not in ("auto", "on", "off"):
        raise SettingsError(f"FLASHPACK_DIRECT={direct!r}: expected auto, on or off")
    extent = size("FLASHPACK_EXTENT_NBYTES", "8M")
    if extent < PAGE_NBYTES or extent % PAGE_NBYTES:
        raise SettingsError(f"FLASHPACK_EXTENT_NBYTES={extent}: must be a positive multiple of {PAGE_NBYTES}")
    slot = size("FLASHPACK_SLOT_NBYTES", "64M")
    if slot < PAGE_NBYTES or slot % PAGE_NBYTES:
        raise SettingsError(f"FLASHPACK_SLOT_NBYTES={slot}: must be a positive multiple of {PAGE_NBYTES}")
    huge = _env("FLASHPACK_HUGE_PAGES", "auto").lower()
    if huge not in ("auto", "on", "off"):
        raise SettingsError(f"FLASHPACK_HUGE_PAGES={huge!r}: expected auto, on or off")
    cache = _env("FLASHPACK_CACHE", "auto").lower()
    if cache not in CACHE_POLICIES:
        raise SettingsError(f"FLASHPACK_CACHE={cache!r}: expected auto, keep or bypass")
    return Settings(
        backend=_env("FLASHPACK_BACKEND", "auto").lower() or "auto",
        verify=_env_bool("FLASHPACK_VERIFY", True),
        direct=direct,
        queue_depth=count("FLASHPACK_QUEUE_DEPTH", 32, most=MAX_QUEUE_DEPTH),
        threads=count("FLASHPACK_THREADS", 16),
        extent_nbytes=extent,
        slot_nbytes=slot,
        num_slots=count("FLASHPACK_NUM_SLOTS", 4),
        pinned_cap_nbytes=size("FLASHPACK_PINNED_CAP_NBYTES", "1G"),
        distributed=_env_bool("FLASHPACK_DISTRIBUTED", False),
        debug=_env_bool("FLASHPACK_DEBUG", False),
        uring_buffers=_env_bool("FLASHPACK_URING_BUFFERS", False),
        uring_files=_env_bool("FLASHPACK_URING_FILES", True),
        huge_pages=huge,
        progress=_env_bool("FLASHPACK_PROGRESS", True),
        cache=cache,
        userfaultfd=_env_bool("FLASHPACK_USERFAULTFD", True),
    )


#: Bytes per unit of a Hugging Face size string (``transformers.utils.convert_file_size_to_int``): decimal
#: ``KB``/``MB``/``GB``/``TB``, binary ``KiB``/``MiB``/``GiB``/``TiB``.
_HF_UNITS = {"TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10,
             "TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}


def parse_shard_size(value: int | str | None) -> int | None:
    """A shard size limit in bytes from an int or a Hugging Face size string (``"20GB"`` = 20 * 10^9 bytes,
    ``"5GiB"`` = 5 * 2^30, ``"500MB"``, ``"4096"``), as ``max_shard_size`` takes it; ``None`` stays ``None``.

    Raises:
        ValueError: not a positive size (the message shows the accepted forms).
    """
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, str):
        t = value.strip().upper().replace(" ", "")
        unit = next((u for u in _HF_UNITS if t.endswith(u)), "")
        num = t[: len(t) - len(unit)] if unit else t
        try:
            n = int(float(num) * _HF_UNITS.get(unit, 1))
        except ValueError:
            n = -1
    else:
        n = -1
    if n <= 0:
        raise ValueError(f"max shard size {value!r}: expected a positive number of bytes or a size such as "
                         f"'20GB' (10^9 bytes), '5GiB' (2^30 bytes), '500MB'")
    return n
