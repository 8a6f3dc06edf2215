"""One rank of the distributed tests (run by tests/test_ddp.py as ``python -m tests.ddp_worker OUT MODE``).

Each rank trains on its half of a batch for two steps and writes the (full) gradients of each step
to ``<out>/rank<r>.pt``. MODE ``ddp``: ``DDP(hbp_compile(model))``. MODE ``fsdp``: FSDP2's
``fully_shard`` on the root module, then ``hbp_compile``; afterwards a model sharded layer by layer
takes one step and the warnings it raised go to ``<out>/rank<r>-per-layer.txt``.
Environment: RANK, WORLD_SIZE, MASTER_ADDR/PORT.
"""
from __future__ import annotations

import os
import sys
import warnings

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from hbp_compile import hbp_compile
from tests.models import make, mlp_stack

K = 1


def batches() -> list[torch.Tensor]:
    torch.manual_seed(3)
    return [torch.randn(8, 3, dtype=torch.float64) for _ in range(2)]


def _full(grad: torch.Tensor) -> torch.Tensor:
    return grad.full_tensor() if hasattr(grad, "full_tensor") else grad.clone()  # a DTensor shard under FSDP2


def main(out_dir: str, mode: str) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = make(mlp_stack(4, d=6, hidden=12))
        if mode == "ddp":
            wrapped = DistributedDataParallel(hbp_compile(model, k=K, backend="eager"))
        else:
            from torch.distributed.fsdp import fully_shard

            wrapped = hbp_compile(fully_shard(model), k=K, backend="eager")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        steps = []
        for x in batches():
            optimizer.zero_grad()
            wrapped(x.chunk(world)[rank]).backward()  # the stack's loss is a mean over the batch
            steps.append({n: _full(p.grad) for n, p in model.named_parameters()})
            optimizer.step()
        assert wrapped.module.hbp_report.num_layers == 4 if mode == "ddp" else wrapped.hbp_report.num_layers == 4
        torch.save(steps, os.path.join(out_dir, f"rank{rank}.pt"))
        if mode == "fsdp":
            per_layer = make(mlp_stack(4, d=6, hidden=12))
            for layer in per_layer.layers:
                fully_shard(layer)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                hbp_compile(fully_shard(per_layer), k=K, backend="eager", strict=False)(batches()[0]).backward()
            with open(os.path.join(out_dir, f"rank{rank}-per-layer.txt"), "w") as f:
                f.write("\n".join(str(w.message) for w in caught))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
