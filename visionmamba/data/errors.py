"""Exception and warning types of :mod:`visionmamba.data`."""


class DatasetError(ValueError):
    """A dataset cannot be built as requested; the message is one sentence that says what to fix."""


class CorruptImageError(DatasetError):
    """An image file cannot be decoded and the dataset was built with ``strict=True``."""


class CorruptImageWarning(UserWarning):
    """An image file cannot be decoded and was skipped (emitted once per file)."""
