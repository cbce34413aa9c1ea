"""The one exception type users see: a one-line message naming the problem and the fix."""


class DistillkitError(Exception):
    """A user-facing error (bad recipe, data, model pair, plugin, ...).

    The CLI prints its message on one line without a traceback.
    """
