"""Errors of the lab; str() is always one line."""


class LabError(RuntimeError):
    """A lab that cannot be built, reached or torn down; str() is one line."""


class LabNotFound(LabError):
    """No lab with that id or directory (for down: already removed)."""
