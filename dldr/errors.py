"""The one exception type a user can cause; the CLI prints it as a single line and exits 1."""


class DldrError(Exception):
    """A problem with the user's input or environment; the message says what to do."""
