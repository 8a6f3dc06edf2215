"""``nn.RNN``/``nn.GRU``/``nn.LSTM`` swapped for Highway-BP recurrences over time steps (float64)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hbp_compile import explain, hbp_compile

from .recurrent_models import RecurrentLoss
from .reference import highway_reference_grads, max_relative_error

TOL = 1e-8


class Head(torch.nn.Module):
    def __init__(self, rnn: torch.nn.Module, width: int):
        super().__init__()
        self.rnn, self.fc = rnn, torch.nn.Linear(width, 2)

    def forward(self, x):
        return self.fc(self.rnn(x)[0]).pow(2).mean()


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


CONFIGS = {
    "rnn-tanh": (lambda: torch.nn.RNN(3, 5), 5),
    "rnn-relu-2layers": (lambda: torch.nn.RNN(3, 5, num_layers=2, nonlinearity="relu"), 5),
    "gru": (lambda: torch.nn.GRU(3, 5), 5),
    "gru-2layers-batch-first": (lambda: torch.nn.GRU(3, 5, num_layers=2, batch_first=True), 5),
    "lstm": (lambda: torch.nn.LSTM(3, 5), 5),
    "lstm-2layers-bidirectional-dropout": (
        lambda: torch.nn.LSTM(3, 5, num_layers=2, bidirectional=True, dropout=0.25), 10),
    "gru-no-bias": (lambda: torch.nn.GRU(3, 5, bias=False), 5),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_swapped_modules_are_exact_at_k_ge_T(name):
    factory, width = CONFIGS[name]
    torch.manual_seed(0)
    model = Head(factory(), width).double()
    x = torch.randn(7, 2, 3, dtype=torch.float64)
    torch.manual_seed(1)
    want_out = model(x)
    want_out.backward()
    want = grads(model)
    model.zero_grad()
    compiled = hbp_compile(model, k=7, backend="eager")
    torch.manual_seed(1)
    out = compiled(x)
    assert torch.equal(out, want_out)  # the module's own kernels run the forward
    out.backward()
    assert max_relative_error(grads(model), want) < TOL
    steps = 2 if model.rnn.batch_first else 7
    directions = 2 if model.rnn.bidirectional else 1
    assert compiled.hbp_report.num_layers == steps * model.rnn.num_layers * directions
    assert all(r.swapped for r in compiled.hbp_report.records[0].recurrences)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("k,gamma", [(0, 0.0), (1, 0.0), (3, 0.0), (2, 0.5), (1, 1.0)])
def test_small_k_matches_sequential_reference(kind, k, gamma):
    torch.manual_seed(0)
    model = RecurrentLoss(kind, 3, 4, 2).double()
    x = torch.randn(9, 2, 3, dtype=torch.float64)
    want = highway_reference_grads(model, x, k, gamma)
    model.zero_grad()
    compiled = hbp_compile(model, k=k, gamma=gamma, backend="eager")
    compiled(x).backward()
    assert max_relative_error(grads(model), want) < TOL
    exact = highway_reference_grads(model, x, 9)
    assert max_relative_error(want, exact) > 1e-4  # a real truncation, not backprop in disguise


def test_reference_itself_is_exact_at_k_ge_T():
    torch.manual_seed(0)
    model = RecurrentLoss("lstm", 3, 4, 2).double()
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    model(x).backward()
    want = grads(model)
    assert max_relative_error(highway_reference_grads(model, x, 6), want) < TOL


class Packed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = torch.nn.LSTM(3, 5)

    def forward(self, x, lengths):
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
        return self.rnn(packed)[1][0].pow(2).sum()


def test_packed_sequences_train_exactly_and_say_so():
    torch.manual_seed(0)
    model = Packed().double()
    x, lengths = torch.randn(6, 3, 3, dtype=torch.float64), torch.tensor([6, 4, 2])
    want_out = model(x, lengths)
    want_out.backward()
    want = grads(model)
    model.zero_grad()
    compiled = hbp_compile(model, k=1, backend="eager")
    with pytest.warns(UserWarning, match="trains with exact backprop"):
        out = compiled(x, lengths)
    out.backward()
    assert torch.equal(out, want_out)
    assert max_relative_error(grads(model), want) < 1e-12


def test_explain_reports_the_recurrence():
    model = Head(torch.nn.LSTM(3, 5, num_layers=2), 5)
    report = str(explain(model, torch.randn(4, 2, 3)))
    assert "recurrence 0: nn.LSTM rnn: 2 layer(s) x 1 direction(s), T=4" in report
    assert "K = diag(f) on c, 0 on h" in report


def test_recurrence_forward_does_not_grow_the_graph_with_T():
    """One opaque op per layer-direction, whatever the sequence length."""
    model = Head(torch.nn.GRU(3, 5), 5)
    for steps in (4, 64):
        compiled = hbp_compile(model, k=1, backend="eager")
        compiled(torch.randn(steps, 2, 3))
        graph = compiled.hbp_report.records[0].aten_graph.graph
        assert sum(1 for n in graph.nodes if n.op == "call_function") < 40


class CellLoop(torch.nn.Module):
    """A Python loop over ``nn.GRUCell``/``nn.LSTMCell`` that dynamo unrolls; every step feeds the loss."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.cell = {"gru": torch.nn.GRUCell, "lstm": torch.nn.LSTMCell}[kind](3, 4)
        self.head = torch.nn.Linear(4, 1)

    def forward(self, x):
        h = torch.zeros(x.shape[1], 4, dtype=x.dtype)
        c, outputs = h, []
        for x_t in x:
            if self.kind == "lstm":
                h, c = self.cell(x_t, (h, c))
            else:
                h = self.cell(x_t, h)
            outputs.append(h)
        return self.head(torch.stack(outputs)).pow(2).sum()


class HandWrittenGRU(torch.nn.Module):
    """The GRU equations written out in a Python loop (no cell module): found by the residual rule."""

    def __init__(self, loop: CellLoop):
        super().__init__()
        self.cell, self.head = loop.cell, loop.head

    def forward(self, x):
        c = self.cell
        h, outputs = torch.zeros(x.shape[1], 4, dtype=x.dtype), []
        for x_t in x:
            i_r, i_z, i_n = F.linear(x_t, c.weight_ih, c.bias_ih).chunk(3, -1)
            h_r, h_z, h_n = F.linear(h, c.weight_hh, c.bias_hh).chunk(3, -1)
            r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
            h = (1 - z) * torch.tanh(i_n + r * h_n) + z * h
            outputs.append(h)
        return self.head(torch.stack(outputs)).pow(2).sum()


class SameAsModule(torch.nn.Module):
    """``nn.GRU``/``nn.LSTM`` over the very tensors of a ``CellLoop``'s cell."""

    def __init__(self, loop: CellLoop):
        super().__init__()
        self.kind = loop.kind
        self.rnn = {"gru": torch.nn.GRU, "lstm": torch.nn.LSTM}[loop.kind](3, 4).double()
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            setattr(self.rnn, f"{name}_l0", getattr(loop.cell, name))
        self.head = loop.head

    def forward(self, x):
        zeros = torch.zeros(1, x.shape[1], 4, dtype=x.dtype)
        return self.head(self.rnn(x, (zeros, zeros) if self.kind == "lstm" else zeros)[0]).pow(2).sum()


def loop_grads(model):
    return {n.replace("rnn.", "cell.").replace("_l0", ""): p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_cell_loop_is_one_recurrence_exact_at_k_ge_T(kind):
    torch.manual_seed(0)
    loop = CellLoop(kind).double()
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    want_out = loop(x)
    want_out.backward()
    want = grads(loop)
    loop.zero_grad()
    compiled = hbp_compile(loop, k=6, backend="eager")
    out = compiled(x)
    assert torch.equal(out, want_out)  # the loop's own one-step kernel, step by step
    out.backward()
    assert max_relative_error(grads(loop), want) < TOL
    assert compiled.hbp_report.num_layers == 6
    assert f"loop over nn.{kind.upper()}Cell cell" in str(compiled.hbp_report)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_cell_loop_at_small_k_equals_the_module_path(kind):
    """The nn.GRU/nn.LSTM path is checked against the sequential reference above; a loop over the
    cell with the same weights must give the same truncated gradient."""
    torch.manual_seed(0)
    loop = CellLoop(kind).double()
    x = torch.randn(7, 2, 3, dtype=torch.float64)
    hbp_compile(loop, k=1, backend="eager")(x).backward()
    from_loop = grads(loop)
    loop.zero_grad()
    module = SameAsModule(loop)
    hbp_compile(module, k=1, backend="eager")(x).backward()
    assert max_relative_error(from_loop, loop_grads(module)) < TOL


@pytest.mark.parametrize("k", [1, 6])
def test_hand_written_gru_loop_is_a_chain_and_agrees_with_the_module(k):
    """Two independent paths to one estimate: the residual rule on dynamo's unrolled equations (K found
    by autograd on the split layer graph) and the recurrence op (hand-written cell VJPs)."""
    torch.manual_seed(0)
    loop = CellLoop("gru").double()
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    compiled = hbp_compile(HandWrittenGRU(loop), k=k, backend="eager")
    compiled(x).backward()
    assert compiled.hbp_report.num_layers == 6
    assert compiled.hbp_report.chains[0].layers[0].kind.value == "diagonal"
    from_loop = grads(loop)
    loop.zero_grad()
    module = SameAsModule(loop)
    hbp_compile(module, k=k, backend="eager")(x).backward()
    assert max_relative_error(from_loop, loop_grads(module)) < TOL


def test_the_recurrence_backward_compiles_no_dynamo_frame_per_shape():
    """The recurrence backward's once-per-backward coefficients are compiled for each shape without
    dynamo. As one ``torch.compile``d function shared by every model and shape, they counted against
    dynamo's recompile limit: an nn.GRU LM's compile-time training step at its fifth batch shape hit
    it, and the model fell back to exact backprop. Exact at k ≥ T at each shape (float32). (The
    LSTM's coefficients from its gates are a GraphKernel the same way.)"""
    torch.manual_seed(0)
    mode, rnn = "gru", torch.nn.GRU(3, 4)
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        for steps, batch in [(3, 2), (4, 2), (2, 1)]:
            x = torch.randn(steps, batch, 3, requires_grad=True)
            state0 = torch.zeros(1, batch, 4, requires_grad=True)
            states, _ = torch.ops.hbp.recurrence(mode, x, state0, *rnn.parameters(), 10, 0.0, False, 0.0, "inductor")
            hidden = states[1:, -1]
            hidden.pow(2).sum().backward()
            got = [x.grad, *(p.grad for p in rnn.parameters())]
            x.grad = None
            rnn.zero_grad()
            h0 = torch.zeros(1, batch, 4)
            out = rnn(x, h0)[0]
            out.pow(2).sum().backward()
            want = [x.grad, *(p.grad for p in rnn.parameters())]
            rnn.zero_grad()
            assert max_relative_error(dict(enumerate(got)), dict(enumerate(want))) < 1e-5
