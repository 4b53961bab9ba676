"""lfb_ray: Long-Term Feature Banks (Wu et al., CVPR 2019) on AVA, trained with Ray."""

__version__ = "0.1.0"
