"""The one exception type users see: a single line saying what was wrong and what was expected."""


class LoraError(ValueError):
    """A user error in a LoRA spec, adapter tree or function; the message is one line."""
