"""Ray Train training of the baseline and the LFB operators.

`lfb_ray.train.driver` starts the runs (`fit`, `fit_many`, `fit_operators`); `lfb_ray.train.recipe`
is what each worker runs. `lfb_ray.train.schedule` and `lfb_ray.train.resources` import without
Ray; the names below load the driver (and Ray) on first use.
"""

__all__ = ["FitManyError", "FitResult", "fit", "fit_many", "fit_operators", "plan_concurrency", "run_name_for"]


def __getattr__(name: str):
    if name == "run_name_for":
        from lfb_ray.runs import run_name_for

        return run_name_for
    if name == "plan_concurrency":
        from lfb_ray.train.resources import plan_concurrency

        return plan_concurrency
    if name in __all__:
        from lfb_ray.train import driver

        return getattr(driver, name)
    raise AttributeError(f"module 'lfb_ray.train' has no attribute {name!r}")
