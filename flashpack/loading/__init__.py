"""The load stages under :func:`flashpack.load`: :mod:`.common` (the one prelude shared by every load, and the
rebuilding of tensors on the loaded bytes), :mod:`.host` (straight into CPU memory, or a private mapping),
:mod:`.staged` (through the pinned staging ring to a CUDA device) and :mod:`.distributed` (ranks of a
``torch.distributed`` group share the reading). :mod:`flashpack.deserialization` chooses among them."""
