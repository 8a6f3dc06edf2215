"""Every ```python block of README.md and docs/*.md runs, so that the docs stay true.

A page's blocks run in order in one namespace, as a reader would type them. Names a page leaves to
the reader (``model``, ``loader``, ...) are defined here, small. The rewrite runs with the eager
backend (``HBP_BACKEND=eager``): Inductor's code generation is covered by test_inductor.py, and a
snippet test should not spend minutes compiling. Third-party warnings are ignored, but an
hbp_compile warning fails the test, because a snippet that falls back to exact backprop
documents something the pass does not do. Blocks shown but not meant to run are fenced as ``text``.
"""
from __future__ import annotations

import re
import socket
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from .models import make, mlp_stack

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted(p for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")] if "```python" in p.read_text())
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


class _ResidualMLP(torch.nn.Module):
    """What the quickstart calls ``MyResNet``: a classifier over 8 features with 4 residual blocks."""

    def __init__(self):
        super().__init__()
        self.stack = mlp_stack(4)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        h = self.stack.inp(x)
        for layer in self.stack.layers:
            h = layer(h)
        return self.head(h)


def _names_the_page_assumes() -> dict[str, object]:
    torch.manual_seed(0)
    model = make(mlp_stack(4)).float()
    x = torch.randn(4, 3)
    return {
        "model": model, "example_input": x, "example_x": x, "example_args": (x,),
        "compiled": __import__("hbp_compile").hbp_compile(model, k=2),
        "MyResNet": _ResidualMLP, "loader": [(x, torch.tensor([0, 1, 2, 0]))] * 2,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_page_has_its_snippets_found():
    assert {p.name for p in PAGES} >= {"README.md", "quickstart.md", "integrations.md", "debugging.md"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    if page.name == "integrations.md":
        for package in ("transformers", "accelerate", "lightning"):
            pytest.importorskip(package)
    monkeypatch.setenv("HBP_BACKEND", "eager")
    # the DDP snippet calls init_process_group as under torchrun: one rank here
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    monkeypatch.chdir(tmp_path)
    namespace = _names_the_page_assumes()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.filterwarnings("error", message="hbp_compile")
            for i, block in enumerate(BLOCK.findall(page.read_text())):
                code = compile(block, f"{page.name} python block {i + 1}", "exec")
                exec(code, namespace)  # noqa: S102 - the docs' own code
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
