"""Public entry points: ``hbp_compile(model, k)`` and ``explain(model, *args)``."""
from __future__ import annotations

import copy
import inspect
import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import torch

from ._torch_compat import OptimizedModule, RecompileLimitHit, capturing_rnns, compile_context, recompile_limit
from .backend import HbpBackend
from .compile import fresh_function
from .engine.highway import ChainModule
from .engine.iterate import IterationUsage
from .inspect.report import Report
from .options import HbpOptions


def _fresh_entry(module: torch.nn.Module) -> Callable[..., Any]:
    # Dynamo caches compiled frames per code object; every model of one class shares ``forward``'s
    # code, and after ``recompile_limit`` backends it silently runs eager. A fresh top-level code
    # object per compiled module keeps models apart (and their Highway-BP rewrite in place).
    return fresh_function(module, "hbp_entry")


def _with_signature_of(model: torch.nn.Module, call: Callable[..., Any]) -> Callable[..., Any]:
    """``call`` as the wrapper's ``forward``, with the model's ``forward`` signature: tools that read
    it (the Hugging Face Trainer keeps only the dataset columns ``forward`` names) see the model's."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        return call(*args, **kwargs)

    try:
        forward.__signature__ = inspect.signature(model.forward)  # type: ignore[attr-defined]
    except (TypeError, ValueError):  # a builtin or C forward: keep (*args, **kwargs)
        pass
    forward.__doc__ = getattr(model.forward, "__doc__", None)
    return forward


def _sharded_layers_advice(model: torch.nn.Module) -> str:
    """Why a model sharded layer by layer with FSDP2 has no chain, and what to do; "" otherwise."""
    fsdp_module = getattr(getattr(torch.distributed, "fsdp", None), "FSDPModule", None)
    if fsdp_module is None:
        return ""
    sharded = [name for name, m in model.named_modules() if name and isinstance(m, fsdp_module)]
    if not sharded:
        return ""
    return (f"{len(sharded)} submodules are sharded with FSDP2's fully_shard (`{sharded[0]}`, ...) and torch.compile "
            "splits the graph at each of them, so no chain of layers is captured whole. Apply fully_shard to "
            "the root module only (trains exactly with Highway-BP), or use DistributedDataParallel; ")


def _keys_under_orig_mod(state_dict: dict, prefix: str, *args: Any) -> None:
    """A parent module's ``load_state_dict`` walks into the wrapper's ``_orig_mod`` child and looks
    for ``{prefix}_orig_mod.*``; the wrapper's ``state_dict`` wrote the model's own keys under
    ``prefix``. Renamed here, before the walk reaches the child, so that any parent round-trips."""
    inner = prefix + "_orig_mod."
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + key[len(prefix):]] = state_dict.pop(key)


class HighwayModule(OptimizedModule):
    """A model whose backward runs Highway-BP. Shares parameters and buffers with the original.

    It is an ``OptimizedModule``, the class ``torch.compile`` returns, so that tools which unwrap
    compiled models find the original in ``_orig_mod``: accelerate's ``unwrap_model``, the Hugging
    Face Trainer's ``save_model`` (``save_pretrained`` on the model, tied weights handled) and
    Lightning's ``Trainer.fit``. ``state_dict()`` and ``load_state_dict()`` use the original model's
    keys, also inside a parent module (``parent.load_state_dict(parent.state_dict())`` round-trips);
    attributes the wrapper does not have are looked up on the original model, and attributes set on
    the wrapper stay on it (``nn.Module`` semantics, not ``OptimizedModule``'s forwarding).
    """

    # nn.Module's attribute handling and call, not OptimizedModule's (which forwards every assignment
    # to the original and marks calls for dynamo's hook tracing)
    __setattr__ = torch.nn.Module.__setattr__
    __delattr__ = torch.nn.Module.__delattr__
    __call__ = torch.nn.Module.__call__

    def __init__(self, model: torch.nn.Module, options: HbpOptions, dynamic: bool | None = None):
        if dynamic not in (None, True, False):
            raise TypeError(f"hbp_compile: dynamic must be None, True or False (as torch.compile's), got {dynamic!r}")
        # OptimizedModule's ``training`` property reads this flag while nn.Module.__init__ runs
        object.__setattr__(self, "_super_module_initialized", False)
        torch.nn.Module.__init__(self)
        self._super_module_initialized = True
        self._orig_mod = model
        self.hbp_options = options
        self.hbp_backend = HbpBackend(options, quiet_no_chain=True)
        self.dynamic = dynamic
        # torch.compile's own rule for shapes: the first call specializes, a shape that changes makes
        # dynamo trace once more with symbolic sizes, and that graph serves every later shape (the
        # backend rewrites it at each concrete shape: shapes.py)
        self._compiled = torch.compile(_fresh_entry(model), backend=self.hbp_backend, dynamic=dynamic)
        # what Lightning's ``from_compiled`` wraps ``training_step`` with: the same Highway-BP backend
        self.dynamo_ctx = compile_context(self.hbp_backend, dynamic)
        self._register_load_state_dict_pre_hook(_keys_under_orig_mod)
        self.forward = _with_signature_of(model, self._highway_forward)
        self.uncaptured_calls = 0  # calls that ran the original model: past the recompile limit, or never captured
        self._warned_uncaptured = False
        self._warned_nothing_rewritten = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._highway_forward(*args, **kwargs)

    def _highway_forward(self, *args: Any, **kwargs: Any) -> Any:
        try:
            with capturing_rnns(fail_on_recompile_limit=True):
                out = self._compiled(*args, **kwargs)
        except RecompileLimitHit:
            self._warn_uncaptured(
                f"this call needed a new compilation past torch._dynamo.config.recompile_limit "
                f"({recompile_limit()} per model): it ran the original model with exact backprop, as will "
                "every later call with unseen input shapes. Pad inputs to a few fixed shapes (e.g. "
                "bucket sequence lengths), or raise the limit")
            return self._orig_mod(*args, **kwargs)
        if torch.is_grad_enabled():
            if not self.hbp_backend.records:
                self._warn_uncaptured(
                    "the forward ran without torch.compile capturing any graph (is the model's forward "
                    "decorated with torch.compiler.disable, or dynamo disabled?): it trained with exact backprop")
            why = None if self._warned_nothing_rewritten else self.hbp_backend.nothing_rewritten()
            if why:
                self._warned_nothing_rewritten = True
                warnings.warn(f"hbp_compile: nothing in the model was rewritten, it trains with exact backprop: "
                              f"{_sharded_layers_advice(self._orig_mod)}no residual chain found ({why})",
                              UserWarning, stacklevel=2)
        return out

    def _warn_uncaptured(self, why: str) -> None:
        self.uncaptured_calls += 1
        if not self._warned_uncaptured:
            self._warned_uncaptured = True
            warnings.warn(f"hbp_compile: {why}", UserWarning, stacklevel=3)

    def __reduce__(self) -> tuple[Any, ...]:  # type: ignore[override]
        # pickled as the model and the options; the captured graphs are rebuilt on the first call
        return (HighwayModule, (self._orig_mod, self.hbp_options, self.dynamic))

    def __deepcopy__(self, memo: dict) -> "HighwayModule":
        """A compiled copy of a deep copy of the model (the captured graphs hold fake tensors and
        compiled code, which are rebuilt on the copy's first call rather than copied)."""
        return HighwayModule(copy.deepcopy(self._orig_mod, memo), self.hbp_options, self.dynamic)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        return self._orig_mod.state_dict(*args, **kwargs)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return self._orig_mod.load_state_dict(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # private names, and lookups before __init__ ran (unpickling, deepcopy), stay errors
            original = self.__dict__.get("_modules", {}).get("_orig_mod")
            if name.startswith("_") or original is None:
                raise
            return getattr(original, name)

    @property
    def hbp_iterations(self) -> dict[str, IterationUsage]:
        """Per rewritten chain (``"graph 0 chain 0"``) and swapped recurrence (``"graph 0 recurrence 0"``,
        every layer and direction of it together), how many Highway-BP iterations its backward passes
        ran: ``.last`` and the histogram ``.counts``. With ``k="auto"`` this is the k it chose."""
        usage = {}
        for record in self.hbp_backend.records:
            if record.rewritten is None:
                continue
            for name, module in record.rewritten.named_modules():
                if isinstance(module, ChainModule):
                    usage[f"graph {record.index} {name.replace('hbp_', '').replace('_', ' ')}"] = module.program.usage
            for i, recurrence in enumerate(r for r in record.recurrences if r.swapped and r.mode != "scan"):
                usage[f"graph {record.index} recurrence {i}"] = recurrence.usage
        return usage

    @property
    def hbp_report(self) -> Report:
        """The report of every graph compiled so far (empty before the first call)."""
        return Report(tuple(self.hbp_backend.records), self.hbp_options)


def hbp_compile(model: torch.nn.Module, k: int | str = 3, *, gamma: float = 0.0, backend: str | None = None,
                recompute: bool = True, tol: float = 1e-3, k_max: int | None = None, min_layers: int = 2,
                debug_dir: str | None = None, strict: bool | None = None, chunk: int | None = None,
                dynamic: bool | None = None) -> HighwayModule:
    """Train ``model`` with Highway backpropagation truncated at ``k`` iterations.

    The model is captured with torch.compile on its first call; its chains of residual layers get a
    Highway-BP backward, everything else keeps ordinary autograd. The forward is unchanged.
    ``backend="inductor"`` (default) generates code for the layer functions, the batched VJPs, the
    scans and the code around the chains; ``"eager"`` runs the same rewrite uncompiled. Options are
    described in ``HbpOptions`` (``backend=None`` reads ``$HBP_BACKEND``, default Inductor).
    ``dynamic`` is ``torch.compile``'s: ``None`` (default) specializes on the first call's shapes and
    traces once more with symbolic sizes when a shape changes; ``False`` traces every new shape
    again (up to dynamo's recompile limit); ``True`` traces with symbolic sizes from the first call.
    The chains are rewritten at each concrete shape either way (docs/limitations.md).

    >>> import torch
    >>> from hbp_compile import hbp_compile
    >>> class Block(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__(); self.ln = torch.nn.LayerNorm(8); self.fc = torch.nn.Linear(8, 8)
    ...     def forward(self, x): return x + self.fc(self.ln(x))
    >>> model = torch.nn.Sequential(*[Block() for _ in range(4)])
    >>> fast = hbp_compile(model, k=1, backend="eager")
    >>> fast(torch.randn(2, 8)).sum().backward()
    >>> fast.hbp_report.num_layers
    4
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"hbp_compile: model must be a torch.nn.Module, got {type(model).__name__}")
    options = HbpOptions(k=k, gamma=gamma, backend=backend, recompute=recompute, min_layers=min_layers,
                         debug_dir=debug_dir, tol=tol, k_max=k_max, strict=strict, chunk=chunk)
    return HighwayModule(model, options, dynamic)


def explain(model: torch.nn.Module, *args: Any, k: int | str | None = None, gamma: float | None = None,
            min_layers: int | None = None, **kwargs: Any) -> Report:
    """Capture ``model(*args, **kwargs)`` and report the chains Highway-BP would rewrite.

    The model is not changed: the capture runs on a copy, with the random-number state restored. The
    report comes from the same pipeline as a compile — the rewrite, the forward check and the
    compile-time training step included — so a chain it lists is a chain the compiled model rewrites.
    Given a ``HighwayModule``, its options are used (the same backend too); options passed here win.

    >>> report = explain(model, torch.randn(2, 8))   # doctest: +SKIP
    >>> report.num_layers                              # doctest: +SKIP
    4
    """
    if isinstance(model, HighwayModule):
        target, base = model._orig_mod, model.hbp_options
    else:
        target, base = model, HbpOptions(k=3, backend="eager")
    chosen = {"k": k, "gamma": gamma, "min_layers": min_layers}
    options = dataclasses.replace(base, **{name: v for name, v in chosen.items() if v is not None})
    backend = HbpBackend(options, explain_only=True)
    clone = copy.deepcopy(target)
    with torch.random.fork_rng(devices=[]), torch.enable_grad(), capturing_rnns():
        torch.compile(_fresh_entry(clone), backend=backend, dynamic=False)(*args, **kwargs)
    return Report(tuple(backend.records), options)
