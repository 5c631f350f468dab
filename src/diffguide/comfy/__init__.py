"""diffguide as a ComfyUI node pack: a guider, a sampler and a sigmas node (docs/comfyui.md).

Importing this package needs no ComfyUI (it is imported inside the functions that run a node), so
the package, its install command and its checks work everywhere. ``diffguide comfy install
COMFYUI_DIR`` writes the custom_nodes/diffguide/__init__.py that ComfyUI loads.
"""

from .guider import checked_guidance, make_guider, refusal
from .installer import install
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .sampler import ksampler, sampler_function
from .sigmas import grid_sigmas
