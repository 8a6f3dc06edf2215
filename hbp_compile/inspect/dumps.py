"""Dumps of every step of the pass, under ``debug_dir=`` or ``$HBP_DEBUG_DIR`` (docs/debugging.md).

Per captured graph ``N``, in ``<dir>/graph_N/``:

* ``dynamo_graph.py``, ``aten_graph.py``, ``rewritten_graph.py``: the graph dynamo handed over, its
  functional aten form (what detection reads), and the graph that runs (chain calls stitched in);
* ``report.txt`` / ``report.json``: the ``explain()`` report of this graph (chains, layers, kinds,
  fallback reason);
* ``chain{C}_group{G}_layer.py`` / ``_split.py``: a group's layer graph (the forward runs it once per
  layer) and its split graph ``(x_r, x_g, ...) -> y``;
* ``chain{C}_group{G}_batched_forward.py`` / ``_batched_vjp.py`` / ``_residual_jacobian.py`` /
  ``_weight_vjp.py`` (``_forward.py`` with ``recompute=False``): the graphs the backward runs, as
  the compile-time training step built them (the aten graphs handed to Inductor): the saved values
  of every layer at once, the block VJP of one iteration over all layers, ``K`` of a non-identity
  residual, and the weights' gradients;
* ``memory.txt``: the compile-time training step's peak of allocated bytes, and what each chain's
  Highway-BP backward held at the end of its iterations by category (states, activations, stacked
  weights, iteration buffers, gradients; ``engine/memory.py``); the rest of the peak is the
  temporaries of the batched VJP calls and the graph's other values;
* ``rewritten_graph.svg`` when pydot is installed.

Each file is also emitted as a structured-trace artifact, so ``TORCH_TRACE=dir`` + ``tlparse`` show them.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from .._torch_compat import trace_artifact
from ..options import HbpOptions
from .report import format_report

if TYPE_CHECKING:
    from ..records import GraphRecord

log = logging.getLogger("hbp_compile")


def _readable(gm: fx.GraphModule) -> str:
    return gm.print_readable(print_output=False)


def record_json(record: "GraphRecord") -> dict:
    """The report of one graph as plain data."""
    chains = []
    for chain in (record.detection.chains if record.detection else ()):
        chains.append({
            "num_layers": chain.num_layers,
            "groups": [{"layers": list(g.layers), "stacked": list(g.stacked), "broadcast": list(g.broadcast),
                        "kind": g.kind.value} for g in chain.groups],
            "taps": list(chain.taps),
            "layers": [{"index": layer.index, "module": layer.module_path, "group": layer.group,
                        "kind": layer.kind.value, "residual": layer.formula,
                        "side_inputs": [e.name for e in layer.externals],
                        "side_outputs": [n.name for n in layer.side_outputs]} for layer in chain.layers],
        })
    return {
        "graph": record.index,
        "num_layers": record.num_layers,
        "fallback": record.fallback.name if record.fallback else None,
        "reason": record.reason,
        "chains": chains,
        "recurrences": [{"what": r.describe(), "steps": r.steps, "swapped": r.swapped} for r in record.recurrences],
        "notes": list(record.detection.notes) if record.detection else [],
    }


def _chain_calls(gm: fx.GraphModule) -> list[tuple[fx.Node, torch.nn.Module]]:
    return [(n, gm.get_submodule(n.target)) for n in gm.graph.nodes
            if n.op == "call_module" and n.target.startswith("hbp_chain_")]


def _group_files(record: "GraphRecord") -> dict[str, str]:
    files: dict[str, str] = {}
    if record.rewritten is None:
        return files
    for c, (_, module) in enumerate(_chain_calls(record.rewritten)):
        for g, prog in enumerate(module.program.groups):
            stem = f"chain{c}_group{g}"
            files[f"{stem}_layer.py"] = _readable(prog.layer_fn)
            files[f"{stem}_split.py"] = _readable(prog.split_fn)
            # the graphs the engine runs, as the compile-time training step built them
            for i, partition in enumerate(prog.partitions()):
                suffix = f"_{i}" if i else ""
                for name, kernel in partition.kernels().items():
                    try:
                        graph = kernel.traced_graph()
                        text = _readable(graph) if graph is not None else "# not run yet\n"
                    except Exception as exc:  # noqa: BLE001 - a dump must never break training
                        text = f"# not traced: {type(exc).__name__}: {exc}\n"
                    files[f"{stem}_{name}{suffix}.py"] = text
    return files


def memory_text(record: "GraphRecord") -> str:
    """The ``memory.txt`` dump: the measured peak and each chain's categories (engine/memory.py)."""
    lines = []
    if record.dry_run_peak is not None:
        lines.append(f"compile-time training step: peak {record.dry_run_peak / 2 ** 20:.2f} MiB allocated "
                     "(torch.profiler memory timeline)")
    held = 0
    for c, (_, module) in enumerate(_chain_calls(record.rewritten) if record.rewritten is not None else []):
        memory = module.program.memory
        held += memory.total
        lines.append(f"chain {c} ({module.program.num_layers} layers): held by its backward, by category")
        lines += [f"  {line}" for line in memory.lines()]
        lines.append(f"  {'total':<12}{memory.total / 2 ** 20:6.2f} MiB")
    if record.dry_run_peak is not None and held:
        rest = record.dry_run_peak - held
        lines.append(f"the rest of the peak (temporaries of the batched VJP calls, the graph's other values): "
                     f"{rest / 2 ** 20:.2f} MiB" if rest >= 0 else
                     "the rest of the peak: none (the categories add up to more: not all of them are alive at "
                     "once, weights restacked per chunk are freed before the gradients are made)")
    return "\n".join(lines) + "\n" if lines else ""


def _svg(record: "GraphRecord") -> dict[str, bytes]:
    try:
        from torch.fx.passes.graph_drawer import FxGraphDrawer
        import pydot  # noqa: F401
    except ImportError:
        return {}
    if record.rewritten is None:
        return {}
    return {"rewritten_graph.svg": FxGraphDrawer(record.rewritten, "hbp").get_dot_graph().create_svg()}


def write_dumps(record: "GraphRecord", options: HbpOptions) -> Path:
    """Write every dump of ``record`` under ``options.debug_dir``; return the graph's directory.

    >>> from hbp_compile import hbp_compile                                  # doctest: +SKIP
    >>> model = hbp_compile(model, k=3, debug_dir="/tmp/hbp"); model(x)      # doctest: +SKIP
    >>> sorted(p.name for p in Path("/tmp/hbp/graph_0").iterdir())[:2]        # doctest: +SKIP
    ['aten_graph.py', 'chain0_group0_batched_vjp.py']
    """
    assert options.debug_dir is not None
    directory = Path(options.debug_dir) / f"graph_{record.index}"
    directory.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {"dynamo_graph.py": _readable(record.dynamo_graph),
                             "report.txt": "\n".join(format_report([record], options)) + "\n",
                             "report.json": json.dumps(record_json(record), indent=2) + "\n"}
    if record.aten_code:
        files["aten_graph.py"] = record.aten_code
    if record.rewritten is not None:
        files["rewritten_graph.py"] = _readable(record.rewritten)
    files.update(_group_files(record))
    memory = memory_text(record)
    if memory:
        files["memory.txt"] = memory
    for name, text in files.items():
        (directory / name).write_text(text)
        trace_artifact(f"hbp_graph{record.index}_{name}", text)
    for name, data in _svg(record).items():
        (directory / name).write_bytes(data)
    log.info("graph %d: dumps written to %s", record.index, directory)
    return directory
