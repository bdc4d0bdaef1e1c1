"""Tools around the loader: the ``flashpack`` command line (:mod:`.cli`), conversion from safetensors /
torch checkpoints (:mod:`.convert`), the way back (:mod:`.revert`) and the environment report
(:mod:`.doctor`, ``python -m flashpack.tools.doctor [path]``). The top of the pipeline: nothing below imports it."""
