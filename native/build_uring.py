"""cffi build script (API mode, out of line) for ``flashpack._uring``, the C shim over liburing in ``fp_uring.c``.

setup.py builds it when :func:`can_build` is true; otherwise flashpack installs without it and the
``uring`` backend reports why it is unavailable. Build by hand with ``python native/build_uring.py``
(writes ``_uring.*.so`` into flashpack/ when run from the repository root).

API mode (the C compiler sees liburing.h) is needed because liburing's prep/wait/cqe_seen helpers are
``static inline``: there is no symbol an ABI-mode ``dlopen`` could call.

Environment:
    FLASHPACK_NO_URING_BUILD=1   build without the extension even where liburing is present.
    CC, CFLAGS, LDFLAGS          the compiler and flags, as for any Python C extension.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sysconfig
import tempfile

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

#: The C surface Python sees: every function returns >= 0 or -errno (man-page comments in fp_uring.c).
CDEF = """
#define FP_DIRECT 1
#define FP_FIXED 2
#define FP_DONE_DIRECT_REFUSED 1
#define FP_DONE_SHORT 2
#define FP_SETUP_COOP_TASKRUN 1

struct fp_read {
    uint64_t tag;
    uint64_t file_offset;
    uint64_t nbytes;
    uint64_t addr;
    uint32_t flags;
    uint32_t buf_index;
};

struct fp_done {
    uint64_t tag;
    uint64_t nbytes_direct;
    uint64_t nbytes_buffered;
    uint64_t fail_offset;
    uint64_t fail_nbytes;
    int32_t error;
    uint32_t flags;
    int32_t direct_error;
};

struct fp_fault {
    int64_t max_res;
    int64_t direct_max_nbytes;
    int32_t direct_errno;
    int32_t err_errno;
    int64_t err_offset;
    int64_t eof_offset;
};

struct fp_ring_stats {
    uint64_t sqes;
    uint64_t resubmits;
    uint64_t enter_waits;
};

struct fp_ring;

int fp_ring_open(unsigned depth, unsigned setup_flags, struct fp_ring **out);
int fp_ring_set_files(struct fp_ring *r, int fd_direct, int fd_buffered, int register_files);
int fp_ring_buffers_init(struct fp_ring *r, unsigned nr);
int fp_ring_buffer_set(struct fp_ring *r, unsigned index, uint64_t addr, uint64_t nbytes);
int fp_ring_set_fault(struct fp_ring *r, const struct fp_fault *fault);
int fp_ring_submit(struct fp_ring *r, unsigned n, const struct fp_read *reqs);
int fp_ring_reap(struct fp_ring *r, unsigned min_done, int timeout_ms, struct fp_done *out, unsigned max_out);
int fp_ring_in_flight(const struct fp_ring *r);
int fp_ring_get_stats(const struct fp_ring *r, struct fp_ring_stats *out);
int fp_ring_close(struct fp_ring *r);
int fp_liburing_version(int *major, int *minor);
"""

_PROBE_C = "#include <liburing.h>\nint main(void) { struct io_uring r; return io_uring_queue_init(1, &r, 0) < -4096; }\n"


def _compiler() -> list[str]:
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    return shlex.split(cc)


def why_not() -> str:
    """Why the extension cannot be built here, or ``""`` when it can."""
    if os.environ.get("FLASHPACK_NO_URING_BUILD", "").strip() not in ("", "0"):
        return "FLASHPACK_NO_URING_BUILD is set"
    cc = _compiler()
    if not cc or shutil.which(cc[0]) is None:
        return f"no C compiler ({cc[0] if cc else 'CC'} not found); install gcc, then reinstall flashpack"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(_PROBE_C)
        cmd = [*cc, *shlex.split(os.environ.get("CFLAGS", "")), src, "-o", os.path.join(tmp, "probe"),
               *shlex.split(os.environ.get("LDFLAGS", "")), "-luring"]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as e:
            return f"cannot run the C compiler: {e}"
    if res.returncode != 0:
        what = "liburing.h not found" if "liburing.h" in res.stderr else "cannot link with -luring"
        return (f"{what}; install liburing-dev (Debian/Ubuntu) or liburing-devel (Fedora), then reinstall "
                f"flashpack ({res.stderr.strip().splitlines()[-1] if res.stderr.strip() else 'compiler failed'})")
    return ""


def can_build() -> bool:
    """True when a C compiler and liburing (header and library) are present and the build is not disabled."""
    return why_not() == ""


ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "flashpack._uring",
    '#include "fp_uring.c"',  # one translation unit: the shim and cffi's wrappers
    include_dirs=[HERE],
    libraries=["uring"],
    extra_compile_args=["-O2", "-Wall"],
    depends=[os.path.join(HERE, "fp_uring.c")],
)

if __name__ == "__main__":
    print(why_not() or "liburing found; building flashpack._uring")
    ffibuilder.compile(tmpdir=os.path.join(HERE, "..", "build", "cffi"), verbose=True)
