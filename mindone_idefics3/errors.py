"""The one exception type users see for their own mistakes (bad input, bad checkpoint, unsupported device/dtype)."""


class Idefics3Error(ValueError):
    """A user-facing error: the message says what is wrong and how to fix it.

    The CLI prints these as one line on stderr and exits with code 2 (no traceback).
    """
