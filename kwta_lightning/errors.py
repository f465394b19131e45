"""Errors that mean "the input is wrong": entry points print them as one line and exit 2."""


class KWTAError(Exception):
    """Bad input from the user: a config value, a name, a file. The message says which."""


class ConfigError(KWTAError, ValueError):
    """A config value is out of range or names nothing we know."""


class DataMissing(KWTAError, FileNotFoundError):
    """A data set is not in its folder and could not be downloaded."""
