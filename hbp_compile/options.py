"""Validated options of the pass, shared by ``hbp_compile(...)`` and ``torch.compile(backend="hbp")``."""
from __future__ import annotations

import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

BACKENDS = ("inductor", "eager")


@dataclass(frozen=True)
class HbpOptions:
    """Options of the Highway-BP pass.

    * ``k``: iterations of Highway-BP; ``k >= L`` gives exact gradients, ``0`` trains every block on
      the output gradient carried along the residual path only.
    * ``gamma``: γ-split in [0, 1] (HIGHWAY_BP.md §1); 1 is fixed-point iteration.
    * ``backend``: ``"inductor"`` (code generation) or ``"eager"`` (the same rewrite, uncompiled).
    * ``recompute``: ``True`` keeps only the states between forward and backward and recomputes the
      block intermediates in one batched forward per group in the backward (memory like activation
      checkpointing); ``False`` keeps them from the forward (memory like backprop, no extra forward).
    * ``min_layers``: shortest chain worth rewriting.
    * ``debug_dir``: where dumps go (default: ``$HBP_DEBUG_DIR``).

    >>> HbpOptions.from_mapping({"k": 2, "gamma": 0.2}).k
    2
    """

    k: int = 3
    gamma: float = 0.0
    backend: str = "inductor"
    recompute: bool = True
    min_layers: int = 2
    debug_dir: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, numbers.Integral):
            raise TypeError(f"hbp_compile: k must be a non-negative int, got {self.k!r} ({type(self.k).__name__})")
        if self.k < 0:
            raise ValueError(f"hbp_compile: k must be a non-negative int, got {self.k}")
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, numbers.Real):
            raise TypeError(f"hbp_compile: gamma must be a float in [0, 1], got {self.gamma!r}")
        if not 0.0 <= float(self.gamma) <= 1.0:
            raise ValueError(f"hbp_compile: gamma must be in [0, 1], got {self.gamma}")
        if self.backend not in BACKENDS:
            raise ValueError(f"hbp_compile: backend must be one of {BACKENDS}, got {self.backend!r}")
        if not isinstance(self.recompute, bool):
            raise TypeError(f"hbp_compile: recompute must be True or False, got {self.recompute!r}")
        if isinstance(self.min_layers, bool) or not isinstance(self.min_layers, int) or self.min_layers < 1:
            raise ValueError(f"hbp_compile: min_layers must be an int >= 1, got {self.min_layers!r}")
        object.__setattr__(self, "k", int(self.k))
        object.__setattr__(self, "gamma", float(self.gamma))
        if self.debug_dir is None and os.environ.get("HBP_DEBUG_DIR"):
            object.__setattr__(self, "debug_dir", os.environ["HBP_DEBUG_DIR"])

    @classmethod
    def from_mapping(cls, options: Mapping[str, object] | None) -> "HbpOptions":
        """Build from ``torch.compile``'s ``options=`` dict; unknown keys are an error, not ignored."""
        options = dict(options or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"hbp_compile: unknown option(s) {unknown}; accepted options are {sorted(known)}")
        return cls(**options)  # type: ignore[arg-type]
