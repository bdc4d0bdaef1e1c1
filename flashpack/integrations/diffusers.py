"""``FlashPackDiffusersModelMixin`` for diffusers models and ``FlashPackDiffusionPipeline`` for whole pipelines.

Usage::

    class FlashPackAutoencoderKL(FlashPackDiffusersModelMixin, AutoencoderKL):
        pass

    class FlashPackStableDiffusionPipeline(FlashPackDiffusionPipeline, StableDiffusionPipeline):
        def __init__(self, vae: FlashPackAutoencoderKL, text_encoder: FlashPackCLIPTextModel, ...): ...

    pipe.save_pretrained_flashpack("out/sd")
    pipe = FlashPackStableDiffusionPipeline.from_pretrained_flashpack("out/sd", device_map="cuda")

Model folder layout (``save_pretrained_flashpack`` on a model)::

    config.json          the diffusers config (``_class_name`` names the diffusers class, e.g. ``AutoencoderKL``)
    model.flashpack      the weights; ``model.<variant>.flashpack`` with ``variant=``

``model.flashpack`` is the name diffusers itself gives FlashPack weights (``FLASHPACK_WEIGHTS_NAME``), and
transformers components of a pipeline use the same name, so every pack in a pipeline is ``<component>/model.flashpack``.

Pipeline folder layout::

    model_index.json     component name -> [library, class]; FlashPack classes are recorded as the library class
                         they derive from (``FlashPackAutoencoderKL`` -> ``["diffusers", "AutoencoderKL"]``)
    vae/, unet/, text_encoder/ ...        FlashPack-enabled models: config + pack (as above)
    tokenizer/, scheduler/, plain models  whatever their own ``save_pretrained`` writes

diffusers is imported only when a method runs; nothing in diffusers is patched.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import re
import shutil
import tempfile

import torch

from ..atomic import atomic_path
from ..errors import ModelNotFoundError
from ..mixin import check_mmap_device, init_empty_weights
from ..source import INDEX_SUFFIX, read_index
from ._shared import (
    DEFAULT_MAX_SHARD_SIZE,
    base_library_class,
    default_dtype,
    find_pack,
    load_model,
    resolve_device,
    save_model_folder,
    split_fal_options,
    stored_keys_match,
)
from .hub import pack_name, push_folder, resolve_folder, resolve_pack_folder, sub_patterns

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
MODEL_INDEX_NAME = "model_index.json"
#: Non-weight files a pipeline needs: configs, tokenizer vocabularies and merges, sentencepiece models.
PIPELINE_FILE_PATTERNS = ["model_index.json", "*.json", "*.txt", "*.model", "*.tiktoken"]
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".onnx", ".gguf")


def _write_json_atomic(path: str, obj) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


class FlashPackDiffusersModelMixin:
    """Adds :meth:`save_pretrained_flashpack` and :meth:`from_pretrained_flashpack` to a diffusers ``ModelMixin``
    subclass. Put the mixin first: ``class X(FlashPackDiffusersModelMixin, AutoencoderKL): pass``."""

    def save_pretrained_flashpack(self, save_directory: str | os.PathLike, *, push_to_hub: bool = False,
                                  repo_id: str | None = None, token: str | bool | None = None,
                                  private: bool | None = None, commit_message: str | None = None,
                                  variant: str | None = None, target_dtype: torch.dtype | None = None,
                                  is_main_process: bool = True, create_pr: bool = False, align_bytes: int | None = None,
                                  silent: bool = True, num_workers: int | None = None,
                                  max_shard_size: int | str | None = DEFAULT_MAX_SHARD_SIZE, progress=None) -> str | None:
        """Write ``config.json`` and ``model[.<variant>].flashpack`` into ``save_directory`` (created if missing).

        Args and atomicity as for
        :meth:`flashpack.integrations.transformers.FlashPackTransformersModelMixin.save_pretrained_flashpack`.

        Returns:
            The pack's path.
        """
        if not is_main_process:  # fal's and the libraries' rule: only the main process writes
            return None
        model = self

        def write_configs(tmp: str) -> None:
            config = json.loads(model.to_json_string())
            config["_class_name"] = base_library_class(model, ("diffusers",)).__name__
            config.pop("_name_or_path", None)
            _write_json_atomic(os.path.join(tmp, CONFIG_NAME), config)

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
        """Build the model from ``config.json`` on the meta device and fill it from its pack. For a CPU target
        (without ``mmap=True``) the pack is read on a background thread while the model is built
        (:class:`flashpack.deserialization.EarlyLoad`); a build or match error cancels that read first.

        Args:
            name_or_path: a local folder, or a Hub repo id (only ``config.json`` and the pack are downloaded).
            device_map: ``"cpu"`` (default), ``"cuda"``, ``"cuda:1"``, a ``torch.device``, or a dict putting the
                whole model on one device.
            device: fal's second positional argument: the same as ``device_map`` (pass one, or both equal).
            subfolder, variant, revision, cache_dir, local_files_only, token: as for ``from_pretrained``;
                fal's ``force_download`` and ``local_dir`` go to ``snapshot_download``, ``proxies`` and
                ``local_dir_use_symlinks`` are accepted and ignored (deprecated in huggingface_hub).
            torch_dtype, dtype: convert the loaded model to this dtype (``model.to(dtype)``); default: the pack's.
            mmap: zero-copy CPU load (default ``False``): the parameters are views of a private copy-on-write
                mapping of the pack (writable; writes never reach the file). CPU only: a CUDA ``device_map`` raises
                ``UsageError`` before anything is downloaded or built. SIGBUS caveat: if the pack is truncated or
                overwritten in place while the model lives, touching a lost page kills the process. Details as for
                :meth:`flashpack.integrations.transformers.FlashPackTransformersModelMixin.from_pretrained_flashpack`.
            verify: check the chunk checksums; default ``FLASHPACK_VERIFY`` (on); with ``mmap=True`` only
                ``verify=True`` does (a damaged pack is then a ``ChecksumMismatchError``).
            silent, strict, strict_params, strict_buffers, keep_flash_ref_on_model, num_streams, chunk_bytes,
                ignore_names, ignore_prefixes, ignore_suffixes, use_distributed_loading, distributed_sharded,
                distributed_shard_strategy, rank, local_rank, world_size, coerce_dtype: fal's keywords, passed to
                :func:`flashpack.assign_from_file` (``strict`` defaults to ``True`` here).
            **config_overrides: config values to change, as for ``from_config``.

        Returns:
            The model in eval mode, in the pack's dtypes, on the device.

        Raises:
            As :meth:`flashpack.integrations.transformers.FlashPackTransformersModelMixin.from_pretrained_flashpack`.

        Notes:
            A pack written under an older diffusers whose keys follow that version's layout loads when the
            installed diffusers' ``from_pretrained`` would load the same keys: its checkpoint key renames are
            applied to the pack's keys (:func:`checkpoint_key_renames`; the tensors stay views).
        """
        assign, hub_extra = split_fal_options(config_overrides)
        device = resolve_device(device, device_map, f"{cls.__name__}.from_pretrained_flashpack")
        if mmap:
            check_mmap_device(device, name_or_path)
        assign.update(mmap=mmap, verify=verify)
        want_dtype = dtype if dtype is not None else torch_dtype
        name = pack_name(variant)
        folder = resolve_pack_folder(name_or_path, pack=name, **hub_extra,
                                     allow_patterns=sub_patterns(subfolder, [CONFIG_NAME, name]),
                                     subfolder=subfolder, revision=revision, cache_dir=cache_dir,
                                local_files_only=local_files_only, token=token)
        pack = find_pack(folder, name)
        config = cls.load_config(folder)

        def build(dtype):
            with init_empty_weights(), default_dtype(dtype):
                model, unused = cls.from_config(config, return_unused_kwargs=True, **config_overrides)
            unknown = sorted(k for k in unused if k in config_overrides)
            if unknown:
                raise TypeError(f"{cls.__name__}.from_pretrained_flashpack: unknown config overrides {unknown}")
            return model

        model = load_model(build, pack, device, assign=assign, lenient_keys=diffusers_lenient_keys,
                           key_renames=lambda model, wm: checkpoint_key_renames(model, wm.keys()))
        model.register_to_config(_name_or_path=os.fspath(name_or_path))
        if want_dtype is not None and model.dtype != want_dtype:
            model = model.to(dtype=want_dtype)
        return model


def diffusers_lenient_keys(model, file_keys: list[str]) -> tuple[set[str], set[str]]:
    """The exception diffusers' ``ModelMixin.from_pretrained`` makes to a strict key match (diffusers 0.3x-0.4x,
    ``_load_pretrained_model``): pack keys the model does not have that match one of its class's
    ``_keys_to_ignore_on_load_unexpected`` regexes (``re.search``; Wan's ``norm_added_q`` in image-to-video
    checkpoints) are skipped. ``(absent, skipped)`` for :func:`flashpack.integrations.load_model`; nothing is
    absent by diffusers' rules (it initialises every missing key and warns)."""
    patterns = list(getattr(type(model), "_keys_to_ignore_on_load_unexpected", None) or ())
    if not patterns:
        return set(), set()
    model_keys = set(model.state_dict(keep_vars=True))
    return set(), {k for k in set(file_keys) - model_keys if any(re.search(p, k) for p in patterns)}


def checkpoint_key_renames(model, keys) -> dict[str, str]:
    """The renames diffusers' own ``from_pretrained`` applies to the keys of a checkpoint of ``model``, so a pack
    written under an older diffusers loads under the installed one.

    Where the rules come from: the model's own ``ModelMixin._fix_state_dict_keys_on_load`` (diffusers 0.42: the
    attention blocks built with ``_from_deprecated_attn_block``, e.g. ``AutoencoderKL``'s mid-block, take the
    old ``query``/``key``/``value``/``proj_attn`` keys as ``to_q``/``to_k``/``to_v``/``to_out.0``), called on a
    ``{key: key}`` dict so it renames names only. A diffusers without that method renames nothing (neither does
    its own loader). diffusers' loader converts no tensors on load, so every rename here is zero-copy.

    Args:
        model: the model built from its config (meta parameters are fine).
        keys: the keys the pack stores (aliases included).

    Returns:
        ``{stored key: model key}`` for the keys whose name changes; empty when every stored key is a model key.
    """
    keys = list(keys)
    fix = getattr(model, "_fix_state_dict_keys_on_load", None)
    if fix is None or stored_keys_match(model, keys):
        return {}
    names = {k: k for k in keys}
    fix(names)  # renames in place: new key -> the stored key it came from
    return {old: new for new, old in names.items() if new != old}


class AutoFlashPackModel:
    """fal's ``flashpack.integrations.diffusers.auto_model.AutoFlashPackModel`` (here importable from
    :mod:`flashpack.integrations.diffusers`): diffusers' ``AutoModel`` for FlashPack folders. The model class is
    read from the folder's ``config.json`` (``_class_name``; with ``subfolder``, from ``<subfolder>/config.json``);
    a class without the mixin is given it (``FlashPack<Class>``). Not instantiated directly.
    Unlike fal's, it patches nothing, loads diffusers classes only (no ``trust_remote_code``; a transformers
    config raises, use :class:`~flashpack.integrations.transformers.FlashPackTransformersModelMixin`)."""

    def __init__(self, *args, **kwargs):
        raise OSError(f"{type(self).__name__} is built with {type(self).__name__}.from_pretrained(name_or_path) "
                      f"or .from_pretrained_flashpack(name_or_path), not instantiated")

    @classmethod
    def model_class(cls, name_or_path: str | os.PathLike, *, subfolder: str | None = None, **hub) -> type:
        """The FlashPack-enabled diffusers class the folder's config names.

        Args:
            name_or_path: a local folder or a Hub repo id. subfolder: a component folder (``"unet"``).
            **hub: ``revision``, ``cache_dir``, ``local_files_only``, ``token``, as for ``from_pretrained``.

        Returns:
            A subclass of :class:`FlashPackDiffusersModelMixin` and the diffusers class.

        Raises:
            ModelNotFoundError: no ``config.json`` there. ValueError: the config names no diffusers class.
        """
        import diffusers

        folder = resolve_folder(name_or_path, allow_patterns=sub_patterns(subfolder, [CONFIG_NAME]),
                                subfolder=subfolder, **hub)
        config_path = os.path.join(folder, CONFIG_NAME)
        if not os.path.isfile(config_path):
            raise ModelNotFoundError(f"{name_or_path}: no {CONFIG_NAME} in {folder}; pass subfolder= for a "
                                     f"pipeline component (unet, vae, ...)")
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        name = str(config.get("_class_name", "")).removeprefix("FlashPack")
        klass = getattr(diffusers, name, None) if name else None
        if not (isinstance(klass, type) and issubclass(klass, diffusers.ModelMixin)):
            kind = "a transformers config" if "model_type" in config else f"_class_name {name!r}"
            raise ValueError(f"{config_path}: {kind} names no diffusers model class; AutoFlashPackModel loads "
                             f"diffusers models (use FlashPackTransformersModelMixin for transformers models)")
        if issubclass(klass, FlashPackDiffusersModelMixin):
            return klass
        return type(f"FlashPack{klass.__name__}", (FlashPackDiffusersModelMixin, klass), {"__module__": __name__})

    @classmethod
    def from_pretrained(cls, pretrained_model_or_path: str | os.PathLike, use_flashpack: bool = False, **kwargs):
        """fal's: the config's class, loaded with ``from_pretrained_flashpack`` when ``use_flashpack`` is true,
        else with its ordinary ``from_pretrained``; ``kwargs`` go to that call (``subfolder``, ``revision``,
        ``cache_dir``, ``local_files_only`` and ``token`` also locate the config).

        Returns:
            The model.
        """
        hub = {k: kwargs[k] for k in ("revision", "cache_dir", "local_files_only", "token") if k in kwargs}
        klass = cls.model_class(pretrained_model_or_path, subfolder=kwargs.get("subfolder"), **hub)
        load = klass.from_pretrained_flashpack if use_flashpack else klass.from_pretrained
        return load(pretrained_model_or_path, **kwargs)

    @classmethod
    def from_pretrained_flashpack(cls, pretrained_model_or_path: str | os.PathLike, **kwargs):
        """``from_pretrained(..., use_flashpack=True)``, as in fal.

        Returns:
            The model, filled from its pack.
        """
        return cls.from_pretrained(pretrained_model_or_path, use_flashpack=True, **kwargs)


def _flashpack_class(candidates) -> type | None:
    """The first FlashPack-enabled class among a component's annotated types."""
    for c in candidates:
        if isinstance(c, type) and hasattr(c, "from_pretrained_flashpack"):
            return c
    return None


def _has_weights(folder: str) -> bool:
    """Whether ``folder`` holds ordinary (non-FlashPack) weight files."""
    return os.path.isdir(folder) and any(f.endswith(_WEIGHT_SUFFIXES) for f in os.listdir(folder))


def _variant_files(folder: str, variant: str | None) -> bool:
    return variant is not None and os.path.isdir(folder) and any(
        f.endswith(_WEIGHT_SUFFIXES) and (f".{variant}." in f or f".{variant}-" in f) for f in os.listdir(folder))


_HUB_KEYWORDS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "use_safetensors",
                 "low_cpu_mem_usage")


def stored_library_class(entry) -> type | None:
    """The class a ``model_index.json`` entry names: ``["diffusers", "AutoencoderKL"]`` -> ``AutoencoderKL``. fal's
    flashpack records its own classes as ``["defs", "FlashPackUNet2DConditionModel"]``; such an entry maps to the
    library class of the name without ``FlashPack`` (``UNet2DConditionModel`` in diffusers or transformers), or
    ``None`` when there is none."""
    import importlib

    if not isinstance(entry, (list, tuple)) or len(entry) != 2 or not isinstance(entry[1], str):
        return None
    library, name = entry
    candidates = [library] if library in ("diffusers", "transformers") else []
    if library not in ("diffusers", "transformers"):
        name = name.removeprefix("FlashPack")
        candidates = ["diffusers", "transformers"]
    for lib in candidates:
        try:
            klass = getattr(importlib.import_module(lib), name, None)
        except ImportError:
            continue
        if isinstance(klass, type):
            return klass
    return None


def annotated_components(cls, index: dict) -> dict[str, type]:
    """Component name -> the FlashPack-enabled class ``cls.__init__`` annotates for it, for every component whose
    ``model_index.json`` entry names a library class that annotated class subclasses (or a fal ``["defs", ...]``
    entry)."""
    types = cls._get_signature_types()
    out = {}
    for name, entry in index.items():
        klass = _flashpack_class(types.get(name, ()))
        if klass is None or not isinstance(entry, (list, tuple)) or len(entry) != 2 or entry[0] is None:
            continue
        stored = stored_library_class(entry)
        if entry[0] not in ("diffusers", "transformers") or (stored is not None and issubclass(klass, stored)):
            out[name] = klass
    return out


def fal_entries(index: dict) -> dict[str, list]:
    """``model_index.json`` entries fal's flashpack wrote as ``["defs", "<its class>"]``, mapped to the library
    class they stand for (``["diffusers", "UNet2DConditionModel"]``); entries with no such class are left out."""
    out = {}
    for name, entry in index.items():
        if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] not in (None, "diffusers", "transformers") \
                and isinstance(entry[1], str) and not name.startswith("_"):
            stored = stored_library_class(entry)
            if stored is not None:
                out[name] = [stored.__module__.split(".")[0], stored.__name__]
    return out


@contextlib.contextmanager
def _index_rewritten(folder: str, entries: dict[str, list]):
    """A temporary folder of symlinks to ``folder``'s contents whose ``model_index.json`` has ``entries`` replaced
    (fal's ``["defs", ...]`` entries -> library classes, which diffusers can check); removed afterwards (the
    loaded weights do not depend on it)."""
    shadow = tempfile.mkdtemp(prefix=".flashpack-index-")
    try:
        for name in os.listdir(folder):
            if name != MODEL_INDEX_NAME:
                os.symlink(os.path.join(os.path.abspath(folder), name), os.path.join(shadow, name))
        with open(os.path.join(folder, MODEL_INDEX_NAME), encoding="utf-8") as f:
            index = json.load(f)
        index.update(entries)
        with open(os.path.join(shadow, MODEL_INDEX_NAME), "w", encoding="utf-8") as f:
            json.dump(index, f)
        yield shadow
    finally:
        shutil.rmtree(shadow, ignore_errors=True)


class FlashPackDiffusionPipeline:
    """Adds :meth:`save_pretrained_flashpack` and :meth:`from_pretrained_flashpack` to a diffusers pipeline class
    whose ``__init__`` annotates FlashPack-enabled component classes (see the module docstring). Put it first:
    ``class X(FlashPackDiffusionPipeline, StableDiffusionXLPipeline): ...``."""

    def save_pretrained_flashpack(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                                  variant: str | None = None, max_shard_size=None, push_to_hub: bool = False,
                                  commit_message: str | None = None, create_pr: bool = False,
                                  token: str | bool | None = None, repo_id: str | None = None,
                                  private: bool | None = None, is_main_process: bool = True,
                                  align_bytes: int | None = None, silent: bool = True, num_workers: int | None = None,
                                  target_dtype=None) -> str | None:
        """Write ``model_index.json`` and every component into its subfolder: FlashPack-enabled models as config +
        pack (``save_pretrained_flashpack``), everything else with its own ``save_pretrained`` (safetensors).

        Args:
            save_directory: the folder (created if missing).
            push_to_hub, repo_id, token, private, commit_message: upload the folder with ``huggingface_hub.HfApi``
                (``repo_id`` defaults to the folder's name).
            variant: ``model.<variant>.flashpack`` for packs, the library's variant naming for the rest.
            safe_serialization, max_shard_size: for the components saved the ordinary way.
            create_pr: push as a pull request. is_main_process: ``False`` writes nothing, returns ``None``.
            target_dtype: a ``torch.dtype`` for every pack, or ``{component name: dtype}``.
            align_bytes, num_workers: fal's writer knobs; accepted and ignored. silent: ``False`` prints the
                report below on stdout as well.

        Returns:
            The folder's path. ``model_index.json`` is written last, atomically. Which components were packed
            and which were saved the ordinary way is logged (INFO), with a WARNING naming model components that
            were not packed (their class is not FlashPack-enabled).
        """
        if not is_main_process:
            return None
        folder = os.fspath(save_directory)
        if os.path.isfile(folder):
            raise NotADirectoryError(f"{folder} is a file; save_directory must be a folder")
        os.makedirs(folder, exist_ok=True)
        expected, _ = self._get_signature_keys(self)
        index = json.loads(self.to_json_string())
        for k in ("_name_or_path", "_module"):
            index.pop(k, None)
        index["_class_name"] = base_library_class(self, ("diffusers",)).__name__
        packed: list[str] = []
        plain: list[str] = []
        plain_models: list[str] = []
        for name in expected:
            entry = index.get(name)
            component = getattr(self, name, None)
            if component is None or not isinstance(entry, (list, tuple)) or entry[0] is None:
                continue
            sub = os.path.join(folder, name)
            if hasattr(component, "save_pretrained_flashpack"):
                dt = target_dtype.get(name) if isinstance(target_dtype, dict) else target_dtype
                component.save_pretrained_flashpack(sub, variant=variant, target_dtype=dt)
                packed.append(name)
                base = base_library_class(component)
                index[name] = [base.__module__.split(".")[0], base.__name__]
            elif hasattr(component, "save_pretrained"):
                params = inspect.signature(component.save_pretrained).parameters
                kwargs = {}
                if "safe_serialization" in params:
                    kwargs["safe_serialization"] = safe_serialization
                if max_shard_size is not None and "max_shard_size" in params:
                    kwargs["max_shard_size"] = max_shard_size
                if "variant" in params:
                    kwargs["variant"] = variant
                if "save_peft_format" in params:
                    kwargs["save_peft_format"] = False
                component.save_pretrained(sub, **kwargs)
                (plain_models if isinstance(component, torch.nn.Module) else plain).append(name)
            else:
                logger.warning("%s: component %r (%s) has no save_pretrained; not saved", folder, name,
                               type(component).__name__)
                index[name] = [None, None]
        _write_json_atomic(os.path.join(folder, MODEL_INDEX_NAME), index)
        report = (f"{folder}: packed {packed or 'nothing'} as FlashPack; saved {plain + plain_models or 'nothing'} "
                  f"the ordinary way")
        logger.info("%s", report)
        if plain_models:
            logger.warning("%s: model component(s) %s were saved as ordinary weights, not packed: annotate them in "
                           "%s.__init__ with FlashPack-enabled classes to pack them", folder, plain_models,
                           type(self).__name__)
        if not silent:
            print(f"flashpack: {report}")
        if push_to_hub:
            push_folder(folder, repo_id=repo_id, token=token, private=private, commit_message=commit_message,
                        create_pr=create_pr)
        return folder

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' ``from_pretrained``, except that every component ``__init__`` annotates with a FlashPack-enabled
        class (one that subclasses the class ``model_index.json`` records, or a fal ``["defs", ...]`` entry) is built
        as that class, so the pipeline's ``save_pretrained_flashpack`` packs it. Components passed in ``kwargs`` are
        used as given. Hub and dtype keywords (``variant``, ``torch_dtype``/``dtype``, ``revision``,
        ``cache_dir``, ``token``, ``local_files_only``, ...) reach those components' own ``from_pretrained``.

        Raises:
            Whatever diffusers' and the components' ``from_pretrained`` raise.
        """
        hub = {k: kwargs[k] for k in _HUB_KEYWORDS if k in kwargs}
        index = cls.load_config(pretrained_model_name_or_path, **{k: v for k, v in hub.items() if k in (
            "revision", "cache_dir", "token", "local_files_only", "force_download")})
        dtype = kwargs.get("torch_dtype", kwargs.get("dtype"))
        for name, klass in annotated_components(cls, index).items():
            if name in kwargs:
                continue
            extra = dict(hub)
            local = os.path.join(os.fspath(pretrained_model_name_or_path), name)
            if kwargs.get("variant") is not None and (not os.path.isdir(local) or _variant_files(local, kwargs["variant"])):
                extra["variant"] = kwargs["variant"]
            if dtype is not None:
                extra[_dtype_kwarg(klass)] = dtype
            kwargs[name] = klass.from_pretrained(pretrained_model_name_or_path, subfolder=name, **extra)
        fixed = fal_entries(index)
        if not fixed:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        folder = os.fspath(pretrained_model_name_or_path)
        if not os.path.isdir(folder):
            folder = cls.download(folder, **{k: v for k, v in hub.items() if k in (
                "revision", "cache_dir", "token", "local_files_only", "force_download")})
        with _index_rewritten(folder, fixed) as shadow:
            pipe = super().from_pretrained(shadow, **kwargs)
        pipe.register_to_config(_name_or_path=os.fspath(pretrained_model_name_or_path), **fixed)
        return pipe

    @classmethod
    def from_pretrained_flashpack(cls, name_or_path: str | os.PathLike, device=None, *, device_map=None,
                                  variant: str | None = None, torch_dtype: torch.dtype | None = None,
                                  revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                                  local_files_only: bool = False, token: str | bool | None = None,
                                  mmap: bool = False, verify: bool | None = None, **kwargs):
        """Load a pipeline: FlashPack-enabled components from their packs, the rest with their ordinary
        ``from_pretrained`` through diffusers' own ``DiffusionPipeline.from_pretrained`` (which receives the
        FlashPack components ready-made).

        Args:
            name_or_path: a local folder, or a Hub repo id. From the Hub, the configs, tokenizer files and packs
                are fetched first; ordinary weights only for model components that have no pack.
            device_map: one device for the whole pipeline (``"cpu"`` default, ``"cuda"``, ``"cuda:1"``, ...).
            variant: pack ``model.<variant>.flashpack``; ordinary components use the library's variant rules.
            torch_dtype: dtype for ordinary components; FlashPack components keep the pack's dtypes unless this
                differs, in which case they are converted after loading.
            device: fal's second positional argument: the same as ``device_map``.
            revision, cache_dir, local_files_only, token: for the Hub.
            mmap: zero-copy CPU load of every packed component (default ``False``): its parameters are views of a
                private copy-on-write mapping of its pack (writable; writes never reach the file). Components
                loaded the ordinary way (tokenizers, plain models, packed classes without a pack) are not
                affected. CPU only: with a CUDA ``device_map`` it raises ``UsageError`` before anything is fetched
                or loaded. SIGBUS caveat: if a pack is truncated or overwritten in place while the pipeline lives,
                touching a lost page kills the process.
            verify: passed to every pack's load (default ``FLASHPACK_VERIFY``; with ``mmap=True`` only
                ``verify=True`` checks the checksums).
            num_streams, chunk_bytes, ignore_names, ignore_prefixes, ignore_suffixes, silent, strict,
                use_distributed_loading, distributed_sharded, distributed_shard_strategy, rank, local_rank,
                world_size, coerce_dtype: fal's keywords, passed to every pack's load
                (:func:`flashpack.assign_from_file`).
            dtype: the same as ``torch_dtype``.
            **kwargs: passed to ``from_pretrained`` (e.g. ``scheduler=`` to replace a component).

        Returns:
            The pipeline, all components on the device, ready to call.

        Raises:
            UsageError (``ValueError``): ``mmap=True`` with a device other than the CPU.
            UnsupportedDeviceMapError, and whatever the components' loads raise.

        Notes:
            A FlashPack-enabled component whose folder has no pack but ordinary weights is loaded with the
            annotated class's ordinary ``from_pretrained`` (case C36).
        """
        device = resolve_device(device, device_map, f"{cls.__name__}.from_pretrained_flashpack")
        if mmap:
            check_mmap_device(device, name_or_path)
        if torch_dtype is None:
            torch_dtype = kwargs.pop("dtype", None)
        assign, _ = split_fal_options(kwargs)
        pname = pack_name(variant)
        hub = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token)
        patterns = PIPELINE_FILE_PATTERNS + [f"*/{pname}", f"*/{pname}{INDEX_SUFFIX}"]
        folder = resolve_folder(name_or_path, allow_patterns=patterns, **hub)
        index = cls.load_config(folder)
        expected, _ = cls._get_signature_keys(cls)
        types = cls._get_signature_types()
        passed = {k: kwargs.pop(k) for k in expected if k in kwargs}

        wanted = [n for n in expected if n not in passed and isinstance(index.get(n), (list, tuple))
                  and index[n][0] is not None]
        remote = not os.path.isdir(os.fspath(name_or_path))
        if remote:  # second, small fetch: ordinary weights of model components that have no pack
            sharded = [n for n in wanted if not os.path.isfile(os.path.join(folder, n, pname))
                       and os.path.isfile(os.path.join(folder, n, pname + INDEX_SUFFIX))]
            plain = [n for n in wanted if not os.path.isfile(os.path.join(folder, n, pname)) and n not in sharded
                     and os.path.isfile(os.path.join(folder, n, CONFIG_NAME))]
            shards = [f"{n}/{r.file}" for n in sharded for r in read_index(os.path.join(folder, n, pname + INDEX_SUFFIX)).shards]
            if plain or shards:
                folder = resolve_folder(name_or_path, allow_patterns=patterns + [f"{n}/*" for n in plain] + shards,
                                        **hub)

        components = {}
        for name in wanted:
            sub = os.path.join(folder, name)
            klass = _flashpack_class(types.get(name, ()))
            has_pack = os.path.isfile(os.path.join(sub, pname)) or os.path.isfile(os.path.join(sub, pname + INDEX_SUFFIX))
            if klass is not None and has_pack:
                comp = klass.from_pretrained_flashpack(sub, device_map=device, variant=variant, mmap=mmap,
                                                       verify=verify, **assign)
                if torch_dtype is not None and comp.dtype != torch_dtype:
                    comp = comp.to(dtype=torch_dtype)
                components[name] = comp
            elif klass is not None and _has_weights(sub):  # C36: ordinary weights, no pack
                dtype_kw = {}
                if torch_dtype is not None:
                    dtype_kw = {_dtype_kwarg(klass): torch_dtype}
                comp = klass.from_pretrained(sub, variant=variant if _variant_files(sub, variant) else None,
                                             **dtype_kw)
                components[name] = comp.to(device) if device.type != "cpu" else comp
            elif has_pack and os.path.isfile(os.path.join(sub, CONFIG_NAME)) and not _has_weights(sub):
                raise TypeError(
                    f"{sub} holds only a FlashPack pack, but {cls.__name__}.__init__ does not annotate {name!r} with "
                    f"a FlashPack-enabled class (got {types.get(name)}); annotate it with a class that mixes in "
                    f"FlashPackDiffusersModelMixin or FlashPackTransformersModelMixin")
        load_kwargs = dict(kwargs)
        if torch_dtype is not None:
            load_kwargs[_dtype_kwarg(cls)] = torch_dtype
        if variant is not None:
            load_kwargs["variant"] = variant
        pipe = cls.from_pretrained(folder, **components, **passed, **load_kwargs)
        if device.type != "cpu":
            pipe.to(device)
        return pipe


def _dtype_kwarg(klass: type) -> str:
    """The keyword a library's ``from_pretrained`` takes a dtype by: ``dtype`` where the library deprecates
    ``torch_dtype`` (diffusers with ``utils.deprecation_utils._resolve_dtype``, transformers >= 4.56), else
    ``torch_dtype``."""
    library = base_library_class(klass).__module__.split(".")[0]
    if library == "diffusers":
        try:
            from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401  (present since dtype=)
        except ImportError:
            return "torch_dtype"
        return "dtype"
    if library == "transformers":
        import transformers

        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
        return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    return "torch_dtype"


__all__ = ["AutoFlashPackModel", "FlashPackDiffusersModelMixin", "FlashPackDiffusionPipeline", "checkpoint_key_renames",
           "diffusers_lenient_keys"]
