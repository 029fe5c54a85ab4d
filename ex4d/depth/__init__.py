"""Depth for a shot: from files (:mod:`ex4d.depth.files`, numpy only) or from a depth model
(:mod:`ex4d.depth.models`, torch; imported only when a model is asked for)."""

from .files import DepthData, check_depth, fit_depth, load_depth

__all__ = ["DepthData", "check_depth", "fit_depth", "load_depth"]
