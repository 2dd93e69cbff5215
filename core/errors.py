"""One exception type for mistakes a user can fix (bad config, missing data, bad artifact).

CLIs catch it and print one line instead of a traceback; see `core.cli.stage_main`.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line, never a traceback."""
