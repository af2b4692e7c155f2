"""Exception classes raised for user errors (bad input, bad files, bad configs).

Library code raises these instead of `assert` so the CLI can print one clear line.
"""


class ConvLlavaError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(ConvLlavaError, ValueError):
    """An unknown preset, projector type, recipe key or an invalid option value."""


class ImageError(ConvLlavaError, ValueError):
    """An image that cannot be used: missing, not an image, truncated, too large. Names the file."""


class CheckpointError(ConvLlavaError, ValueError):
    """A checkpoint with missing/unexpected keys, an unsafe format, or an unknown layout."""


class DataError(ConvLlavaError, ValueError):
    """A dataset file or record in the wrong format (says file and line)."""


class TemplateError(ConvLlavaError, ValueError):
    """A conversation that does not fit the chat template or the images given with it."""
