"""Shared fixtures: ``pack`` (pack into tmp_path) and ``backend`` (every reader backend, skipped with the
probe's reason where it cannot run). Plain helper functions live in ``tests/_helpers.py``.

Markers (registered in pyproject.toml): ``cuda`` (needs a CUDA device), ``uring`` (runs the io_uring
backend), ``slow`` (seconds, not milliseconds; deselect with ``-m "not slow"``).
"""

from __future__ import annotations

import pytest

import flashpack
import flashpack.io


@pytest.fixture
def pack(tmp_path):
    """``pack(model_or_state_dict, name="model.flashpack", *args, **kw) -> str``: pack into tmp_path."""

    def _pack(obj, name: str = "model.flashpack", *args, **kw) -> str:
        path = str(tmp_path / name)
        flashpack.pack_to_file(obj, path, *args, **kw)
        return path

    return _pack


@pytest.fixture(params=[pytest.param("uring", marks=pytest.mark.uring), "threads"])
def backend(request) -> str:
    """Each reader backend by name. One that cannot run here is skipped with the probe's reason (never
    dropped from the parameters), so a missing io_uring shows up in the test report."""
    info = flashpack.io.backend_info(request.param)
    if not info.available:
        pytest.skip(f"backend {request.param!r} unavailable: {info.reason}")
    return request.param
