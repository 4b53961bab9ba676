"""Models: SlowOnly backbone, feature-bank operators, the LFB detector and checkpoint I/O."""

from lfb_ray.models.backbone import BasicBlock3d, Bottleneck3d, ResNet3dSlowOnly, build_backbone
from lfb_ray.models.checkpoint import (
    FORMAT,
    CheckpointError,
    convert_checkpoint,
    infer_model_config,
    load_checkpoint,
    load_mmaction2_state_dict,
    read_checkpoint_file,
    save_checkpoint,
    to_mmaction2_state_dict,
)
from lfb_ray.models.detector import FEATURE_STRIDE, LFBDetector, build_detector, roi_features
from lfb_ray.models.fbo import FBOAvg, FBOMax, FBONonLocal, NonLocalLayer, build_fbo

__all__ = [
    "FEATURE_STRIDE",
    "FORMAT",
    "BasicBlock3d",
    "Bottleneck3d",
    "CheckpointError",
    "FBOAvg",
    "FBOMax",
    "FBONonLocal",
    "LFBDetector",
    "NonLocalLayer",
    "ResNet3dSlowOnly",
    "build_backbone",
    "build_detector",
    "build_fbo",
    "convert_checkpoint",
    "infer_model_config",
    "load_checkpoint",
    "load_mmaction2_state_dict",
    "read_checkpoint_file",
    "roi_features",
    "save_checkpoint",
    "to_mmaction2_state_dict",
]
