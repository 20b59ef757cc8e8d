"""The D-OPSD node set. Each module is one concern; each node translates ComfyUI objects into dopsd_core calls."""
from .dataset import DOPSDDatasetFromFolder, DOPSDDatasetFromImages
from .item_schedules import DOPSDScheduleFlux2PerImage
from .loading import DOPSDLoadModel
from .lora_io import DOPSDSaveLoRA
from .rollout_preview import DOPSDRolloutPreview
from .teacher_reference import DOPSDTeacherContextEdit, DOPSDTeacherContextReference
from .teacher_vlm import DOPSDTeacherContextVLM
from .training import DOPSDTrain
from .training_job import DOPSDExportTrainingJob

NODES = [
    DOPSDLoadModel,
    DOPSDDatasetFromFolder,
    DOPSDDatasetFromImages,
    DOPSDTeacherContextVLM,
    DOPSDTeacherContextReference,
    DOPSDTeacherContextEdit,
    DOPSDScheduleFlux2PerImage,
    DOPSDRolloutPreview,
    DOPSDTrain,
    DOPSDExportTrainingJob,
    DOPSDSaveLoRA,
]
