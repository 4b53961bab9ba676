"""AVA frame-mAP evaluation and the result CSV: pure numpy (no torch, no Ray, no model).

The command line that also runs a model first (`jobs/evaluate.py`) is `lfb_ray.evaluate_cli`.
"""

from lfb_ray.evaluation.ava_map import GROUPS, MapResult, Protocol, evaluate_frame_map
from lfb_ray.evaluation.reference import evaluate_frame_map_reference
from lfb_ray.evaluation.results import build_result_rows, read_results_csv, write_results_csv

__all__ = [
    "GROUPS",
    "MapResult",
    "Protocol",
    "build_result_rows",
    "evaluate_frame_map",
    "evaluate_frame_map_reference",
    "read_results_csv",
    "write_results_csv",
]
