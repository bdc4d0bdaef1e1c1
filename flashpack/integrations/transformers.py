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
import functools
import importlib.util
import inspect
import os
import re
from typing import Iterable

import torch

from ..errors import ModelMismatchError
from ..mixin import check_mmap_device, init_empty_weights
from ._shared import (
    DEFAULT_MAX_SHARD_SIZE,
    base_library_class,
    find_pack,
    load_model,
    resolve_device,
    save_model_folder,
    split_fal_options,
    stored_keys_match,
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
            As ``save_pretrained``, the keys the model lists in ``_keys_to_ignore_on_save`` (values transformers
            recomputes on load, such as Marian's sinusoidal ``embed_positions.weight``) are not written;
            ``from_pretrained_flashpack`` recomputes them the same way.
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
                                 max_shard_size=max_shard_size, progress=progress, omit_keys=_omitted_on_save(self))
        if not silent:
            print(f"flashpack: saved {type(self).__name__} to {path}")
        return path

    @classmethod
    def from_pretrained_flashpack(cls, name_or_path: str | os.PathLike, device=None, *, device_map=None,
                                  subfolder: str | None = None, variant: str | None = None,
                                  revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                                  local_files_only: bool = False, token: str | bool | None = None,
                                  torch_dtype: torch.dtype | None = None, dtype: torch.dtype | None = None,
                                  key_mapping: dict[str, str] | None = None, mmap: bool = False,
                                  verify: bool | None = None, **config_overrides):
        """Build the model from its config on the meta device and fill it from its pack. For a CPU target (without
        ``mmap=True`` or distributed loading) the pack is read on a background thread while the model is built
        (:class:`flashpack.deserialization.EarlyLoad`); a build or match error cancels that read first.

        A pack written under an older transformers, whose keys follow that version's layout, loads when the
        installed transformers' ``from_pretrained`` would load the same keys from safetensors: its checkpoint key
        renames are applied to the pack's keys (:func:`checkpoint_key_renames`; the tensors stay views).

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
            key_mapping: ``{regex: replacement}`` renames of the stored keys, as for ``from_pretrained``.
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
            ModelMismatchError: the pack does not fit the model after the key renames (missing or unexpected keys,
                shapes, dtypes), or stores keys in an older layout that transformers converts by merging or
                splitting tensors (:func:`checkpoint_key_renames`).
            ChecksumMismatchError and everything :func:`flashpack.assign_from_file` raises.
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

        def key_renames(model, wm):
            return checkpoint_key_renames(model, wm.keys(), key_mapping=key_mapping,
                                          strict=assign.get("strict") is not False, path=wm.path)

        absent: list[str] = []  # keys transformers leaves out of its checkpoints, not in this pack either
        model = load_model(build, pack, device, tie=lambda m: m.tie_weights(), assign=assign, key_renames=key_renames,
                           lenient_keys=transformers_lenient_keys, init_omitted=lambda m, keys: absent.extend(keys))
        _init_unloaded_buffers(model, absent)
        if model.can_generate() and os.path.isfile(os.path.join(folder, GENERATION_CONFIG_NAME)):
            model.generation_config = GenerationConfig.from_pretrained(folder)
        model.config._name_or_path = os.fspath(name_or_path)
        if want_dtype is not None and model.dtype != want_dtype:
            model = model.to(dtype=want_dtype)
        return model


def checkpoint_key_renames(model, keys, *, key_mapping: dict[str, str] | None = None, strict: bool = True,
                           path: str = "the pack") -> dict[str, str]:
    """The renames transformers' own ``from_pretrained`` applies to the keys of a checkpoint of ``model``, so a
    pack written under an older transformers (e.g. 4.57's ``CLIPTextModel`` stored ``text_model.embeddings...``,
    5.x's has ``embeddings...``) loads under the installed one.

    Where the rules come from: transformers >= 5 (``transformers.conversion_mapping.get_model_conversion_mapping``
    and ``transformers.core_model_loading.rename_source_key``, as ``PreTrainedModel.from_pretrained`` calls them):
    the model's registered conversions (by class name, then ``model_type``, scoped for sub-models), the legacy
    ``LayerNorm.gamma``/``beta`` renames, a ``key_mapping``, and adding or stripping ``base_model_prefix``. Keys
    are visited in transformers' order (``dot_natural_key``), as some renames depend on it. A FlashPack subclass
    (``class X(FlashPackTransformersModelMixin, CLIPTextModel)``) is looked up as the transformers class it
    extends. On a transformers without those functions (4.x) a fallback applies the rules that version's loader
    had: ``key_mapping`` (else the model's ``_checkpoint_conversion_mapping``), the first matching regex per key,
    the ``LayerNorm.gamma``/``beta`` renames, and ``base_model_prefix`` added or stripped.

    Only pure renames are applied: the tensors stay views of the pack. A key that transformers converts by
    merging or splitting tensors (a ``WeightConverter``: fused MoE experts, chunked projections) is refused.

    Args:
        model: the model built from its config (meta parameters are fine).
        keys: the keys the pack stores (aliases included).
        key_mapping: extra ``{regex: replacement}`` renames, as ``from_pretrained(key_mapping=)``.
        strict: ``False``: keys needing a conversion are left as stored (then reported missing/unexpected by the
            lenient load) instead of raising.
        path: the pack, for messages.

    Returns:
        ``{stored key: model key}`` for the keys whose name changes; empty when the pack is in the model's layout
        (every stored key is a model key) and no ``key_mapping`` is given.

    Raises:
        ModelMismatchError (``ValueError``): with ``strict``, stored keys that transformers converts with tensor
            operations (naming the keys and the conversion).
    """
    keys = list(keys)
    if key_mapping is None and stored_keys_match(model, keys):
        return {}
    model_keys = {k: True for k in model.state_dict()}  # transformers tests ``.get(key) is not None``
    fns = _transformers_conversion_functions()
    if fns is None:
        return _legacy_key_renames(model, keys, model_keys, key_mapping)
    get_mapping, rename_source_key, renaming_cls, converter_cls, order = fns
    library_class = base_library_class(model, ("transformers",))
    own_class = type(model)
    try:  # looked up (by class name, and "custom code" by module) as the transformers class it extends
        model.__class__ = library_class
    except TypeError:  # a subclass whose instance layout differs (``__slots__``): looked up as itself
        library_class = own_class
    try:
        transforms = get_mapping(model, key_mapping=key_mapping)
    finally:
        model.__class__ = own_class
    renamings = [t for t in transforms if isinstance(t, renaming_cls)]
    converters = [t for t in transforms if isinstance(t, converter_cls)]
    prefix = model.base_model_prefix
    renames: dict[str, str] = {}
    converted: dict[str, str] = {}
    for key in sorted(keys, key=order):
        new, pattern = rename_source_key(key, renamings, converters, prefix, model_keys)
        if new not in model_keys and key in model_keys:  # transformers' own retry: only the prefix
            new, pattern = rename_source_key(key, [], [], prefix, model_keys)
        if new not in model_keys:
            continue  # left as stored: reported as unexpected (and the model's key as missing)
        if pattern is not None:
            converted[key] = new
        elif new != key:
            renames[key] = new
    if converted and strict:
        import transformers

        shown = [f"{k} -> {v}" for k, v in list(converted.items())[:10]]
        raise ModelMismatchError(
            f"{path}: {len(converted)} stored key(s) are in an older layout that transformers "
            f"{transformers.__version__} converts by merging or splitting tensors ({shown}"
            f"{' ...' if len(converted) > 10 else ''}); flashpack loads a pack's tensors as views and applies key "
            f"renames only. Re-pack under this transformers: `flashpack revert {path} <folder>/model.safetensors` "
            f"(with this model's config.json in <folder>), load <folder> with {library_class.__name__}.from_pretrained "
            f"and save it with save_pretrained_flashpack")
    return renames


def _transformers_conversion_functions():
    """transformers' own conversion functions (5.x), or ``None`` when this transformers lacks them or they take
    other arguments than the ones :func:`checkpoint_key_renames` passes."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            dot_natural_key,
            rename_source_key,
        )
    except ImportError:
        return None
    try:
        mapping_params = inspect.signature(get_model_conversion_mapping).parameters
        rename_params = list(inspect.signature(rename_source_key).parameters)
    except (TypeError, ValueError):
        return None
    if "key_mapping" not in mapping_params or rename_params[:5] != ["source_key", "weight_renamings",
                                                                   "weight_converters", "base_model_prefix",
                                                                   "meta_state_dict"]:
        return None
    return get_model_conversion_mapping, rename_source_key, WeightRenaming, WeightConverter, dot_natural_key


def _legacy_key_renames(model, keys: list[str], model_keys: dict[str, bool],
                        key_mapping: dict[str, str] | None) -> dict[str, str]:
    """transformers 4.x's key renames on load (``PreTrainedModel._get_key_renaming_mapping``): the first matching
    regex of ``key_mapping`` (else ``_checkpoint_conversion_mapping``), ``LayerNorm.gamma``/``beta`` ->
    ``weight``/``bias``, then ``base_model_prefix`` stripped or added when that gives a model key."""
    mapping = key_mapping if key_mapping is not None else (getattr(model, "_checkpoint_conversion_mapping", None) or {})
    prefix = getattr(model, "base_model_prefix", "") or ""
    renames: dict[str, str] = {}
    for key in keys:
        new = key
        for pattern, replacement in mapping.items():
            new, n = re.subn(pattern, replacement, new)
            if n:
                break
        if new.endswith("LayerNorm.gamma"):
            new = new[:-len("gamma")] + "weight"
        elif new.endswith("LayerNorm.beta"):
            new = new[:-len("beta")] + "bias"
        if prefix and new not in model_keys:
            if new.startswith(prefix + ".") and new[len(prefix) + 1:] in model_keys:
                new = new[len(prefix) + 1:]
            elif f"{prefix}.{new}" in model_keys:
                new = f"{prefix}.{new}"
        if new != key and new in model_keys:
            renames[key] = new
    return renames


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


@functools.cache
def _flag_aware_init() -> bool:
    """Whether transformers' init functions skip tensors flagged ``_is_hf_initialized`` (``transformers.initialization``,
    v5)."""
    return importlib.util.find_spec("transformers.initialization") is not None


def _flag_initialized(model, unflagged: set[str] = frozenset()) -> None:
    """Flag every parameter and persistent buffer ``_is_hf_initialized`` (transformers v5's init functions skip a
    flagged tensor), as transformers' ``from_pretrained`` leaves the tensors it loaded: a later ``init_weights()``
    does not overwrite them. Non-persistent buffers (``position_ids``, rotary ``inv_freq``) and the ``unflagged``
    keys (not loaded) stay unflagged."""
    skip = {id(b) for _, b in model.named_non_persistent_buffers()} \
        if hasattr(model, "named_non_persistent_buffers") else set()
    for key in unflagged:  # by name: no walk over the whole model
        owner_name, _, leaf = key.rpartition(".")
        owner = model.get_submodule(owner_name)
        skip.add(id(owner._parameters.get(leaf, owner._buffers.get(leaf))))
    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in skip:
            t._is_hf_initialized = True


def _omitted_on_save(model) -> set[str]:
    """The keys transformers' ``save_pretrained`` leaves out of a checkpoint of ``model`` (its
    ``_keys_to_ignore_on_save``, matched exactly; v5 gathers the sub-models' under their prefixes in ``post_init``):
    values ``from_pretrained`` recomputes (Marian's sinusoidal ``embed_positions.weight``)."""
    return set(getattr(model, "_keys_to_ignore_on_save", None) or ())


def _patterns(model, attribute: str, extra: Iterable[str] = ()) -> re.Pattern | None:
    """The model's regexes in ``attribute`` (a list or set; ``None``) plus ``extra``, as one pattern (``search``)."""
    pats = [*(getattr(model, attribute, None) or ()), *extra]
    return re.compile("|".join(f"({p})" for p in pats)) if pats else None


def transformers_lenient_keys(model, file_keys: list[str]) -> tuple[set[str], set[str]]:
    """The exceptions transformers' ``from_pretrained`` makes to a strict key match, for a pack (its keys after the
    checkpoint renames) and ``model``: ``(absent, skipped)`` for :func:`flashpack.integrations.load_model`.

    Where the rules come from (transformers 5, ``PreTrainedModel.save_pretrained`` and
    ``_adjust_missing_and_unexpected_keys``): ``absent`` are model keys the pack lacks that are in
    ``_keys_to_ignore_on_save`` (the library never writes them) or match ``_keys_to_ignore_on_load_missing``;
    ``skipped`` are pack keys the model does not have that match ``_keys_to_ignore_on_load_unexpected``, or
    ``rotary_emb.inv_freq`` / ``position_ids`` when the model has such buffers (they were persistent in older
    releases). ``from_pretrained`` initialises every missing key and drops every unexpected one, warning about the
    rest; ``from_pretrained_flashpack`` stays strict about the rest. Only a model with such rules, or a pack with
    such keys, pays for listing the model's keys."""
    save = _omitted_on_save(model)
    missing_rx = _patterns(model, "_keys_to_ignore_on_load_missing")
    stale = [k for k in file_keys if k.endswith("rotary_emb.inv_freq") or _POSITION_IDS.search(k)]
    if not (save or missing_rx or stale or getattr(model, "_keys_to_ignore_on_load_unexpected", None)):
        return set(), set()
    model_keys = set(model.state_dict(keep_vars=True))
    files = set(file_keys)
    absent = {k for k in model_keys - files if k in save or (missing_rx is not None and missing_rx.search(k))}
    extra = []
    if stale:
        buffers = [name for name, _ in model.named_buffers()]
        if any(b.endswith("rotary_emb.inv_freq") for b in buffers):
            extra.append(r"rotary_emb\.inv_freq")
        if any(b.endswith("position_ids") for b in buffers):
            extra.append(_POSITION_IDS.pattern)
    unexpected_rx = _patterns(model, "_keys_to_ignore_on_load_unexpected", extra)
    skipped = {k for k in files - model_keys if unexpected_rx is not None and unexpected_rx.search(k)}
    return absent, skipped


_POSITION_IDS = re.compile(r"(^|\.)position_ids$")


def _init_unloaded_buffers(model, omitted: list[str] | None = None) -> None:
    """Run the model's own ``initialize_weights`` for what the pack did not fill (non-persistent buffers such as
    ``position_ids`` or rotary ``inv_freq``, and the ``omitted`` keys: :func:`_omitted_on_save` ones the pack
    lacks), the way transformers' ``from_pretrained`` does: every loaded parameter and buffer is flagged
    ``_is_hf_initialized`` first, so transformers' init functions skip it.

    After the fill, not before it on the meta model (which would overlap the read): some models' ``_init_weights``
    write into loaded weights through a view the flag does not reach (ChineseCLIP zeroes
    ``embedding.weight[padding_idx]``), and ``from_pretrained`` keeps that effect; run on meta tensors it would be
    lost and the weights would differ from ``from_pretrained``'s.
    Only on transformers versions with flag-aware init (``transformers.initialization``, v5); before that, each
    ``omitted`` key's module gets the model's ``_init_weights(module)``, as 4.x's loader did for a missing key."""
    if not _flag_aware_init() or not hasattr(model, "initialize_weights"):
        with torch.no_grad():
            for owner in {key.rpartition(".")[0] for key in omitted or ()}:
                if hasattr(model, "_init_weights"):
                    model._init_weights(model.get_submodule(owner))
        return
    _flag_initialized(model, unflagged=set(omitted or ()))
    with torch.no_grad():
        model.initialize_weights()


__all__ = ["FlashPackTransformersModelMixin", "checkpoint_key_renames", "transformers_lenient_keys"]
