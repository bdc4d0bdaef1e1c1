"""Hugging Face Hub helpers shared by the transformers and diffusers integrations.

Every call that can reach the network goes through :func:`resolve_folder` (``huggingface_hub.snapshot_download``,
defined in :mod:`flashpack.remote` so that ``flashpack.load`` resolves repo ids too, re-exported here)
or :func:`push_folder` (``huggingface_hub.HfApi.create_repo`` and ``HfApi.upload_folder``); ``huggingface_hub`` is
looked up at call time, so tests patch those three names on the ``huggingface_hub`` module / ``HfApi`` class.

Pack file names: ``model.flashpack``, or ``model.<variant>.flashpack`` for a variant, for both libraries (the
name diffusers itself uses for FlashPack weights, ``diffusers.utils.constants.FLASHPACK_WEIGHTS_NAME``).
"""

from __future__ import annotations

import os

from ..errors import HubPushError, ModelNotFoundError
from ..remote import innermost_cause, looks_local, resolve_folder, resolve_pack_folder, sub_patterns
from ..source import INDEX_SUFFIX, shard_stem

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
                           f"{innermost_cause(e)}; the folder is saved locally, push it again later") from e
    return full_id


__all__ = ["HubPushError", "ModelNotFoundError", "PACK_NAME", "default_repo_id", "looks_local", "pack_name",
           "push_folder", "resolve_folder", "resolve_pack_folder", "stale_pack_patterns", "sub_patterns"]
