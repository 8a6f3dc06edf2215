"""Detect stage: aten graph -> ``Chain`` records. Pure analysis, but for
``pack_state_pairs``, which packs a recurrence's pair of states into one before detection."""
from .chain import Detection, find_residual_chains
from .kinds import classify_residual
from .model import Chain, Group, Layer, ResidualKind
from .pairs import StatePair, find_state_pairs, pack_state_pairs
from .segments import Segment, find_residual_segments

__all__ = [
    "Chain",
    "Detection",
    "Group",
    "Layer",
    "ResidualKind",
    "Segment",
    "StatePair",
    "classify_residual",
    "find_residual_chains",
    "find_residual_segments",
    "find_state_pairs",
    "pack_state_pairs",
]
