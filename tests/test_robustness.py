"""The model is never damaged and gradients are never silently wrong (issue 7's contract)."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

from hbp_compile import hbp_compile

from .models import make, mlp_stack
from .reference import max_relative_error


def x_for():
    return torch.randn(3, 3, dtype=torch.float64)


def test_compiling_leaves_the_original_untouched_and_twice_is_fine():
    model = make(mlp_stack(3, d=4, hidden=8))
    hook_calls = []
    model.register_forward_hook(lambda *_: hook_calls.append(1))
    before = copy.deepcopy(model.state_dict())
    first, second = hbp_compile(model, k=1, backend="eager"), hbp_compile(model, k=2, backend="eager")
    x = x_for()
    assert torch.equal(first(x), second(x))
    assert model.training and len(model._forward_hooks) == 1
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())


def test_state_dict_round_trip_and_deepcopy():
    model = make(mlp_stack(3, d=4, hidden=8))
    compiled = hbp_compile(model, k=1, backend="eager")
    x = x_for()
    want = compiled(x)
    buffer = io.BytesIO()
    torch.save(compiled.state_dict(), buffer)
    other = make(mlp_stack(3, d=4, hidden=8), seed=1)
    other_compiled = hbp_compile(other, k=1, backend="eager")
    buffer.seek(0)
    other_compiled.load_state_dict(torch.load(buffer))
    assert torch.equal(other_compiled(x), want)
    clone = copy.deepcopy(compiled)
    assert torch.equal(clone(x), want)
    clone(x).backward()  # the copy trains its own parameters
    assert all(p.grad is None for p in model.parameters())
    pickled = pickle.loads(pickle.dumps(compiled))  # after a call: the captured graphs are not pickled
    assert type(pickled) is type(compiled) and pickled.hbp_options == compiled.hbp_options
    assert torch.equal(pickled(x), want)
    pickled(x).backward()
    assert pickled.hbp_report.num_layers == 3 and all(p.grad is None for p in model.parameters())


def test_no_grad_and_eval_give_the_original_outputs():
    model = make(mlp_stack(3, d=4, hidden=8))
    compiled = hbp_compile(model, k=1, backend="eager")
    x = x_for()
    with torch.no_grad():
        assert torch.equal(compiled(x), model(x))
    compiled.eval()
    assert not model.training
    assert torch.equal(compiled(x), model(x))


def test_double_backward_is_refused_clearly():
    model = make(mlp_stack(3, d=4, hidden=8))
    compiled = hbp_compile(model, k=1, backend="eager")
    loss = compiled(x_for())
    with pytest.raises(RuntimeError, match="hbp_compile: double backward"):
        (grad,) = torch.autograd.grad(loss, model.layers[0].fc1.weight, create_graph=True)
        grad.sum().backward()


def test_double_backward_through_a_recurrence_is_refused_clearly():
    model = torch.nn.GRU(3, 4).double()
    compiled = hbp_compile(model, k=1, backend="eager")
    out = compiled(torch.randn(5, 2, 3, dtype=torch.float64))[0].sum()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out, model.weight_hh_l0, create_graph=True)


@pytest.mark.parametrize("shapes", [[(3, 3), (5, 3), (3, 3)], [(2, 4, 3), (2, 7, 3)]])
def test_changing_input_shapes_recompile_and_stay_exact(shapes):
    model = make(mlp_stack(3, d=4, hidden=8))
    compiled = hbp_compile(model, k=3, backend="eager")
    for shape in shapes:
        x = torch.randn(*shape, dtype=torch.float64)
        model.zero_grad()
        model(x).backward()
        want = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        out = compiled(x)
        assert torch.equal(out, model(x))
        out.backward()
        assert max_relative_error({n: p.grad for n, p in model.named_parameters()}, want) < 1e-8


def assert_autocast_bfloat16_matches_backprop(device: str) -> None:
    model = make(mlp_stack(3, d=8, hidden=16)).float().to(device)
    x = torch.randn(4, 3, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        want_out = model(x)
    want_out.float().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = hbp_compile(model, k=3, backend="eager")
    with torch.autocast(device, dtype=torch.bfloat16):
        out = compiled(x)
    out.float().backward()
    assert torch.allclose(out.float(), want_out.float(), rtol=1e-2, atol=1e-2)
    assert max_relative_error({n: p.grad for n, p in model.named_parameters()}, want) < 2e-2


def test_autocast_bfloat16_on_cpu_matches_autocast_backprop():
    assert_autocast_bfloat16_matches_backprop("cpu")


def test_a_parent_module_round_trips_its_state_dict():
    """Lightning and friends hold the compiled model as a child: ``parent.state_dict()`` has the
    model's own keys under the child's name, and ``parent.load_state_dict`` takes them back."""
    parent = torch.nn.Module()
    parent.net = hbp_compile(make(mlp_stack(3, d=4, hidden=8)), k=1, backend="eager")
    parent.head = torch.nn.Linear(4, 1)
    state = parent.state_dict()
    assert "net.layers.0.fc1.weight" in state and not any("_orig_mod" in k for k in state)
    other = torch.nn.Module()
    other.net = hbp_compile(make(mlp_stack(3, d=4, hidden=8), seed=1), k=1, backend="eager")
    other.head = torch.nn.Linear(4, 1)
    other.load_state_dict(state)
    assert all(torch.equal(state[k], v) for k, v in other.state_dict().items())
    with pytest.raises(RuntimeError, match="Missing key"):
        other.load_state_dict({k: v for k, v in state.items() if k != "net.layers.0.fc1.weight"})
