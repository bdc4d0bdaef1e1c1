"""Build hook: compiles the optional io_uring shim (native/) with cffi in API mode.

If liburing's headers or a C compiler are missing, the package still installs without the
extension, and ``flashpack.backends()`` reports why ``uring`` is unavailable. The extension uses only
the stable ABI (``py_limited_api``), so the wheel is tagged ``abi3``.
"""

import os
import sys

from setuptools import setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "native"))

cffi_modules = []
options = {}
try:
    import build_uring  # noqa: F401  (native/build_uring.py)

    if build_uring.can_build():
        cffi_modules = ["native/build_uring.py:ffibuilder"]
        options = {"bdist_wheel": {"py_limited_api": "cp310"}}
    else:
        print(f"flashpack: building without the io_uring extension: {build_uring.why_not()}", file=sys.stderr)
except ImportError as e:  # pragma: no cover - cffi missing from the build environment
    print(f"flashpack: building without the io_uring extension: {e}", file=sys.stderr)

setup(cffi_modules=cffi_modules, options=options)
