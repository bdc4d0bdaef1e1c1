"""Hugging Face integrations: thin mixins over transformers and diffusers classes.

- :mod:`flashpack.integrations.transformers`: ``FlashPackTransformersModelMixin``.
- :mod:`flashpack.integrations.diffusers`: ``FlashPackDiffusersModelMixin``, ``FlashPackDiffusionPipeline`` and
  ``AutoFlashPackModel``.
- :mod:`flashpack.integrations.hub`: ``snapshot_download`` / ``HfApi`` helpers shared by both (the download side
  lives in :mod:`flashpack.remote`, which ``flashpack.load`` uses too).

transformers and diffusers are imported only inside those modules' functions (importing this package, or even
:mod:`flashpack.integrations.transformers`, needs neither installed), and nothing in them is patched globally.

What both mixins share is in :mod:`flashpack.integrations._shared`.
"""

from ..errors import UnsupportedDeviceMapError
from ._shared import parse_device_map



def patch_integrations() -> None:
    """fal's name. fal patches transformers' and diffusers' auto classes so they can load FlashPack folders; here
    nothing needs patching (the mixins and :class:`~flashpack.integrations.diffusers.FlashPackDiffusionPipeline`
    work on their own, and fal-written pipeline folders load without it), so this does nothing. Kept so code
    written for fal runs unchanged."""
    return None


__all__ = ["UnsupportedDeviceMapError", "parse_device_map", "patch_integrations"]
