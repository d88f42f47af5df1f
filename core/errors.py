"""The one error type the command line turns into a single line and exit code 2."""


class ConfigError(Exception):
    """Bad user input (recipe, override, plugin name, data path): the message is the whole story."""
