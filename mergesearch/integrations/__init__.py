"""Adapters that plug mergesearch into other tools' search loops.

Each submodule imports its tool lazily by being imported itself: ``import
mergesearch`` never pulls in Ray.  ``mergesearch.integrations.ray_tune`` lets Ray
Tune drive a mergesearch strategy and evaluate recipes in reusable trial actors.
"""
