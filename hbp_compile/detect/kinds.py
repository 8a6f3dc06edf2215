"""Symbolic classification of a layer's residual function with sympy.

The residual path R of a layer is a small graph of pointwise aten ops from ``x`` to ``y``. We rebuild
it as a sympy expression in ``x`` and the block outputs ``z0, z1, ...`` (values R reads from outside
R), differentiate by ``x`` with the ``z`` held fixed, and read the kind off ``K = ∂r/∂x``. The formula
also makes reports readable: ``r = x + z0, K = 1``.
"""
from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import sympy
import torch
import torch.fx as fx

from ..marks import PACKED_STATE_META_KEY, UNPACK_META_KEY
from .model import ResidualKind
from .ops import CASTS, LAYOUT_OPS

_aten = torch.ops.aten


def _alpha(node: fx.Node) -> sympy.Expr:
    return sympy.sympify(node.kwargs.get("alpha", 1))


# Pointwise aten overloads with a closed form, and the keyword arguments each rule reads. Keyed by
# overload, not by op family: ``div.Tensor_mode`` (rounding) or an unknown keyword is not the formula
# below. Anything else becomes an opaque sympy Function, whose derivative is symbolic: the kind is
# then DIAGONAL (computed numerically), which is always safe.
_ARITH = {"alpha"}
_SYMPY_OPS: dict[object, tuple[Callable[[fx.Node, list], sympy.Expr], set[str]]] = {
    _aten.add.Tensor: (lambda n, a: a[0] + _alpha(n) * a[1], _ARITH),
    _aten.add.Scalar: (lambda n, a: a[0] + _alpha(n) * a[1], _ARITH),
    _aten.sub.Tensor: (lambda n, a: a[0] - _alpha(n) * a[1], _ARITH),
    _aten.sub.Scalar: (lambda n, a: a[0] - _alpha(n) * a[1], _ARITH),
    _aten.rsub.Tensor: (lambda n, a: a[1] - _alpha(n) * a[0], _ARITH),
    _aten.rsub.Scalar: (lambda n, a: a[1] - _alpha(n) * a[0], _ARITH),
    _aten.mul.Tensor: (lambda n, a: a[0] * a[1], set()),
    _aten.mul.Scalar: (lambda n, a: a[0] * a[1], set()),
    _aten.div.Tensor: (lambda n, a: a[0] / a[1], set()),
    _aten.div.Scalar: (lambda n, a: a[0] / a[1], set()),
    _aten.neg.default: (lambda n, a: -a[0], set()),
    _aten.relu.default: (lambda n, a: sympy.Max(0, a[0]), set()),
    _aten.sigmoid.default: (lambda n, a: 1 / (1 + sympy.exp(-a[0])), set()),
    _aten.tanh.default: (lambda n, a: sympy.tanh(a[0]), set()),
    _aten.exp.default: (lambda n, a: sympy.exp(a[0]), set()),
    _aten.alias.default: (lambda n, a: a[0], set()),
}
# Views, reshapes and casts on the path: detection admits them only where every element keeps its
# position from x to y (segments.keeps_element_positions), so for K they are the identity.
_SYMPY_OPS.update({op: (lambda n, a: a[0], set()) for op in LAYOUT_OPS})
_SYMPY_OPS.update({op: (lambda n, a: a[0], kwargs) for op, kwargs in CASTS.items()})


def _closed_form(node: fx.Node) -> Callable[[fx.Node, list], sympy.Expr] | None:
    rule, known_kwargs = _SYMPY_OPS.get(node.target, (None, set()))
    if rule is None or not set(node.kwargs) <= known_kwargs:
        return None
    return rule


def residual_expression(
    x: fx.Node, residual: Sequence[fx.Node]
) -> tuple[sympy.Expr, sympy.Symbol]:
    """Build ``r(x, z)`` as a sympy expression from the residual nodes (topological order, y last)."""
    xs = sympy.Symbol("x")
    env: dict[fx.Node, sympy.Expr] = {x: xs}
    outside: dict[fx.Node, sympy.Symbol] = {}

    def value(arg: object) -> sympy.Expr:
        if isinstance(arg, fx.Node):
            if arg not in env:
                outside.setdefault(arg, sympy.Symbol(f"z{len(outside)}"))
                return outside[arg]
            return env[arg]
        if isinstance(arg, (int, float, bool)):
            return sympy.nsimplify(arg)
        return sympy.Symbol(f"c_{type(arg).__name__}")

    layer_norms: dict[fx.Node, sympy.Expr] = {}
    for node in residual:
        if node.target is _aten.native_layer_norm.default:
            # with its statistics held fixed (they come from the block): (s - mean)·rstd·w + b
            i = len(layer_norms)
            out = (value(node.args[0]) - sympy.Symbol(f"mean{i}")) * sympy.Symbol(f"rstd{i}")
            weight, bias = (node.args[2:4] + (None, None))[:2]
            layer_norms[node] = out * (value(weight) if weight is not None else 1) + (
                value(bias) if bias is not None else 0)
            continue
        if node.target is operator.getitem and node.args[0] in layer_norms:
            env[node] = layer_norms[node.args[0]]
            continue
        if UNPACK_META_KEY in node.meta or PACKED_STATE_META_KEY in node.meta:
            # a packed (a, b) state (detect/pairs.py): the path reads a and writes a
            env[node] = value(node.args[0] if UNPACK_META_KEY in node.meta else node.args[0][0])
            continue
        args = [value(a) for a in node.args]
        rule = _closed_form(node)
        if rule is not None:
            env[node] = rule(node, args)
        else:
            packet = getattr(node.target, "overloadpacket", None)
            env[node] = sympy.Function(getattr(packet, "__name__", str(node.target)))(*args)
    return env[residual[-1]], xs


def classify_residual(x: fx.Node, residual: Sequence[fx.Node]) -> tuple[ResidualKind, str]:
    """Return the residual kind and a one-line formula ``r = ..., K = ...``.

    >>> # for h = x + B(x):  (ResidualKind.IDENTITY, 'r = x + z0; K = 1')
    """
    if not residual:
        return ResidualKind.ZERO, "r = z0; K = 0"
    expr, xs = residual_expression(x, residual)
    k = sympy.simplify(sympy.diff(expr, xs))
    if k == 1:
        kind = ResidualKind.IDENTITY
    elif k == 0:
        kind = ResidualKind.ZERO
    elif not k.free_symbols:
        kind = ResidualKind.SCALAR
    else:
        kind = ResidualKind.DIAGONAL
    if PACKED_STATE_META_KEY in residual[-1].meta:
        # K acts on the first component and is 0 on the second: diagonal whatever its first part
        return (ResidualKind.ZERO if k == 0 else ResidualKind.DIAGONAL), f"r = [{expr}, z_b]; K = diag({k}, 0)"
    return kind, f"r = {expr}; K = {k}"
