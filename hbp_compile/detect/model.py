"""The typed records the detector produces: ``Chain`` -> ``Layer`` / ``Group`` -> ``ResidualKind``.

They are frozen: detection is a pure analysis, and every later stage reads these records instead of
re-deriving facts from the graph.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch.fx as fx


class ResidualKind(enum.Enum):
    """How the residual function ``r(x, z)`` depends on ``x`` with the block output ``z`` held fixed."""

    IDENTITY = "identity"  # K = I: x + z
    SCALAR = "scalar"  # K = c·I: c·x + z
    DIAGONAL = "diagonal"  # K = diag(...): relu(x + z), a⊙x + b
    ZERO = "zero"  # K = 0: the layer has no residual path


@dataclass(frozen=True)
class Layer:
    """One residual layer ``h_i = r_i(h_{i-1}, g_i(h_{i-1}))`` of a chain.

    ``nodes`` is the layer's segment (topological order, ``y`` last); ``residual`` is the subset on the
    pointwise path from ``x`` to ``y``; ``externals`` are the side inputs (weights, masks) in the order
    they are first used, the same order for every layer of a group. ``side_outputs`` are block values
    that leave the layer to a sink only (a KV cache returned by the model, BatchNorm's running stats).
    """

    index: int
    x: fx.Node
    y: fx.Node
    nodes: tuple[fx.Node, ...]
    residual: tuple[fx.Node, ...]
    externals: tuple[fx.Node, ...]
    side_outputs: tuple[fx.Node, ...]
    kind: ResidualKind
    formula: str
    group: int
    module_path: str
    signature: str


@dataclass(frozen=True)
class Group:
    """Layers whose segments are the same graph up to their inputs; they share one batched VJP.

    ``stacked`` holds the external positions whose node differs between layers (stacked along a new
    leading dim); ``broadcast`` the positions that are the same node in every layer (gradients summed).
    """

    index: int
    layers: tuple[int, ...]
    stacked: tuple[int, ...]
    broadcast: tuple[int, ...]
    kind: ResidualKind


@dataclass(frozen=True)
class Chain:
    """A run of consecutive residual layers ``h_0 -> h_1 -> ... -> h_L`` found in one aten graph.

    ``taps`` lists the states ``i`` (1 <= i < L) that something outside the chain reads; each gets its
    own cotangent in the backward. ``h_L`` is always an output of the chain.
    """

    layers: tuple[Layer, ...]
    groups: tuple[Group, ...]
    taps: tuple[int, ...]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def h0(self) -> fx.Node:
        return self.layers[0].x

    @property
    def output(self) -> fx.Node:
        return self.layers[-1].y

    @property
    def kinds(self) -> tuple[ResidualKind, ...]:
        return tuple(layer.kind for layer in self.layers)
