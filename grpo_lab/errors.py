"""The error a user's mistake raises: one type, so that the entry point can print it as
one ``error: ...`` line wherever below it was found."""


class ConfigError(ValueError):
    """A configuration value is out of range or names something that does not exist."""
