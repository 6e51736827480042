"""The one exception type for mistakes a user can fix.

The CLI turns it into a single line and exit code 2; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """Bad input (scenario, path, missing dataset) described in one line."""
