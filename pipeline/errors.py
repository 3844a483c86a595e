"""The one error type a user sees: what was expected, what was received, what to do."""


class MfsimError(Exception):
    """A problem with the user's input or configuration.

    The command line prints ``error: <message>`` on one line and exits with code 2;
    nothing is published. Programming errors are not wrapped in this type.
    """

    exit_code = 2
