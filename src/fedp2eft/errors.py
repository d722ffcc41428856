"""One exception type for every mistake a user can fix; the CLI prints its message without a traceback."""


class FedP2EFTError(ValueError):
    """Bad input or configuration. The message says what was wrong and how to fix it."""
