"""cffi build script (API mode, out of line) for ``flashpack._uring``, the C shim over liburing.

The C surface is declared once, in ``fp_uring.h``; :func:`cdef_from_header` turns that header into the
cffi ``cdef`` (preprocessor lines dropped, ``#define FP_NAME value`` kept as a constant the compiler
fills in), and ``fp_uring.c`` and ``fp_copy.c`` (one extent copied and hashed in one call; it needs the
xxhash library's header, ``libxxhash-dev``, and compiles to a stub answering ``-ENOSYS`` without it) are
compiled as their own translation units (``sources=[...]``).

setup.py builds it when :func:`can_build` is true; otherwise flashpack installs without it and the
``uring`` backend reports why it is unavailable. Build by hand, from the repository root, with
``python setup.py build_ext --inplace`` (writes ``flashpack/_uring.abi3.so``), or
``python native/build_uring.py``, which compiles in ``build/cffi/`` and writes
``flashpack/_uring.abi3.so`` (the name cffi gives it) next to the package's modules.

API mode (the C compiler sees liburing.h) is needed because liburing's prep/wait/cqe_seen helpers are
``static inline``: there is no symbol an ABI-mode ``dlopen`` could call.

The tests build a second copy with ``-DFP_TESTING`` (fault injection) into a temporary directory with
:func:`build_testing_module`; it is never installed.

Environment:
    FLASHPACK_NO_URING_BUILD=1   build without the extension even where liburing is present.
    CC, CFLAGS, LDFLAGS          the compiler and flags, as for any Python C extension.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sysconfig
import tempfile

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = os.path.join(HERE, "fp_uring.h")
SOURCE = os.path.join(HERE, "fp_uring.c")
#: The Python side of the queue-depth bound (``MAX_QUEUE_DEPTH``), checked against the header's.
SETTINGS_PY = os.path.join(HERE, "..", "flashpack", "settings.py")

_PROBE_C = "#include <liburing.h>\nint main(void) { struct io_uring r; return io_uring_queue_init(1, &r, 0) < -4096; }\n"
_DEFINE = re.compile(r"^#\s*define\s+(FP_[A-Z0-9_]+)\s+(\S+)")


def header_text() -> str:
    with open(HEADER, encoding="utf-8") as f:
        return f.read()


def cdef_from_header(text: str, testing: bool = False) -> str:
    """The cffi cdef for the header ``text``.

    Drops every preprocessor line, keeps ``#define FP_NAME value`` as ``#define FP_NAME ...`` (API mode:
    the compiler supplies the value, so Python and C cannot disagree), and drops the ``#ifdef
    FP_TESTING`` block unless ``testing``.

    Raises:
        ValueError: an ``#ifdef``/``#ifndef``/``#endif`` nesting the parser does not understand.
    """
    out: list[str] = []
    skipping: list[bool] = []  # one entry per open #if*: whether its body is dropped
    for line in text.splitlines():
        s = line.strip()
        if not s.startswith("#"):
            if not any(skipping):
                out.append(line)
            continue
        if s.startswith(("#ifdef", "#ifndef", "#if ")):
            skipping.append(s.split()[:2] == ["#ifdef", "FP_TESTING"] and not testing)
        elif s.startswith("#endif"):
            if not skipping:
                raise ValueError("fp_uring.h: #endif without #if")
            skipping.pop()
        elif not any(skipping):
            m = _DEFINE.match(s)
            if m:
                out.append(f"#define {m.group(1)} ...")
    if skipping:
        raise ValueError("fp_uring.h: unterminated #if")
    return "\n".join(out) + "\n"


def header_constant(name: str, text: str | None = None) -> int:
    """The integer value of ``#define name value`` in fp_uring.h.

    Raises:
        KeyError: the header does not define ``name`` as an integer.
    """
    for line in (header_text() if text is None else text).splitlines():
        m = _DEFINE.match(line.strip())
        if m and m.group(1) == name:
            return int(m.group(2), 0)
    raise KeyError(f"fp_uring.h defines no integer {name}")


def settings_max_queue_depth(path: str = SETTINGS_PY) -> int:
    """``MAX_QUEUE_DEPTH`` of flashpack/settings.py, read with ``ast`` (the package is not imported)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
        if isinstance(target, ast.Name) and target.id == "MAX_QUEUE_DEPTH":
            return ast.literal_eval(node.value)
    raise KeyError(f"{path} defines no MAX_QUEUE_DEPTH")


def check_queue_depth_bound() -> None:
    """Raise unless ``FP_MAX_QUEUE_DEPTH`` (fp_uring.h) equals ``MAX_QUEUE_DEPTH`` (flashpack/settings.py).

    Raises:
        RuntimeError: they differ (the message names both files); skipped when settings.py is absent.
    """
    if not os.path.exists(SETTINGS_PY):
        return
    c, py = header_constant("FP_MAX_QUEUE_DEPTH"), settings_max_queue_depth()
    if c != py:
        raise RuntimeError(f"FP_MAX_QUEUE_DEPTH is {c} in native/fp_uring.h but MAX_QUEUE_DEPTH is {py} in "
                           f"flashpack/settings.py; make them equal")


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


def make_ffibuilder(module_name: str = "flashpack._uring", testing: bool = False, relative: bool = True) -> FFI:
    """A cffi builder for the shim.

    Args:
        module_name: the extension's full name.
        testing: compile with ``-DFP_TESTING`` (fault injection) and expose ``fp_ring_set_fault``.
        relative: name the sources relative to the repository root (setuptools wants that when it runs
            from there); ``False`` for absolute paths (a build from any directory).
    """
    root = os.path.dirname(HERE)
    native = os.path.relpath(HERE, root) if relative else HERE
    ffi = FFI()
    ffi.cdef(cdef_from_header(header_text(), testing=testing))
    ffi.set_source(
        module_name,
        '#include "fp_uring.h"',
        sources=[os.path.join(native, "fp_uring.c"), os.path.join(native, "fp_copy.c")],
        include_dirs=[native],
        libraries=["uring"],
        define_macros=[("FP_TESTING", "1")] if testing else [],
        extra_compile_args=["-O2", "-Wall"],
        depends=[os.path.join(native, n) for n in ("fp_uring.h", "fp_uring.c", "fp_copy.c")],
        py_limited_api=True,
    )
    return ffi


def build_testing_module(tmpdir: str, module_name: str = "_fp_uring_testing"):
    """Compile the ``-DFP_TESTING`` shim into ``tmpdir`` and import it (for the tests; never installed).

    Returns:
        The imported module (``.ffi``, ``.lib`` with ``fp_ring_set_fault`` and ``struct fp_fault``).

    Raises:
        cffi.VerificationError / distutils errors: the compiler failed.
    """
    ffi = make_ffibuilder(module_name, testing=True, relative=False)
    path = ffi.compile(tmpdir=tmpdir, verbose=False)
    spec = importlib.util.spec_from_file_location(module_name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


check_queue_depth_bound()
ffibuilder = make_ffibuilder()

if __name__ == "__main__":
    print(why_not() or "liburing found; building flashpack._uring")
    root = os.path.dirname(HERE)
    so = make_ffibuilder(relative=False).compile(tmpdir=os.path.join(root, "build", "cffi"), verbose=True)
    dest = os.path.join(root, "flashpack", os.path.basename(so))
    shutil.copyfile(so, dest)
    print(f"wrote {dest}")
