"""The one base class of the errors a user can cause and fix.

Each part raises its own subclass (``RecipeError``, ``StorageError`` ...), whose
message names the problem and the fix; the command line prints any of them as
one line and exits with status 2, without importing the parts that did not run.
"""


class MergesearchError(Exception):
    """A mistake in the input (a file, a setting, a model reference), not a bug."""
