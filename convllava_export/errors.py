"""User-facing errors. The CLI prints their message and exits with code 2, no traceback."""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (its type's name when it has none): what a
    one-line error quotes from a third-party library."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class ConvLlavaError(Exception):
    """Base class: a problem with the user's input or environment, explained in the message."""


class CheckpointError(ConvLlavaError):
    """The checkpoint folder is missing, incomplete, corrupt or of an unsupported kind."""


class ImageError(ConvLlavaError):
    """An image could not be read or is unsafe to decode."""


class ExportError(ConvLlavaError):
    """An export or engine build cannot proceed as asked."""


class BuildError(ConvLlavaError):
    """A build folder is missing, mismatched or cannot be used here."""


class PromptError(ConvLlavaError):
    """A prompt does not fit its images (e.g. `<image>` placeholders vs images given)."""


class MissingExtraError(ConvLlavaError):
    """An optional dependency is not installed."""


class GateError(ConvLlavaError):
    """A build was made but measured wrong (below an accuracy threshold): exit 1, nothing written."""

    exit_code = 1
