"""The one base class of the errors a user can cause and fix.

Each part raises its own subclass (``RecipeError``, ``StorageError`` ...), whose
message names the problem and the fix; the command line prints any of them as
one line and exits with status 2, without importing the parts that did not run.
"""


class MergesearchError(Exception):
    """A mistake in the input (a file, a setting, a model reference), not a bug."""


class MissingExtra(MergesearchError):
    """An optional dependency a command needs is not installed."""


def require_extra(modules: tuple[str, ...], extra: str, feature: str) -> None:
    """Refuse ``feature`` in one line naming the pip extra when a module it needs is
    missing (found without importing it)."""
    from importlib.util import find_spec

    missing = [m for m in modules if find_spec(m) is None]
    if missing:
        raise MissingExtra(f"{feature} needs {', '.join(missing)}: pip install "
                           f"'mergesearch[{extra}]'")
