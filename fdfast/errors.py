"""User-facing errors: bad input that the CLI reports in one line (exit code 2), no traceback."""


class FDFastError(ValueError):
    """A problem with the user's input (config, files, shapes) whose message names the fix.

    Subclasses ValueError so that host-side kernel checks (``raise ValueError``) and library callers
    that catch ValueError keep working; the CLI prints ``error: <message>`` and exits with code 2.
    """
