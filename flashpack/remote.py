"""Hugging Face Hub repo ids -> local folders, through ``huggingface_hub.snapshot_download``.

The one place a *load* reaches the Hub: :func:`flashpack.load` (``flashpack.load("org/name")``) and the
transformers / diffusers mixins (:mod:`flashpack.integrations.hub` re-exports these functions). It sits low in the
layout (it needs only :mod:`flashpack.errors` and :mod:`flashpack.source`) so that :mod:`flashpack.deserialization`
may use it. ``huggingface_hub`` is imported inside the functions, at call time, so importing this module costs
nothing and tests patch ``huggingface_hub.snapshot_download`` on the module itself.
"""

from __future__ import annotations

import os
import posixpath
import re

from .errors import ModelNotFoundError
from .source import INDEX_SUFFIX, read_index, shards_for_keys

#: What ``flashpack.load`` takes for a Hub repo id: ``org/name`` (letters, digits, ``-``, ``_``, ``.``).
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
#: Suffixes that make a name a file, never a repo id (``models/x.flashpack`` that is missing is a missing file).
_FILE_SUFFIXES = (".flashpack", ".json", ".safetensors", ".pt", ".pth", ".bin")
#: The pack name the integrations (and fal's flashpack) write in a model folder.
_MODEL_PACK = "model.flashpack"


def is_repo_id(name: str | os.PathLike) -> bool:
    """Whether ``flashpack.load`` treats ``name`` as a Hub repo id: a string ``org/name`` that does not exist
    here (a local path always wins), whose first component is not a local folder, and that does not end with
    a file suffix (``.flashpack``, ``.json``, ``.safetensors``, ``.pt``, ``.pth``, ``.bin``).

    Args:
        name: what the caller passed as ``path``.

    Returns:
        True only for a string that can only be a repo id.
    """
    if not isinstance(name, str) or not _REPO_ID.fullmatch(name) or name.lower().endswith(_FILE_SUFFIXES):
        return False
    return not os.path.exists(name) and not os.path.isdir(name.split("/", 1)[0])


def looks_local(name_or_path: str) -> bool:
    """True for strings that can only be a file system path, never a Hub repo id (``/x``, ``./x``, ``~/x``,
    ``a/b/c``, a backslash, or an existing file)."""
    return (name_or_path.startswith(("/", ".", "~")) or "\\" in name_or_path or name_or_path.count("/") > 1
            or os.path.exists(name_or_path))


def resolve_folder(name_or_path: str | os.PathLike, *, allow_patterns: list[str], subfolder: str | None = None,
                   revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                   local_files_only: bool = False, token: str | bool | None = None, force_download: bool = False,
                   local_dir: str | os.PathLike | None = None, ignore_patterns: list[str] | None = None) -> str:
    """The local folder holding a model: ``name_or_path`` itself when it is a folder, else a snapshot of the Hub
    repo ``name_or_path`` limited to ``allow_patterns``; then ``subfolder`` inside it.

    Args:
        name_or_path: a local folder, or a Hub repo id (``"org/name"``).
        allow_patterns: file patterns relative to the repo root (``subfolder`` already included by the caller),
            passed to ``snapshot_download`` so only the config and pack files are fetched.
        subfolder, revision, cache_dir, local_files_only, token, force_download, local_dir, ignore_patterns: as
            for ``snapshot_download``; ignored for a local folder.

    Returns:
        The absolute path of the folder (``subfolder`` applied).

    Raises:
        ModelNotFoundError (``FileNotFoundError``): a local-looking path that does not exist, a repo that is not
            cached while ``local_files_only=True`` (or ``HF_HUB_OFFLINE=1``), or a missing ``subfolder``.
        Whatever ``snapshot_download`` raises for a repo that cannot be fetched.
    """
    name = os.fspath(name_or_path)
    if os.path.isdir(name):
        folder = os.path.abspath(name)
    elif looks_local(name):
        raise ModelNotFoundError(f"{name}: no such folder (a local path; Hub repo ids look like 'org/name')")
    else:
        import huggingface_hub
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            folder = huggingface_hub.snapshot_download(
                name, revision=revision, cache_dir=None if cache_dir is None else os.fspath(cache_dir),
                local_files_only=local_files_only, token=token, allow_patterns=allow_patterns,
                library_name="flashpack", **({"force_download": True} if force_download else {}),
                **({"local_dir": os.fspath(local_dir)} if local_dir is not None else {}),
                **({"ignore_patterns": ignore_patterns} if ignore_patterns else {}),
            )
        except LocalEntryNotFoundError as e:
            where = os.fspath(cache_dir) if cache_dir is not None else "the default Hugging Face cache"
            offline = local_files_only or _env_offline()
            why = ("downloading is disabled (" + ("local_files_only=True" if local_files_only else "HF_HUB_OFFLINE=1")
                   + "); run once with network access to cache it") if offline else \
                f"and the Hub could not be reached ({innermost_cause(e)}); check the network or HF_ENDPOINT"
            raise ModelNotFoundError(
                f"{name}: not found in {where}"
                f"{f' at revision {revision!r}' if revision else ''}, {why}, or pass a local folder"
            ) from e
    if subfolder:
        folder = os.path.join(folder, subfolder)
        if not os.path.isdir(folder):
            raise ModelNotFoundError(f"{name}: no subfolder {subfolder!r} ({folder} does not exist)")
    return folder


def _env_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def innermost_cause(e: BaseException) -> str:
    """The innermost cause of a hub error, one line (``ConnectError: [Errno 111] Connection refused``)."""
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


def sub_patterns(subfolder: str | None, names: list[str]) -> list[str]:
    """``names`` prefixed with ``subfolder/`` (Hub paths always use ``/``)."""
    if not subfolder:
        return list(names)
    sub = subfolder.strip("/").replace("\\", "/")
    return [posixpath.join(sub, n) for n in names]


def resolve_pack_folder(name_or_path: str | os.PathLike, *, pack: str, allow_patterns: list[str],
                        subfolder: str | None = None, keys=None, **hub) -> str:
    """:func:`resolve_folder` for a model folder whose pack may be sharded: the first fetch asks for
    ``allow_patterns`` plus ``pack`` and its index (``pack + ".index.json"``); when the index came and the pack
    did not, a second fetch asks for exactly the shards holding ``keys`` (every shard for ``None``), read from
    the index, so a partial load downloads only its shards. A local folder is used as it is.

    Args:
        pack: the pack's file name (``model.flashpack``); allow_patterns: the other files (``subfolder`` applied).
        subfolder, hub: as for :func:`resolve_folder`. keys: the keys the load will ask for.

    Returns:
        The folder (``subfolder`` applied).
    """
    names = sub_patterns(subfolder, [pack, pack + INDEX_SUFFIX])
    first = list(allow_patterns) + [n for n in names if n not in allow_patterns]
    folder = resolve_folder(name_or_path, allow_patterns=first, subfolder=subfolder, **hub)
    index = os.path.join(folder, pack + INDEX_SUFFIX)
    if os.path.isdir(os.fspath(name_or_path)) or os.path.isfile(os.path.join(folder, pack)) or not os.path.isfile(index):
        return folder
    idx = read_index(index)
    need = [idx.shards[i].file for i in shards_for_keys(idx, keys, missing_ok=True)]
    if all(os.path.isfile(os.path.join(folder, n)) for n in need):
        return folder
    return resolve_folder(name_or_path, allow_patterns=first + sub_patterns(subfolder, need), subfolder=subfolder,
                          **hub)



def resolve_hub_pack(repo_id: str, *, subfolder: str | None = None, revision: str | None = None,
                     cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                     token: str | bool | None = None, keys=None) -> str:
    """The local folder holding the pack of the Hub repo ``repo_id`` (``subfolder`` applied), for
    ``flashpack.load("org/name")``.

    First asks for ``model.flashpack`` and its sharded index (the name the integrations and fal write; of a
    sharded pack, only the shards holding ``keys``, see :func:`resolve_pack_folder`); when the repo has neither,
    asks for the ``*.flashpack`` files and indexes of that one folder (not of deeper folders), so a repo holding
    one pack under another name loads too.

    Args:
        repo_id: ``"org/name"``.
        subfolder: a folder inside the repo (``"unet"``).
        revision, cache_dir, local_files_only, token: as for ``huggingface_hub.snapshot_download``
            (``HF_HUB_OFFLINE=1`` means ``local_files_only``).
        keys: the keys the load will ask for (``None``: all).

    Returns:
        The absolute path of the folder holding the pack.

    Raises:
        ModelNotFoundError (``FileNotFoundError``): the repo (or revision) is not in the cache while downloading
            is disabled, the Hub could not be reached, ``subfolder`` is missing, or the repo holds no
            ``.flashpack`` file; each names the repo id and what to do.
        Whatever ``snapshot_download`` raises for a repo that cannot be fetched (a wrong id or token).
    """
    hub = {"revision": revision, "cache_dir": cache_dir, "local_files_only": local_files_only, "token": token}
    names = (_MODEL_PACK, _MODEL_PACK + INDEX_SUFFIX)
    try:
        folder = resolve_pack_folder(repo_id, pack=_MODEL_PACK, allow_patterns=[], subfolder=subfolder, keys=keys,
                                     **hub)
    except ModelNotFoundError:
        if not subfolder:
            raise
        # online, a snapshot holds only what the patterns matched: no model.flashpack under ``subfolder`` leaves
        # no such folder at all, though it may hold a pack of another name (the fetch below says if it is missing)
        folder = None
    if folder is not None and any(os.path.isfile(os.path.join(folder, n)) for n in names):
        return folder
    folder = resolve_folder(repo_id, allow_patterns=sub_patterns(subfolder, ["*.flashpack", "*" + INDEX_SUFFIX]),
                            ignore_patterns=sub_patterns(subfolder, ["*/*"]), subfolder=subfolder, **hub)
    if not any(n.endswith((".flashpack", INDEX_SUFFIX)) for n in os.listdir(folder)):
        where = f"{repo_id}{'/' + subfolder if subfolder else ''}{f' at revision {revision!r}' if revision else ''}"
        raise ModelNotFoundError(
            f"{where}: no .flashpack file in this repo folder (looked for {_MODEL_PACK}, its index, and any "
            f"*.flashpack); pass subfolder= for a pack in a folder of the repo, or convert the repo first with "
            f"`flashpack convert {repo_id}`")
    return folder


__all__ = ["innermost_cause", "is_repo_id", "looks_local", "resolve_folder", "resolve_hub_pack",
           "resolve_pack_folder", "sub_patterns"]
