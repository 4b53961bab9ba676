"""Ray Train training of the baseline and the LFB operators.

`lfb_ray.train.schedule` imports without Ray; the names below load `loop` (and Ray) on first use.
"""

__all__ = ["FitManyError", "FitResult", "fit", "fit_many", "fit_operators", "plan_concurrency", "run_name_for"]


def __getattr__(name: str):
    if name in __all__:
        from lfb_ray.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'lfb_ray.train' has no attribute {name!r}")
