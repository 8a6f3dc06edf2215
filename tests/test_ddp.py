"""DistributedDataParallel and FSDP2 (gloo, 2 processes on this CPU): an hbp-compiled model trains
under DDP, and under ``fully_shard`` on its root module, and its gradients equal single-process
training on the whole batch, step after step. A model sharded layer by layer is not rewritten (the
graph breaks at every sharded module) and the warning says so.

The ranks are plain subprocesses (``python -m tests.ddp_worker``) with a timeout, not forks of the
pytest process: a forked rank inherits pytest's and dynamo's state and a hang would stall the suite.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from hbp_compile import hbp_compile

from .ddp_worker import K, batches
from .models import make, mlp_stack
from .reference import max_relative_error

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_single_process(tmp_path, mode):
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2",
               OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    ranks = [subprocess.Popen([sys.executable, "-m", "tests.ddp_worker", str(tmp_path), mode], cwd=ROOT,
                              env=dict(env, RANK=str(r)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    try:
        logs = [p.communicate(timeout=300)[0] for p in ranks]
    finally:
        for p in ranks:
            p.kill()
    for r, (p, log) in enumerate(zip(ranks, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log[-4000:]}"

    model = make(mlp_stack(4, d=6, hidden=12))
    single = hbp_compile(model, k=K, backend="eager")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    want = []
    for x in batches():
        optimizer.zero_grad()
        single(x).backward()
        want.append({n: p.grad.clone() for n, p in model.named_parameters()})
        optimizer.step()
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        for step, (g, w) in enumerate(zip(got, want)):
            assert max_relative_error(g, w) < 1e-10, f"rank {r} step {step}"
    if mode == "fsdp":
        for r in range(2):
            said = (tmp_path / f"rank{r}-per-layer.txt").read_text()
            assert "fully_shard" in said and "root module" in said, said
