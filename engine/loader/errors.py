"""What can go wrong when loading, as the command line sees it.

`ModelLoadError` is a checkpoint that cannot be loaded (corrupt, truncated, lying metadata,
unsupported): a runtime failure, exit status 1. `ModelNotFound` is a path or id that names
nothing: the user must change the command, exit status 2 (`user_error`).
"""


class ModelLoadError(RuntimeError):
    """A checkpoint that cannot be loaded; the message is for the user, as is."""

    user_error = False


class ModelNotFound(ModelLoadError):
    """The model path (or hub id) names nothing that exists."""

    user_error = True
