"""Validated options of the pass, shared by ``hbp_compile(...)`` and ``torch.compile(backend="hbp")``."""
from __future__ import annotations

import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

BACKENDS = ("inductor", "eager")
_UNBOUNDED = 2**31 - 1  # k="auto" without k_max: the depth bounds the iterations


@dataclass(frozen=True)
class HbpOptions:
    """Options of the Highway-BP pass.

    * ``k``: iterations of Highway-BP; ``k >= L`` gives exact gradients, ``0`` trains every block on
      the output gradient carried along the residual path only. ``"auto"``: iterate until the
      relative change ``‖w^{j+1} − w^j‖ / ‖w^j‖`` is at most ``tol``, or ``k_max`` iterations (default:
      the depth, where the gradient is exact); the k used is in ``HighwayModule.hbp_iterations``.
    * ``tol``, ``k_max``: the stopping rule of ``k="auto"`` (ignored for an integer k).
    * ``gamma``: γ-split in [0, 1] (HIGHWAY_BP.md §1); 1 is fixed-point iteration.
    * ``backend``: ``"inductor"`` (code generation) or ``"eager"`` (the same rewrite, uncompiled).
      Default: ``$HBP_BACKEND`` (set ``HBP_BACKEND=eager`` to debug a training script without
      editing it), else ``"inductor"``.
    * ``recompute``: ``True`` keeps only the states between forward and backward and recomputes the
      block intermediates in one batched forward per group in the backward (memory like activation
      checkpointing); ``False`` keeps them from the forward (memory like backprop, no extra forward).
    * ``min_layers``: shortest chain worth rewriting.
    * ``chunk``: layers per call of a group's batched VJPs in the backward. ``None``: automatic:
      convolution blocks take as many layers as keep one call's input states within 1 MiB, other
      blocks all of a group's layers at once. Smaller chunks lower the backward's peak memory (the VJP's temporaries exist for one
      chunk of layers at a time) for more, smaller kernel calls; gradients are the same.
    * ``debug_dir``: where dumps go (default: ``$HBP_DEBUG_DIR``).
    * ``strict``: raise instead of falling back to exact backprop when a graph cannot be rewritten
      (a failing stage, an unsupported feature, a forward mismatch); graphs with no chain and
      inference still run as they are. Default: ``$HBP_STRICT`` (``1`` turns it on), else False.

    >>> HbpOptions.from_mapping({"k": 2, "gamma": 0.2}).k
    2
    """

    k: int | str = 3
    gamma: float = 0.0
    backend: str | None = None
    recompute: bool = True
    min_layers: int = 2
    debug_dir: str | None = None
    tol: float = 1e-3
    k_max: int | None = None
    strict: bool | None = None
    chunk: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.k, str):
            if self.k != "auto":
                raise ValueError(f"hbp_compile: k must be a non-negative int or 'auto', got {self.k!r}")
        elif isinstance(self.k, bool) or not isinstance(self.k, numbers.Integral):
            raise TypeError(f"hbp_compile: k must be a non-negative int or 'auto', got {self.k!r} ({type(self.k).__name__})")
        elif self.k < 0:
            raise ValueError(f"hbp_compile: k must be a non-negative int or 'auto', got {self.k}")
        if isinstance(self.tol, bool) or not isinstance(self.tol, numbers.Real) or not 0 < float(self.tol) < 1:
            raise ValueError(f"hbp_compile: tol must be a float in (0, 1), got {self.tol!r}")
        if self.k_max is not None and (isinstance(self.k_max, bool) or not isinstance(self.k_max, int) or self.k_max < 0):
            raise ValueError(f"hbp_compile: k_max must be a non-negative int or None, got {self.k_max!r}")
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, numbers.Real):
            raise TypeError(f"hbp_compile: gamma must be a float in [0, 1], got {self.gamma!r}")
        if not 0.0 <= float(self.gamma) <= 1.0:
            raise ValueError(f"hbp_compile: gamma must be in [0, 1], got {self.gamma}")
        if self.backend is None:
            object.__setattr__(self, "backend", os.environ.get("HBP_BACKEND") or "inductor")
        if self.backend not in BACKENDS:
            raise ValueError(f"hbp_compile: backend must be one of {BACKENDS} (or unset, to read $HBP_BACKEND), "
                             f"got {self.backend!r}")
        if not isinstance(self.recompute, bool):
            raise TypeError(f"hbp_compile: recompute must be True or False, got {self.recompute!r}")
        if isinstance(self.min_layers, bool) or not isinstance(self.min_layers, int) or self.min_layers < 1:
            raise ValueError(f"hbp_compile: min_layers must be an int >= 1, got {self.min_layers!r}")
        if self.chunk is not None and (isinstance(self.chunk, bool) or not isinstance(self.chunk, int) or self.chunk < 1):
            raise ValueError(f"hbp_compile: chunk must be an int >= 1 or None, got {self.chunk!r}")
        if self.strict is None:
            object.__setattr__(self, "strict", os.environ.get("HBP_STRICT", "") not in ("", "0"))
        elif not isinstance(self.strict, bool):
            raise TypeError(f"hbp_compile: strict must be True, False or None, got {self.strict!r}")
        if self.k != "auto":
            object.__setattr__(self, "k", int(self.k))
        object.__setattr__(self, "tol", float(self.tol))
        object.__setattr__(self, "gamma", float(self.gamma))
        if self.debug_dir is None and os.environ.get("HBP_DEBUG_DIR"):
            object.__setattr__(self, "debug_dir", os.environ["HBP_DEBUG_DIR"])

    @property
    def max_iterations(self) -> int:
        """The engine's iteration cap (it also stops at the depth, where the gradient is exact)."""
        if self.k != "auto":
            return self.k  # type: ignore[return-value]
        return self.k_max if self.k_max is not None else _UNBOUNDED

    @property
    def stop_tol(self) -> float:
        """The engine's convergence tolerance: 0 (run every iteration) unless ``k="auto"``."""
        return self.tol if self.k == "auto" else 0.0

    @classmethod
    def from_mapping(cls, options: Mapping[str, object] | None) -> "HbpOptions":
        """Build from ``torch.compile``'s ``options=`` dict; unknown keys are an error, not ignored."""
        options = dict(options or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"hbp_compile: unknown option(s) {unknown}; accepted options are {sorted(known)}")
        return cls(**options)  # type: ignore[arg-type]
