"""Reading a search back: Pareto fronts, best values, choosing and exporting a point."""

from .pareto import best_values, choose, export_trial, format_front, write_trial

__all__ = ["best_values", "choose", "export_trial", "format_front", "write_trial"]
