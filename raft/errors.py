"""The one exception raft raises for bad input; the CLI prints it as a single line."""


class RaftError(Exception):
    """Bad input or a failed component. The message names what is wrong in one line."""


class ConfigError(RaftError):
    """A config value is unknown, of the wrong type or out of range. The message names the field."""
