"""Dumps under ``debug_dir=`` / ``$HBP_DEBUG_DIR``, and the ``python -m hbp_compile explain`` CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hbp_compile import hbp_compile

from .models import make, mlp_stack

EXPECTED = {"dynamo_graph.py", "aten_graph.py", "rewritten_graph.py", "report.txt", "report.json",
            "chain0_group0_layer.py", "chain0_group0_split.py", "chain0_group0_batched_vjp.py", "memory.txt"}


def test_debug_dir_receives_every_dump(tmp_path):
    model = make(mlp_stack(3, d=4, hidden=8))
    compiled = hbp_compile(model, k=1, backend="eager", debug_dir=str(tmp_path))
    compiled(torch.randn(3, 3, dtype=torch.float64)).backward()
    graph_dir = tmp_path / "graph_0"
    assert EXPECTED <= {p.name for p in graph_dir.iterdir()}
    report = json.loads((graph_dir / "report.json").read_text())
    assert report["num_layers"] == 3 and report["chains"][0]["num_layers"] == 3
    assert "3 residual layer(s)" in (graph_dir / "report.txt").read_text()
    assert "hbp_chain_0" in (graph_dir / "rewritten_graph.py").read_text()
    assert "hbp_chain_0" not in (graph_dir / "aten_graph.py").read_text()
    vjp = (graph_dir / "chain0_group0_batched_vjp.py").read_text()
    assert "bmm" in vjp or "mm" in vjp  # one batched matmul per weight, not one per layer
    memory = (graph_dir / "memory.txt").read_text()
    assert memory.startswith("compile-time training step: peak ")
    for category in ("states", "activations", "weights", "iteration", "gradients", "the rest of the peak"):
        assert category in memory


def test_backward_memory_counts_the_stacked_weights_and_their_gradients():
    """What the last backward held: the weights of the 3 layers stacked once, their gradients, the 4
    states; float64, width 4, hidden 8, batch 3."""
    from hbp_compile.engine.highway import ChainModule

    model = make(mlp_stack(3, d=4, hidden=8))
    compiled = hbp_compile(model, k=1, backend="eager")
    compiled(torch.randn(3, 3, dtype=torch.float64)).backward()
    (chain,) = [m for m in compiled.hbp_backend.records[0].rewritten.modules() if isinstance(m, ChainModule)]
    memory = chain.program.memory
    layer_params = sum(p.numel() for p in model.layers[0].parameters()) * 8
    # fc1's and fc2's weights stacked over the 3 layers, and the vectors the backward reads (LN's weight)
    assert 3 * (8 * 4 + 4 * 8) * 8 <= memory.weights <= memory.gradients
    assert memory.gradients == 3 * layer_params and memory.states == 4 * 3 * 4 * 8


def test_environment_variable_and_fallback_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("HBP_DEBUG_DIR", str(tmp_path))
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    with pytest.warns(UserWarning, match="no residual chain"):
        hbp_compile(model, k=1, backend="eager")(torch.randn(2, 3)).sum().backward()
    report = json.loads((tmp_path / "graph_0" / "report.json").read_text())
    assert report["fallback"] == "NO_CHAIN" and report["reason"]


def test_cli_prints_the_report():
    out = subprocess.run([sys.executable, "-m", "hbp_compile", "explain", "tests.cli_factory:pre_ln_stack", "--k", "2"],
                         capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent)
    assert "4 residual layer(s), k=2" in out.stdout


def test_cli_explains_a_bad_target():
    out = subprocess.run([sys.executable, "-m", "hbp_compile", "explain", "tests.cli_factory"],
                         capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert out.returncode == 2 and "module:factory" in out.stderr
