"""The one exception type the CLI turns into a one-line message and exit code 2."""


class InputError(Exception):
    """Bad input from the user (file, model, option): the message is shown as one line."""
