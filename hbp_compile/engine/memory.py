"""What a chain's Highway-BP backward holds in memory, by category (the dumps' ``memory.txt``).

Recorded by every backward (the compile-time training step included) on its ``ChainProgram``:

* ``states``: the chain's states ``h_0 … h_L``, kept from the forward, in one stack per run where
  that makes the batched VJPs' input states a view of it (``StateStacks``);
* ``activations``: the values the batched VJPs read (the saving forward's outputs, recomputed once
  per backward or kept from the forward), stacked over each group's layers;
* ``weights``: the stacked copies of per-layer parameters among those values (vmap needs the
  layers' weights as one tensor);
* ``iteration``: the iterates' buffer (two with ``k="auto"``), the nonzero rows of ``a`` and the
  residual Jacobians (a bool mask where they are zeros and ones);
* ``gradients``: the stacked weight and side-input gradients of the last call (the ``.grad`` the
  parameters receive).

The first four are alive together at the end of the iterations; the gradients come after, in the
last call, which frees the stacked weights first where it restacks them a chunk at a time
(``SavedGroup.side_grads``). What else the peak holds (the temporaries inside one batched VJP call,
the block VJPs of one iteration, or of one chunk where the iterations are pipelined, the rest of the
graph's values) is the difference to a measured peak, which the dumps give when they
can measure one.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields

import torch

MiB = 2 ** 20


def nbytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages of ``tensors`` (views of one storage count once).

    >>> x = torch.zeros(4, 4)
    >>> nbytes([x, x[0], None, torch.zeros(2)])
    72
    """
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


@dataclass
class BackwardMemory:
    """Bytes held by the last backward of one chain, by category (module docstring)."""

    states: int = 0
    activations: int = 0
    weights: int = 0
    iteration: int = 0
    gradients: int = 0

    def clear(self) -> None:
        for f in fields(self):
            setattr(self, f.name, 0)

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))

    def lines(self) -> list[str]:
        """One line per category, in MiB.

        >>> print("\\n".join(BackwardMemory(states=MiB, weights=2 * MiB).lines()[:3]))
        states        1.00 MiB
        activations   0.00 MiB
        weights       2.00 MiB
        """
        return [f"{f.name:<12}{getattr(self, f.name) / MiB:6.2f} MiB" for f in fields(self)]
