"""The D-OPSD node set. Each module is one concern; each node translates ComfyUI objects into dopsd_core calls."""
from .loading import DOPSDLoadModel

NODES = [DOPSDLoadModel]
