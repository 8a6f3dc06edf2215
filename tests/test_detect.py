"""The structure detection finds: layer counts, groups, stacked/broadcast inputs, kinds, taps."""
import torch

from hbp_compile import ResidualKind, explain

from .models import Gated, PostLN, PreLNMLP, ReLUResidual, Stack, make, mlp_stack, transformer_stack


def chain_of(model, x):
    report = explain(model, x)
    (chain,) = report.chains
    return report, chain


def test_prelN_stack_is_one_group_of_identity_layers():
    report, chain = chain_of(make(mlp_stack(6)), torch.randn(2, 3, dtype=torch.float64))
    assert report.num_layers == chain.num_layers == 6
    assert len(chain.groups) == 1 and chain.groups[0].layers == tuple(range(6))
    assert chain.kinds == (ResidualKind.IDENTITY,) * 6
    assert [layer.module_path for layer in chain.layers] == [f"layers.{i}" for i in range(6)]
    assert chain.taps == ()
    # each layer has its own LN weight/bias, fc weights (transposed) and biases: all stacked
    assert chain.groups[0].broadcast == ()
    assert len(chain.groups[0].stacked) == len(chain.layers[0].externals) == 6


def test_alternating_blocks_form_two_groups():
    _, chain = chain_of(make(transformer_stack(6)), torch.randn(2, 4, 3, dtype=torch.float64))
    assert chain.num_layers == 6
    assert [g.layers for g in chain.groups] == [(0, 2, 4), (1, 3, 5)]


def test_shared_weights_are_broadcast():
    block = PreLNMLP(4, 8)
    model = make(Stack([block] * 4, 3, 4, 2))  # the same module four times: weights shared
    _, chain = chain_of(model, torch.randn(2, 3, dtype=torch.float64))
    (group,) = chain.groups
    assert group.stacked == () and len(group.broadcast) == len(chain.layers[0].externals)


def test_residual_kinds_and_formulas():
    x = torch.randn(2, 3, dtype=torch.float64)
    _, relu_chain = chain_of(make(Stack([ReLUResidual(4) for _ in range(3)], 3, 4, 2)), x)
    assert relu_chain.kinds == (ResidualKind.DIAGONAL,) * 3
    assert relu_chain.layers[0].formula == "r = Max(0, x + z0); K = Heaviside(x + z0)"
    _, gated = chain_of(make(Stack([Gated(4) for _ in range(3)], 3, 4, 2)), x)
    assert gated.layers[0].formula == "r = x*z0 + z1; K = z0"
    _, post_ln = chain_of(make(Stack([PostLN(4) for _ in range(3)], 3, 4, 2)), x)
    assert post_ln.kinds == (ResidualKind.DIAGONAL,) * 3
    assert post_ln.layers[0].formula == "r = rstd0*z1*(-mean0 + x + z0) + z2; K = rstd0*z1"
    _, plain = chain_of(make(mlp_stack(3)), x)
    assert plain.layers[0].formula == "r = x + z0; K = 1"


def test_taps_are_states_read_by_the_loss():
    _, chain = chain_of(make(mlp_stack(4, taps=True)), torch.randn(2, 3, dtype=torch.float64))
    assert chain.taps == (1, 2, 3)


def test_detection_leaves_the_graph_unchanged():
    report = explain(make(mlp_stack(3)), torch.randn(2, 3, dtype=torch.float64))
    (record,) = report.records
    code_before = record.aten_graph.code
    from hbp_compile import find_residual_chains

    find_residual_chains(record.aten_graph.graph)
    assert record.aten_graph.code == code_before
