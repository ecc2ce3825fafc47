"""The exception types a user sees: a problem with their input (named with its fix), and a
run that failed mid-run."""


class ConfigError(ValueError):
    """Bad input, detected before any work is done. The message names the key and the fix."""


class RunFailed(RuntimeError):
    """A run that failed mid-run: it could not write its results (a full disk, a folder
    gone read-only; the message names the folder and its free space) or one of its
    processes died. Everything saved before is intact."""
