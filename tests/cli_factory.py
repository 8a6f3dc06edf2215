"""A factory for the CLI test: ``python -m hbp_compile explain tests.cli_factory:pre_ln_stack``."""
import torch

from .models import make, mlp_stack


def pre_ln_stack():
    """A 4-layer pre-LN MLP stack and an example input."""
    return make(mlp_stack(4, d=4, hidden=8)), (torch.randn(2, 3, dtype=torch.float64),)
