"""fal's ``flashpack.commands``: convert to and revert from flashpack files in Python, with fal's names and
keywords, over this library's converter (:mod:`flashpack.tools.convert`) and reverter
(:mod:`flashpack.tools.revert`). The functions return the destination path, as fal's do.

Differences from fal, all towards safety: conversions are atomic, ``dtype`` casts floating tensors only
(fal casts every tensor), an existing destination is replaced (as fal does) but never the source.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Callable

from .deserialization import ignore_filter


def filter_kwargs_for_method(kwargs: dict[str, Any], method: Callable[..., Any]) -> dict[str, Any]:
    """The entries of ``kwargs`` that ``method`` accepts by name (all of them if it takes ``**kwargs``)."""
    params = inspect.signature(method).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return dict(kwargs)
    return {k: v for k, v in kwargs.items() if k in params}


def _filtered(state_dict, ignore_names, ignore_prefixes, ignore_suffixes):
    ignored = ignore_filter(ignore_names, ignore_prefixes, ignore_suffixes)
    out = {k: v for k, v in state_dict.items() if not ignored(k)}
    if not out:
        raise ValueError("every tensor matches the ignore_* filters; nothing to pack")
    return out


def _dtype(dtype):
    if isinstance(dtype, str):
        from .tools.convert import parse_dtype

        return parse_dtype(dtype)
    return dtype


def convert_to_flashpack_from_state_dict(state_dict, destination_path: str | os.PathLike, dtype=None,
                                         ignore_names: list[str] | None = None,
                                         ignore_prefixes: list[str] | None = None,
                                         ignore_suffixes: list[str] | None = None, silent: bool = True) -> str:
    """Pack a ``dict[str, Tensor]`` to ``destination_path`` (atomic).

    Args:
        dtype: a floating ``torch.dtype`` or its name (``"float16"``): cast floating tensors only.
        ignore_names, ignore_prefixes, ignore_suffixes: keys left out (:func:`flashpack.deserialization.ignore_filter`).
        silent: ``False`` prints a summary line.

    Returns:
        ``destination_path`` as a string.

    Raises:
        ValueError: nothing is left after the filters. Everything :func:`flashpack.pack_to_file` raises.
    """
    from .serialization import pack_to_file

    dst = os.fspath(destination_path)
    pack_to_file(_filtered(state_dict, ignore_names, ignore_prefixes, ignore_suffixes), dst, _dtype(dtype),
                 silent=silent)
    return dst


def convert_to_flashpack_from_model(model, destination_path: str | os.PathLike, dtype=None,
                                    ignore_names: list[str] | None = None, ignore_prefixes: list[str] | None = None,
                                    ignore_suffixes: list[str] | None = None, silent: bool = True) -> str:
    """Pack ``model.state_dict()`` (tied weights stored once) as :func:`convert_to_flashpack_from_state_dict`."""
    return convert_to_flashpack_from_state_dict(model.state_dict(), destination_path, dtype, ignore_names,
                                                ignore_prefixes, ignore_suffixes, silent)


def _convert(src, destination_path, dtype, ignore_names, ignore_prefixes, ignore_suffixes, silent, *,
             framework=None, subfolder=None, variant=None) -> str:
    from .tools.convert import convert

    ignored = None
    if ignore_names or ignore_prefixes or ignore_suffixes:
        ignored = ignore_filter(ignore_names, ignore_prefixes, ignore_suffixes)
    r = convert(os.fspath(src), None if destination_path is None else os.fspath(destination_path),
                subfolder=subfolder, variant=variant, dtype=dtype, framework=framework, force=True,
                progress=not silent, ignore=ignored)
    if not silent:
        print(f"flashpack: {r.dst}: {r.tensors} tensors, {r.aliases} aliases, {r.file_nbytes} bytes")
    return r.dst


def convert_to_flashpack_from_state_dict_file(path: str | os.PathLike, destination_path: str | os.PathLike | None = None,
                                              dtype=None, ignore_names: list[str] | None = None,
                                              ignore_prefixes: list[str] | None = None,
                                              ignore_suffixes: list[str] | None = None, silent: bool = True) -> str:
    """A ``.safetensors``/``.pt``/``.bin`` file -> a pack (default: next to it, ``.flashpack``). Returns the pack's path."""
    return _convert(path, destination_path, dtype, ignore_names, ignore_prefixes, ignore_suffixes, silent)


def convert_to_flashpack_from_diffusers_repo_id_or_dir(model_dir: str | os.PathLike, destination_path=None, dtype=None,
                                                       ignore_names=None, ignore_prefixes=None, ignore_suffixes=None,
                                                       silent: bool = True, **kwargs: Any) -> str:
    """A diffusers model folder or Hub repo (``subfolder=``, ``variant=`` in ``kwargs``) -> a pack."""
    return _convert(model_dir, destination_path, dtype, ignore_names, ignore_prefixes, ignore_suffixes, silent,
                    framework="diffusers", subfolder=kwargs.get("subfolder"), variant=kwargs.get("variant"))


def convert_to_flashpack_from_transformers_repo_id_or_dir(model_dir: str | os.PathLike, destination_path=None,
                                                          dtype=None, ignore_names=None, ignore_prefixes=None,
                                                          ignore_suffixes=None, silent: bool = True,
                                                          **kwargs: Any) -> str:
    """A transformers model folder or Hub repo (``subfolder=``, ``variant=`` in ``kwargs``) -> a pack (tied
    weights restored from ``config.json``)."""
    return _convert(model_dir, destination_path, dtype, ignore_names, ignore_prefixes, ignore_suffixes, silent,
                    framework="transformers", subfolder=kwargs.get("subfolder"), variant=kwargs.get("variant"))


def convert_to_flashpack(model_or_state_dict_or_path_or_repo_id, destination_path=None, dtype=None,
                         ignore_names: list[str] | None = None, ignore_prefixes: list[str] | None = None,
                         ignore_suffixes: list[str] | None = None, use_transformers: bool = False,
                         use_diffusers: bool = False, silent: bool = True, **kwargs: Any) -> str:
    """fal's one entry point: an ``nn.Module``, a state_dict, a weights file, a model folder or a Hub repo id ->
    a pack.

    Args:
        model_or_state_dict_or_path_or_repo_id: what to convert.
        destination_path: the pack; required for a module or a state_dict; default next to a file, or
            ``<folder>/model.flashpack`` for a folder.
        dtype: floating dtype (or its name) for floating tensors.
        ignore_names, ignore_prefixes, ignore_suffixes: keys left out.
        use_transformers, use_diffusers: which library's file names a folder or repo uses.
        silent: ``False`` prints progress and a summary.
        **kwargs: ``subfolder=``, ``variant=`` for folders and repos.

    Returns:
        The pack's path.

    Raises:
        TypeError: a module or state_dict without ``destination_path``. ``flashpack.tools.convert.UsageError``
        (``ValueError``): an unusable source.
    """
    src = model_or_state_dict_or_path_or_repo_id
    if not isinstance(src, (str, os.PathLike)):
        if destination_path is None:
            raise TypeError("convert_to_flashpack: destination_path is required for a module or a state_dict")
        if hasattr(src, "state_dict"):
            return convert_to_flashpack_from_model(src, destination_path, dtype, ignore_names, ignore_prefixes,
                                                   ignore_suffixes, silent)
        return convert_to_flashpack_from_state_dict(src, destination_path, dtype, ignore_names, ignore_prefixes,
                                                    ignore_suffixes, silent)
    framework = "diffusers" if use_diffusers else "transformers" if use_transformers else None
    return _convert(src, destination_path, dtype, ignore_names, ignore_prefixes, ignore_suffixes, silent,
                    framework=framework, subfolder=kwargs.get("subfolder"), variant=kwargs.get("variant"))


def revert_from_flashpack(path: str | os.PathLike, destination_path: str | os.PathLike | None = None,
                          silent: bool = True, *, format: str | None = None) -> str:
    """A pack -> ``.safetensors`` (default, ``model.flashpack`` -> ``model.safetensors``), ``.pt``, or with
    ``format="fal"`` fal's flashpack 0.4 layout (:func:`flashpack.tools.revert.write_fal`). Atomic; an existing
    destination is replaced, as in fal.

    Returns:
        The destination path.
    """
    from .tools.revert import revert

    r = revert(os.fspath(path), None if destination_path is None else os.fspath(destination_path), force=True,
               progress=not silent, format=format)
    if not silent:
        for note in r.notes:
            print(f"flashpack: note: {note}")
        print(f"flashpack: {r.dst}: {r.format}, {r.tensors} tensors, {r.file_nbytes} bytes")
    return r.dst


__all__ = ["convert_to_flashpack", "convert_to_flashpack_from_diffusers_repo_id_or_dir",
           "convert_to_flashpack_from_model", "convert_to_flashpack_from_state_dict",
           "convert_to_flashpack_from_state_dict_file", "convert_to_flashpack_from_transformers_repo_id_or_dir",
           "filter_kwargs_for_method", "revert_from_flashpack"]
