"""Errors a user can act on. Every one derives from `UserError`, which the CLI prints as one line
(`svd-animate: error: ...`) with a non-zero exit; anything else is a bug and keeps its traceback."""


class UserError(Exception):
    """Something the user can fix or decide about; the message says what and where."""


class InputError(UserError):
    """A bad input file or option: the message names the file or option and what is wrong with it."""


class NoPersonError(InputError):
    """No person was found where one was needed."""


class InvalidValue(InputError, ValueError):
    """A value a pure function cannot work with (a window shorter than its overlap, an unknown mode).
    Also a `ValueError`, so library callers catch it the usual way."""


class WeightsError(UserError):
    """Model weights that are missing, unreachable, gated, or not the model they should be."""


class ResourceError(UserError):
    """The job does not fit the machine (memory); the message says what would."""


class TrainingError(UserError):
    """A training run had to stop (a non-finite loss); the last good checkpoint is kept."""


class SamplingError(UserError):
    """Sampling produced NaN or infinite values (an extreme setting, or an overflow in half precision); nothing of
    the job is written."""


class Cancelled(UserError):
    """The user stopped the job (the page's Cancel button); nothing of it was written."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, systemd, Slurm, Kubernetes) turned into an exception, so it unwinds like Ctrl-C: every
    `with` block closes, temporary files are removed, and the command exits with status 143 (128 + 15)."""
