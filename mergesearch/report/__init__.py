"""Reading a search back: trial tables, Pareto fronts, choosing and exporting a point."""

from .pareto import best_values, choose, export_trial, format_front, trials_frame

__all__ = ["best_values", "choose", "export_trial", "format_front", "trials_frame"]
