"""Detect stage: aten graph -> ``Chain`` records. Pure analysis; the graph is not changed."""
from .chain import Detection, find_residual_chains
from .kinds import classify_residual
from .model import Chain, Group, Layer, ResidualKind
from .segments import Segment, find_residual_segments

__all__ = [
    "Chain",
    "Detection",
    "Group",
    "Layer",
    "ResidualKind",
    "Segment",
    "classify_residual",
    "find_residual_chains",
    "find_residual_segments",
]
