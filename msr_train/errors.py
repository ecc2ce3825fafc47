"""The exception types a user sees: a problem with their input (named with its fix), and a
run that failed mid-run."""


class ConfigError(ValueError):
    """Bad input, detected before any work is done. The message names the key and the fix."""


def describe(error: BaseException) -> str:
    """An exception in one line for a message: its type and the first line of its text."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    line, rest = (lines[0], lines[1:]) if lines else ("", [])
    while line.endswith(":") and rest:  # "Error downloading x.gz:" says why on its next lines
        line = f"{line} {rest.pop(0)}"
    if len(line) > 160 and ". " in line[20:]:  # torch's messages go on with advice: keep what happened
        line = line[:line.index(". ", 20) + 1]
    return f"{type(error).__name__}: {line}"


class RunFailed(RuntimeError):
    """A run that failed mid-run: it could not write its results (a full disk, a folder
    gone read-only; the message names the folder and its free space) or one of its
    processes died. Everything saved before is intact."""
