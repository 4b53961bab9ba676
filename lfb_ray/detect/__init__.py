"""Action detection on any video (`jobs/detect.py`, docs/detect.md)."""

from lfb_ray.detect.errors import DetectError
from lfb_ray.detect.run import DetectResult, detect_video

__all__ = ["DetectError", "DetectResult", "detect_video"]
