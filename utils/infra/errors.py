"""The one exception type for bad user input: scripts print its message as a single line and exit."""


class UserError(ValueError):
    """Bad input (data, hyper-parameter, model); the message names the problem in one line."""
