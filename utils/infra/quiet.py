"""Notes the pinned stack prints on every run that are no fault of the user's, left out at import time (entry
points import this module first, before diffusers or transformers); every other warning stays.

- transformers' "`CLIPImageProcessor` requires torchvision (not installed); falling back to
  `CLIPImageProcessorPil`" (and the same for `SiglipImageProcessor`): diffusers imports both classes when its
  Stable Diffusion pipelines load; torchvision is left out on purpose (it does not import beside the pinned torch)
  and the PIL processors it falls back to are the ones these scripts use.
- diffusers' "`FluxPosEmbed` is deprecated" FutureWarning, which diffusers' own `FluxControlNetModel` raises on every
  forward pass (it still imports the old name).
"""

import logging
import warnings


def not_a_torchvision_fallback_note(record: logging.LogRecord) -> bool:
    return "requires torchvision (not installed); falling back to" not in record.getMessage()


# the logger transformers' lazy imports warn through (transformers.utils.logging.get_logger is logging.getLogger)
logging.getLogger("transformers.utils.import_utils").addFilter(not_a_torchvision_fallback_note)

# diffusers' own controlnet_flux.py imports the deprecated name; a user's code cannot act on it
warnings.filterwarnings("ignore", message="`FluxPosEmbed` is deprecated", category=FutureWarning)
