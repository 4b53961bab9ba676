"""Ray Train training of the baseline and the LFB operators."""

from lfb_ray.train.loop import FitResult, fit, fit_operators, run_name_for

__all__ = ["FitResult", "fit", "fit_operators", "run_name_for"]
