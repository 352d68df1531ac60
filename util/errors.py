"""The one exception type for mistakes a user can fix."""


class UserError(Exception):
    """A problem with the user's input (flags, files, data) rather than a bug.

    The ``main_*`` scripts catch it, print its message (which must say what to do) and exit with
    status 2, without a traceback and without touching anything already written.
    """
