"""Errors a user can fix. The CLI prints them as one line, without a traceback."""


class KubetrainError(Exception):
    """A mistake in input (config, data, CLI arguments) or an outside failure, said in one line."""

    exit_code = 1


class ConfigError(KubetrainError):
    """The configuration is invalid; the message names the dotted field."""

    exit_code = 2


class DataError(KubetrainError):
    """The input data cannot be used; the message names the file or column."""


class UsageError(KubetrainError):
    """A command-line argument cannot be used (a path that is a file, a read-only directory)."""

    exit_code = 2
