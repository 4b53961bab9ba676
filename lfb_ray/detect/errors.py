"""The one error type of `jobs/detect.py`: bad inputs, each with a message that says what to do."""

from lfb_ray.redaction import RedactedMessage

__all__ = ["DetectError"]


class DetectError(RedactedMessage, ValueError):
    """A bad input of the detect job (missing or corrupt video, wrong checkpoint, mismatched bank)."""
