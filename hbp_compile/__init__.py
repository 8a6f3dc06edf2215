"""hbp_compile: train deep and recurrent networks with Highway backpropagation.

>>> from hbp_compile import hbp_compile, explain
"""
import logging

from .api import HighwayModule, explain, hbp_compile
from .backend import HbpBackend, hbp_backend
from .detect import Chain, Group, Layer, ResidualKind, find_residual_chains
from .inspect import Report
from .options import HbpOptions
from .records import Fallback, GraphRecord, HbpError

# Quiet by default: applications opt in with logging.getLogger("hbp_compile").setLevel(...) + a handler.
logging.getLogger("hbp_compile").addHandler(logging.NullHandler())

# `hbp_compile.explain(...)` as DESIGN.md §1 spells it, besides `from hbp_compile import explain`.
hbp_compile.explain = explain  # type: ignore[attr-defined]

__all__ = [
    "Chain",
    "Fallback",
    "GraphRecord",
    "Group",
    "HbpBackend",
    "HbpError",
    "HbpOptions",
    "HighwayModule",
    "Layer",
    "Report",
    "ResidualKind",
    "explain",
    "find_residual_chains",
    "hbp_backend",
    "hbp_compile",
]
__version__ = "0.1.0"
