"""Errors that are the user's to fix: the CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """Bad config, data, checkpoint or command line; the message names the problem and the fix."""


class ConfigError(UserError):
    """The experiment config is invalid."""


class DataError(UserError):
    """The training data cannot be read or is unusable."""


class TrainingDiverged(UserError):
    """The loss became non-finite."""


class PreemptionGraceExpired(Exception):
    """The checkpoint of a preempted run was not written within distributed.preemption_grace_s."""


def cause(error: BaseException) -> str:
    """The type and message of the error that caused the others, on one line."""
    while error.__cause__ is not None:  # the reason, not the layers that passed it on
        error = error.__cause__
    message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    if len(message) > 300:
        message = message[:300] + "..."
    return f"{type(error).__name__}: {message}"
