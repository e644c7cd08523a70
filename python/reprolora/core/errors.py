class ReproloraError(Exception):
    """A user-facing error: the message says what is wrong and where, on one line."""
