"""The one error type users see: a sentence saying what was expected and what was found."""


class CnnmodError(Exception):
    """A problem with the user's input (file, data, option), reported without a traceback."""
