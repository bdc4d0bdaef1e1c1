"""Hugging Face Hub helpers shared by the transformers and diffusers integrations.

Every call that can reach the network goes through :func:`resolve_folder` (``huggingface_hub.snapshot_download``)
or :func:`push_folder` (``huggingface_hub.HfApi.create_repo`` and ``HfApi.upload_folder``); ``huggingface_hub`` is
looked up at call time, so tests patch those three names on the ``huggingface_hub`` module / ``HfApi`` class.

Pack file names: ``model.flashpack``, or ``model.<variant>.flashpack`` for a variant, for both libraries (the
name diffusers itself uses for FlashPack weights, ``diffusers.utils.constants.FLASHPACK_WEIGHTS_NAME``).
"""

from __future__ import annotations

import os
import posixpath

from ..errors import HubPushError, ModelNotFoundError
from ..source import INDEX_SUFFIX, read_index, shard_stem, shards_for_keys

#: File name of a model's pack inside its folder (no variant).
PACK_NAME = "model.flashpack"


def pack_name(variant: str | None = None) -> str:
    """``model.flashpack``, or ``model.<variant>.flashpack``.

    Raises:
        ValueError: ``variant`` is empty or contains a path separator or a dot.
    """
    if variant is None:
        return PACK_NAME
    if not isinstance(variant, str) or not variant or any(c in variant for c in "/\\."):
        raise ValueError(f"variant must be a non-empty name without '/', '\\' or '.', got {variant!r}")
    stem, ext = PACK_NAME.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def default_repo_id(save_directory: str | os.PathLike) -> str:
    """The repo name a folder pushes to by default: its last path component (``"out/my-model/"`` ->
    ``"my-model"``; ``PathLike`` accepted; ``"."`` means the current folder's name)."""
    name = os.path.basename(os.path.normpath(os.path.abspath(os.fspath(save_directory))))
    if not name:
        raise ValueError(f"cannot derive a repo id from {os.fspath(save_directory)!r}; pass repo_id=")
    return name


def looks_local(name_or_path: str) -> bool:
    """True for strings that can only be a file system path, never a Hub repo id (``/x``, ``./x``, ``~/x``,
    ``a/b/c``, a backslash, or an existing file)."""
    return (name_or_path.startswith(("/", ".", "~")) or "\\" in name_or_path or name_or_path.count("/") > 1
            or os.path.exists(name_or_path))


def resolve_folder(name_or_path: str | os.PathLike, *, allow_patterns: list[str], subfolder: str | None = None,
                   revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                   local_files_only: bool = False, token: str | bool | None = None, force_download: bool = False,
                   local_dir: str | os.PathLike | None = None) -> str:
    """The local folder holding a model: ``name_or_path`` itself when it is a folder, else a snapshot of the Hub
    repo ``name_or_path`` limited to ``allow_patterns``; then ``subfolder`` inside it.

    Args:
        name_or_path: a local folder, or a Hub repo id (``"org/name"``).
        allow_patterns: file patterns relative to the repo root (``subfolder`` already included by the caller),
            passed to ``snapshot_download`` so only the config and pack files are fetched.
        subfolder, revision, cache_dir, local_files_only, token, force_download, local_dir: as for
            ``snapshot_download``; ignored for a local folder.

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
            )
        except LocalEntryNotFoundError as e:
            where = os.fspath(cache_dir) if cache_dir is not None else "the default Hugging Face cache"
            offline = local_files_only or _env_offline()
            why = ("downloading is disabled (" + ("local_files_only=True" if local_files_only else "HF_HUB_OFFLINE=1")
                   + "); run once with network access to cache it") if offline else \
                f"and the Hub could not be reached ({_cause(e)}); check the network or HF_ENDPOINT"
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


def _cause(e: BaseException) -> str:
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


def stale_pack_patterns(pack_path: str | os.PathLike) -> list[str]:
    """Hub patterns (relative to the folder) of every form a pack named like ``pack_path`` may have taken in
    earlier pushes: the one file, its index and its shards; a push deletes those it does not upload again."""
    base = os.path.basename(os.fspath(pack_path))
    return [base, base + INDEX_SUFFIX, f"{shard_stem(base)}-*-of-*.flashpack"]


def push_folder(save_directory: str | os.PathLike, *, repo_id: str | None = None, token: str | bool | None = None,
                private: bool | None = None, commit_message: str | None = None, create_pr: bool = False,
                delete_patterns: list[str] | None = None) -> str:
    """Create the Hub repo (``exist_ok``) and upload the whole folder with ``huggingface_hub.HfApi``.

    A folder holding a sharded pack (a ``*.flashpack.index.json``) goes through ``HfApi.upload_large_folder``
    where this ``huggingface_hub`` has it (resumable, several commits; it takes no commit message, pull request
    or deletions), else ``HfApi.upload_folder`` (in ``huggingface_hub`` >= 1.0 that one batches large folders itself).

    Args:
        save_directory: the folder just written.
        repo_id: ``"org/name"`` or ``"name"`` (the token's namespace); default :func:`default_repo_id`.
        token, private, commit_message, create_pr: passed to ``create_repo`` / ``upload_folder``.
        delete_patterns: remote files to delete unless uploaded again (stale shards of an earlier push), passed
            to ``upload_folder``.

    Returns:
        The full repo id the hub answered with.

    Raises:
        HubPushError (``OSError``): creating the repo or uploading failed, naming the folder and the repo, with
            the hub's error chained.
    """
    import huggingface_hub

    repo_id = repo_id or default_repo_id(save_directory)
    api = huggingface_hub.HfApi(token=token)
    step, full_id = "creating the repo", repo_id
    folder = os.fspath(save_directory)
    try:
        url = api.create_repo(repo_id, token=token, private=private, exist_ok=True)
        full_id = getattr(url, "repo_id", None) or repo_id
        step = "uploading"
        sharded = any(n.endswith(".flashpack" + INDEX_SUFFIX) for _, _, files in os.walk(folder) for n in files)
        large = getattr(api, "upload_large_folder", None)
        if sharded and large is not None and not create_pr:
            large(repo_id=full_id, folder_path=folder, repo_type="model")
            return full_id
        extra = {"delete_patterns": delete_patterns} if delete_patterns else {}
        api.upload_folder(repo_id=full_id, folder_path=folder, token=token,
                          commit_message=commit_message or "Upload FlashPack weights with flashpack",
                          **({"create_pr": True} if create_pr else {}), **extra)
    except Exception as e:  # noqa: BLE001 - any hub or network error gets the folder, repo and step
        raise HubPushError(f"{folder}: while pushing to the Hub repo {full_id!r} ({step}): "
                           f"{_cause(e)}; the folder is saved locally, push it again later") from e
    return full_id


__all__ = ["HubPushError", "ModelNotFoundError", "PACK_NAME", "default_repo_id", "pack_name", "push_folder",
           "resolve_folder", "resolve_pack_folder", "stale_pack_patterns"]
