"""EasyAnimate V4 nodes for ComfyUI.

Install: link this folder into ``ComfyUI/custom_nodes/`` (e.g. as ``custom_nodes/EasyAnimate``; a copy works where
the project is pip-installed), put model folders in the released layout into ``ComfyUI/models/EasyAnimate/`` and
install this project's requirements into ComfyUI's Python environment. Ready-made workflows are in ``workflows/``;
see the README's ComfyUI section.
"""

import importlib.util
import sys
from pathlib import Path


def _make_easyanimate_importable() -> None:
    """Where the ``easyanimate`` package is not installed, import it from the checkout this folder belongs to (the
    folder above this one's real path, so a link from ``custom_nodes/`` works). The checkout is appended to
    ``sys.path``, not put first, so its top-level scripts never shadow ComfyUI's modules (ComfyUI has an ``app``
    package, the checkout an ``app.py``)."""
    if importlib.util.find_spec("easyanimate") is not None:
        return
    checkout = Path(__file__).resolve().parent.parent
    if not (checkout / "easyanimate" / "__init__.py").is_file():
        raise ImportError("the EasyAnimate nodes need the easyanimate package: link this folder into custom_nodes/ "
                          "from a checkout of the project (not a copy), or pip install the project")
    sys.path.append(str(checkout))


_make_easyanimate_importable()

from .model_folders import register_model_folder  # noqa: E402  (needs easyanimate importable)
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

register_model_folder()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
