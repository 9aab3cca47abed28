"""Reading a search back: trial tables, Pareto fronts, choosing and exporting a point."""

from .pareto import choose, export_trial, format_front, trials_frame

__all__ = ["choose", "export_trial", "format_front", "trials_frame"]
