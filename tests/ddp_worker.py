"""One rank of the DistributedDataParallel test (run by tests/test_ddp.py as ``python -m tests.ddp_worker``).

Each rank trains ``DDP(hbp_compile(model))`` on its half of a batch for two steps and writes the
gradients of each step to ``<out>/rank<r>.pt``. Environment: RANK, WORLD_SIZE, MASTER_ADDR/PORT.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from hbp_compile import hbp_compile
from tests.models import make, mlp_stack

K = 1


def batches() -> list[torch.Tensor]:
    torch.manual_seed(3)
    return [torch.randn(8, 3, dtype=torch.float64) for _ in range(2)]


def main(out_dir: str) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = make(mlp_stack(4, d=6, hidden=12))
        ddp = DistributedDataParallel(hbp_compile(model, k=K, backend="eager"))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        steps = []
        for x in batches():
            optimizer.zero_grad()
            ddp(x.chunk(world)[rank]).backward()  # the stack's loss is a mean over the batch
            steps.append({n: p.grad.clone() for n, p in model.named_parameters()})
            optimizer.step()
        torch.save(steps, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
