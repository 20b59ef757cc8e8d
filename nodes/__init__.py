"""The D-OPSD node set. Each module is one concern; each node translates ComfyUI objects into dopsd_core calls."""
from .conditioning import DOPSDTeacherContextVLM
from .dataset import DOPSDDatasetFromFolder, DOPSDDatasetFromImages
from .loading import DOPSDLoadModel
from .lora_io import DOPSDSaveLoRA
from .rollout_preview import DOPSDRolloutPreview
from .training import DOPSDTrain

NODES = [
    DOPSDLoadModel,
    DOPSDDatasetFromFolder,
    DOPSDDatasetFromImages,
    DOPSDTeacherContextVLM,
    DOPSDRolloutPreview,
    DOPSDTrain,
    DOPSDSaveLoRA,
]
