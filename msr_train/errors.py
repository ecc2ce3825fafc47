"""The one exception type a user sees: a problem with their input, named with its fix."""


class ConfigError(ValueError):
    """Bad input, detected before any work is done. The message names the key and the fix."""
