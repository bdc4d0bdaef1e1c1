"""``FlashPackTransformersModelMixin``: FlashPack saving and loading for any transformers ``PreTrainedModel``.

Usage::

    class FlashPackCLIPTextModel(FlashPackTransformersModelMixin, CLIPTextModel):
        pass

    clip = FlashPackCLIPTextModel.from_pretrained("org/repo", subfolder="text_encoder")  # ordinary, unchanged
    clip.save_pretrained_flashpack("out/text_encoder")
    clip = FlashPackCLIPTextModel.from_pretrained_flashpack("out/text_encoder", device_map="cuda")

Folder layout written by ``save_pretrained_flashpack`` (the same as ``save_pretrained`` with the weights
replaced by one pack)::

    config.json                 the model config (``architectures`` names the transformers class, ``dtype`` the
                                pack's floating dtype)
    generation_config.json      only for models that can generate
    model.flashpack             the weights; ``model.<variant>.flashpack`` with ``variant=``

transformers is imported only when a method runs; nothing in transformers is patched.
"""

from __future__ import annotations

import copy
import os

import torch

from ..mixin import check_mmap_device, init_empty_weights
from ._shared import (
    DEFAULT_MAX_SHARD_SIZE,
    base_library_class,
    find_pack,
    load_model,
    resolve_device,
    save_model_folder,
    split_fal_options,
)
from .hub import pack_name, resolve_pack_folder, sub_patterns

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"


class FlashPackTransformersModelMixin:
    """Adds :meth:`save_pretrained_flashpack` and :meth:`from_pretrained_flashpack` to a ``PreTrainedModel``
    subclass. Put the mixin first: ``class X(FlashPackTransformersModelMixin, CLIPTextModel): pass``."""

    def save_pretrained_flashpack(self, save_directory: str | os.PathLike, *, push_to_hub: bool = False,
                                  repo_id: str | None = None, token: str | bool | None = None,
                                  private: bool | None = None, commit_message: str | None = None,
                                  variant: str | None = None, target_dtype: torch.dtype | None = None,
                                  is_main_process: bool = True, create_pr: bool = False, align_bytes: int | None = None,
                                  silent: bool = True, num_workers: int | None = None,
                                  max_shard_size: int | str | None = DEFAULT_MAX_SHARD_SIZE, progress=None) -> str | None:
        """Write ``config.json`` (+ ``generation_config.json``) and ``model[.<variant>].flashpack``.

        Args:
            save_directory: the folder (created if missing).
            push_to_hub: then create the Hub repo and upload the folder with ``huggingface_hub.HfApi``.
            repo_id: Hub repo; default: the folder's name.
            token, private, commit_message: for the Hub.
            variant: pack name ``model.<variant>.flashpack`` (e.g. ``"fp16"``).
            target_dtype: cast floating weights to this dtype in the pack (the config's ``dtype`` follows).
            is_main_process: ``False`` writes nothing and returns ``None`` (distributed saves).
            create_pr: push as a pull request.
            align_bytes, num_workers: fal's writer knobs; accepted and ignored. silent: ``False`` prints the path.
            max_shard_size: split a larger pack into ``model[.<variant>]-0000i-of-0000N.flashpack`` shards of at
                most this many payload bytes plus ``model[.<variant>].flashpack.index.json``: an int or a Hugging
                Face size string (default ``"20GB"`` = 20 * 10^9, the Hub's recommendation); ``None``: one file.
            progress: ``progress(bytes done, bytes total)`` while the pack is written.

        Returns:
            The pack's path.

        Notes:
            Atomic: config files are written to a hidden temporary folder and renamed in; the pack is written
            to a temporary file and renamed over a stale pack of the same variant. Nothing temporary remains.
        """
        if not is_main_process:  # fal's and the libraries' rule: only the main process writes
            return None
        model = self

        def write_configs(tmp: str) -> None:
            config = copy.deepcopy(model.config)
            dtype = target_dtype if target_dtype is not None else getattr(model, "dtype", None)
            if isinstance(dtype, torch.dtype):
                config.dtype = str(dtype).removeprefix("torch.")
            config.architectures = [base_library_class(model, ("transformers",)).__name__]
            config.save_pretrained(tmp)
            if model.can_generate() and getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(tmp)

        path = save_model_folder(self, save_directory, write_configs=write_configs, variant=variant,
                                 target_dtype=target_dtype, push_to_hub=push_to_hub, repo_id=repo_id, token=token,
                                 private=private, commit_message=commit_message, create_pr=create_pr,
                                 max_shard_size=max_shard_size, progress=progress)
        if not silent:
            print(f"flashpack: saved {type(self).__name__} to {path}")
        return path

    @classmethod
    def from_pretrained_flashpack(cls, name_or_path: str | os.PathLike, device=None, *, device_map=None,
                                  subfolder: str | None = None, variant: str | None = None,
                                  revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                                  local_files_only: bool = False, token: str | bool | None = None,
                                  torch_dtype: torch.dtype | None = None, dtype: torch.dtype | None = None,
                                  mmap: bool = False, verify: bool | None = None, **config_overrides):
        """Build the model from its config on the meta device and fill it from its pack.

        Args:
            name_or_path: a local folder, or a Hub repo id (only ``config.json``, ``generation_config.json`` and
                the pack are downloaded, with ``snapshot_download``; a sharded pack: its index, then its shards).
            device_map: ``"cpu"`` (default), ``"cuda"``, ``"cuda:1"``, a ``torch.device``, or a dict putting the
                whole model on one device.
            device: fal's second positional argument: the same as ``device_map`` (pass one, or both equal).
            subfolder, variant, revision, cache_dir, local_files_only, token: as for ``from_pretrained``;
                fal's ``force_download`` and ``local_dir`` go to ``snapshot_download``, ``proxies`` and
                ``local_dir_use_symlinks`` are accepted and ignored (deprecated in huggingface_hub).
            torch_dtype, dtype: convert the loaded model to this dtype (``model.to(dtype)``); default: the pack's.
            mmap: zero-copy CPU load (default ``False``): every parameter and persistent buffer is a view of a
                private copy-on-write mapping of the pack, like ``torch.load(mmap=True)``; nothing is copied up
                front, pages are read from the file (or the page cache) when first touched. The parameters are
                writable (fine-tuning works) and writes never reach the file. CPU only: with a CUDA
                ``device_map``/``device`` it raises ``UsageError`` before anything is downloaded or built (it is
                not silently ignored: drop ``mmap=True`` to load onto the GPU). A dtype conversion
                (``torch_dtype``/``dtype`` differing from the pack's, ``coerce_dtype``) copies what it converts.
                SIGBUS caveat: the mapping stays backed by the file for the model's life; if the pack is truncated
                or overwritten in place meanwhile (a save into the same folder renames a new file in and is safe),
                touching a lost page raises SIGBUS and kills the process.
            verify: check the pack's chunk checksums; default ``FLASHPACK_VERIFY`` (on). With ``mmap=True`` only
                ``verify=True`` checks them (every chunk read once with ``pread(2)`` before the mapping is handed
                out), so a damaged pack is a ``ChecksumMismatchError``, not wrong weights.
            silent, strict, strict_params, strict_buffers, keep_flash_ref_on_model, num_streams, chunk_bytes,
                ignore_names, ignore_prefixes, ignore_suffixes, use_distributed_loading, distributed_sharded,
                distributed_shard_strategy, rank, local_rank, world_size, coerce_dtype: fal's keywords, passed to
                :func:`flashpack.assign_from_file` (``strict`` defaults to ``True`` here).
            **config_overrides: config attributes to change (``num_hidden_layers=2``, ``attn_implementation=``).

        Returns:
            The model in eval mode, weights on the device, in the pack's dtypes; tied weights tied with
            ``tie_weights()``; non-persistent buffers (``position_ids``) as computed by ``__init__``.

        Raises:
            ModelNotFoundError (``FileNotFoundError``): no such folder, not cached offline, or no pack.
            UnsupportedDeviceMapError (``NotImplementedError``): a map over several devices.
            UsageError (``ValueError``): ``mmap=True`` with a device other than the CPU.
            TypeError: a config override the config does not know.
            ModelMismatchError, ChecksumMismatchError and everything :func:`flashpack.assign_from_file` raises.
        """
        from transformers import AutoConfig, GenerationConfig

        assign, hub_extra = split_fal_options(config_overrides)
        device = resolve_device(device, device_map, f"{cls.__name__}.from_pretrained_flashpack")
        if mmap:
            check_mmap_device(device, name_or_path)
        assign.update(mmap=mmap, verify=verify)
        want_dtype = dtype if dtype is not None else torch_dtype
        name = pack_name(variant)
        folder = resolve_pack_folder(name_or_path, pack=name, **hub_extra,
                                     allow_patterns=sub_patterns(subfolder, [CONFIG_NAME, GENERATION_CONFIG_NAME, name]),
                                     subfolder=subfolder, revision=revision, cache_dir=cache_dir,
                                local_files_only=local_files_only, token=token)

        pack = find_pack(folder, name)
        overrides = dict(config_overrides)
        build_kwargs = {k: overrides.pop(k) for k in ("attn_implementation",) if k in overrides}
        config_class = getattr(cls, "config_class", None) or AutoConfig
        config, unused = config_class.from_pretrained(folder, return_unused_kwargs=True, **overrides)
        if unused:
            raise TypeError(f"{cls.__name__}.from_pretrained_flashpack: unknown config overrides {sorted(unused)} "
                            f"for {type(config).__name__}")

        def build(dtype):
            kwargs = dict(build_kwargs)
            if dtype is not None:
                kwargs["dtype"] = dtype
            with init_empty_weights(), _no_init_weights():
                return cls._from_config(config, **kwargs)

        model = load_model(build, pack, device, tie=lambda m: m.tie_weights(), assign=assign)
        _init_unloaded_buffers(model)
        if model.can_generate() and os.path.isfile(os.path.join(folder, GENERATION_CONFIG_NAME)):
            model.generation_config = GenerationConfig.from_pretrained(folder)
        model.config._name_or_path = os.fspath(name_or_path)
        if want_dtype is not None and model.dtype != want_dtype:
            model = model.to(dtype=want_dtype)
        return model


def _no_init_weights():
    """transformers' own switch that skips random weight init while a model is built (the weights come from the
    pack); a no-op context on versions without it."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            import contextlib

            return contextlib.nullcontext()
    return no_init_weights()


def _init_unloaded_buffers(model) -> None:
    """Run the model's own ``initialize_weights`` for what the pack did not fill (non-persistent buffers such as
    ``position_ids`` or rotary ``inv_freq``), the way transformers' ``from_pretrained`` does: every loaded
    parameter and buffer is flagged ``_is_hf_initialized`` first, so transformers' init functions skip it.
    Only on transformers versions with flag-aware init (``transformers.initialization``, v5)."""
    try:
        import transformers.initialization  # noqa: F401
    except ImportError:
        return
    if not hasattr(model, "initialize_weights"):
        return
    non_persistent = {id(b) for _, b in model.named_non_persistent_buffers()} \
        if hasattr(model, "named_non_persistent_buffers") else set()
    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in non_persistent:
            t._is_hf_initialized = True
    with torch.no_grad():
        model.initialize_weights()


__all__ = ["FlashPackTransformersModelMixin"]
