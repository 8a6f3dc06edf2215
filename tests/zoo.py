"""A zoo of models written by others: Hugging Face classes from small random configs and torch.nn
models, each trained one step in float64 with Highway-BP at k ≥ L and compared with autograd.

``python -m tests.zoo [--write docs/zoo.md]`` prints the table (model, layers found / expected,
k ≥ L error, warning); ``tests/test_zoo.py`` asserts it. Expected layer counts are the residual layers a reader counts in
the architecture (2 per pre-LN transformer block, ...); where a model falls back, the entry names
the reason it is expected to give.
"""
from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from hbp_compile import hbp_compile

from .reference import max_relative_error

B, T, VOCAB, IMAGE = 2, 8, 64, 32

TEXT = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, vocab_size=VOCAB,
            max_position_embeddings=32, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            decoder_start_token_id=0)
HEAD_DIM = dict(head_dim=8)
VIT = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=IMAGE,
           patch_size=8)
SPEECH = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, conv_dim=(16, 16),
              conv_stride=(5, 4), conv_kernel=(10, 4), num_feat_extract_layers=2, num_conv_pos_embeddings=4,
              num_conv_pos_embedding_groups=2, mask_time_prob=0.0, layerdrop=0.0)


@dataclass(frozen=True)
class ZooModel:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], dict]
    layers: int  # residual layers a reader counts in the architecture
    found: int | None = None  # what the pass finds today where that differs (0: the graph falls back)
    warning: str = ""  # regex of the hbp_compile warning expected today, if any
    note: str = ""  # why found differs from layers, or why the warning is right
    tolerance: float = 1e-8  # k ≥ L against autograd, relative
    float64: bool = True  # does the model run in float64? (else float32 is checked against float32 autograd)
    # float32 under Inductor: torch.compile backprop's own error against float64 autograd, where it is
    # larger than eager backprop's (Inductor compiles the code around the chains and rounds it the same way)
    compiled_rounding: float = 0.0

    @property
    def expected_found(self) -> int:
        return self.layers if self.found is None else self.found


def _no_dropout(config):
    for key, value in config.to_dict().items():
        if isinstance(value, float) and ("dropout" in key or key.endswith("pdrop") or key in (
                "drop_path_rate", "layerdrop", "attention_probs_dropout_prob", "hidden_dropout_prob")):
            setattr(config, key, 0.0)
    return config


def hf(model_type: str, cls: str = "AutoModel", **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        config = _no_dropout(transformers.AutoConfig.for_model(model_type, **kwargs))
        klass = getattr(transformers, cls)
        return klass.from_config(config) if hasattr(klass, "from_config") else klass(config)

    return build


def tokens(mask: str | None = None, length: int = T, **extra) -> Callable[[], dict]:
    """Token ids (and a copy of them for each key of ``extra``: ``labels``, ``decoder_input_ids``);
    ``mask="left"`` or ``"right"`` adds an attention mask padding the first sequence by 3 tokens on
    that side (its ids there are the pad id, its labels -100). ``length``: tokens per sequence."""

    def make() -> dict:
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(3, VOCAB, (B, length), generator=g)
        out = {"input_ids": ids, **{k: ids.clone() for k in extra}}
        if mask:
            attention = torch.ones(B, length, dtype=torch.long)
            pad = slice(0, 3) if mask == "left" else slice(length - 3, length)
            attention[0, pad] = 0
            ids[0, pad] = 0
            if "labels" in out:
                out["labels"][0, pad] = -100
            out["attention_mask"] = attention
        return out

    return make


def pixels() -> dict:
    return {"pixel_values": torch.randn(B, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))}


def audio() -> dict:
    return {"input_values": torch.randn(B, 400, generator=torch.Generator().manual_seed(1))}


def sequence() -> dict:
    return {"input": torch.randn(T, B, 16, generator=torch.Generator().manual_seed(1))}


def _encoder_decoder(model_type: str, **kwargs) -> ZooModel:
    return ZooModel(model_type, hf(model_type, **TEXT, encoder_layers=2, decoder_layers=2, d_model=16,
                                   encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                   decoder_ffn_dim=32, **kwargs),
                    tokens(decoder_input_ids=True), 10)


class TransformerLM(nn.Module):
    def __init__(self, norm_first: bool):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=False, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)

    def forward(self, input):
        return self.encoder(input)


ZOO: tuple[ZooModel, ...] = (
    # decoders: 2 residual layers (attention, MLP) per block, or 1 for parallel attention+MLP blocks
    ZooModel("gpt2", hf("gpt2", **TEXT), tokens(), 4),
    ZooModel("llama", hf("llama", **TEXT, **HEAD_DIM), tokens(), 4),
    ZooModel("mistral", hf("mistral", **TEXT, **HEAD_DIM), tokens(), 4),
    ZooModel("qwen2", hf("qwen2", **TEXT, **HEAD_DIM), tokens(), 4),
    ZooModel("qwen3", hf("qwen3", **TEXT, **HEAD_DIM), tokens(), 4),
    ZooModel("gemma", hf("gemma", **TEXT, **HEAD_DIM), tokens(), 4),
    ZooModel("granite", hf("granite", **TEXT, **HEAD_DIM), tokens(), 4),
    ZooModel("olmo", hf("olmo", **TEXT, **HEAD_DIM), tokens(), 4),
    ZooModel("phi3", hf("phi3", **TEXT), tokens(), 4),
    ZooModel("starcoder2", hf("starcoder2", **TEXT, **HEAD_DIM), tokens(), 4),
    ZooModel("stablelm", hf("stablelm", **TEXT), tokens(), 4),
    ZooModel("phi", hf("phi", **TEXT), tokens(), 2),
    ZooModel("falcon", hf("falcon", **TEXT), tokens(), 2),
    ZooModel("gpt_neox", hf("gpt_neox", **TEXT), tokens(), 2),
    ZooModel("gptj", hf("gptj", **TEXT, rotary_dim=4), tokens(), 2),
    ZooModel("codegen", hf("codegen", **TEXT, rotary_dim=4), tokens(), 2),
    ZooModel("gpt_neo", hf("gpt_neo", **TEXT, attention_types=[[["global", "local"], 1]]), tokens(), 4),
    # the default path's configurations (issue 28): the configs' own defaults (use_cache=True),
    # padding masks, grouped-query and multi-query attention, labels=, tied embeddings, attn_implementation
    ZooModel("gpt2 LM, labels, right padding", hf("gpt2", **TEXT, cls="AutoModelForCausalLM"),
             tokens(mask="right", labels=True), 4),
    ZooModel("gpt2, eager attention", hf("gpt2", **TEXT, attn_implementation="eager"), tokens(mask="right"), 4),
    ZooModel("llama, GQA, left padding", hf("llama", **{**TEXT, "num_key_value_heads": 1}, **HEAD_DIM),
             tokens(mask="left"), 4),
    ZooModel("llama, GQA", hf("llama", **{**TEXT, "num_attention_heads": 4, "num_key_value_heads": 2}, head_dim=4),
             tokens(), 4),
    ZooModel("llama LM, tied embeddings, labels", hf("llama", **TEXT, **HEAD_DIM, tie_word_embeddings=True,
                                                    cls="AutoModelForCausalLM"), tokens(labels=True), 4),
    ZooModel("llama, MQA, eager attention", hf("llama", **{**TEXT, "num_attention_heads": 4, "num_key_value_heads": 1},
                                               head_dim=4, attn_implementation="eager"), tokens(mask="right"), 4,
             note="right padding: with left padding the model's own eager attention gives NaN in float64"),
    ZooModel("gemma2", hf("gemma2", **TEXT, **HEAD_DIM), tokens(mask="right"), 4,
             note="right padding: with left padding the model's own eager attention gives NaN"),
    ZooModel("mixtral", hf("mixtral", **TEXT, **HEAD_DIM, num_local_experts=4, num_experts_per_tok=2), tokens(), 4,
             float64=False, note="no float64: the experts' grouped matmul takes float32 and half types; the router's top-k experts run in one graph (transformers' grouped matmul op, which vmap "
                  "loops over layers: no batching rule)"),
    ZooModel("modernbert", hf("modernbert", **TEXT, global_attn_every_n_layers=1), tokens(mask="right"), 4),
    ZooModel("bloom", hf("bloom", **TEXT), tokens(), 4, found=0, warning="custom torch.autograd.Function",
             note="refused: BloomGelu calls an autograd.Function in training mode"),
    ZooModel("opt", hf("opt", **TEXT, word_embed_proj_dim=16, ffn_dim=32), tokens(), 4),
    ZooModel("biogpt", hf("biogpt", **TEXT), tokens(), 4),
    # encoders: post-LN blocks LN(x + B(x)), 2 per block
    ZooModel("bert", hf("bert", **TEXT), tokens(), 4),
    ZooModel("bert, padding mask", hf("bert", **TEXT), tokens(mask="right"), 4),
    ZooModel("roberta", hf("roberta", **TEXT), tokens(), 4),
    ZooModel("xlm-roberta", hf("xlm-roberta", **TEXT), tokens(), 4),
    ZooModel("distilbert", hf("distilbert", dim=16, n_layers=2, n_heads=2, hidden_dim=32, vocab_size=VOCAB,
                              max_position_embeddings=32), tokens(), 4),
    ZooModel("albert", hf("albert", **TEXT, embedding_size=16), tokens(), 4),
    ZooModel("electra", hf("electra", **TEXT, embedding_size=16), tokens(), 4),
    ZooModel("deberta", hf("deberta", **TEXT), tokens(), 4),
    ZooModel("deberta-v2", hf("deberta-v2", **TEXT), tokens(), 4),
    ZooModel("mpnet", hf("mpnet", **TEXT), tokens(), 4),
    ZooModel("ernie", hf("ernie", **TEXT), tokens(), 4),
    ZooModel("megatron-bert", hf("megatron-bert", **TEXT), tokens(), 4),
    ZooModel("roformer", hf("roformer", **TEXT, embedding_size=16), tokens(), 4),
    ZooModel("convbert", hf("convbert", **TEXT, embedding_size=16), tokens(), 4),
    ZooModel("funnel", hf("funnel", d_model=16, n_head=2, d_head=8, d_inner=32, block_sizes=[1, 1],
                          vocab_size=VOCAB, cls="FunnelBaseModel"), tokens(), 5, found=4,
             note="2 layers per block and the pooling between them; with pool_q_only (the default) the second "
                  "block's attention reads the unpooled sequence as keys and values, a link that skips the "
                  "pooling layer, so each block is a chain of its own (no chain of layers h_i = f(h_{i-1}) "
                  "crosses it)"),
    ZooModel("funnel, pool_q_only=False", hf("funnel", d_model=16, n_head=2, d_head=8, d_inner=32,
                                             block_sizes=[1, 1], pool_q_only=False, vocab_size=VOCAB,
                                             cls="FunnelBaseModel"), tokens(), 5,
             note="the pooling is a K = 0 layer between the blocks"),
    # encoder-decoders: 2 layers per encoder block, 3 per decoder block (self-attn, cross-attn, MLP)
    _encoder_decoder("bart"),
    _encoder_decoder("mbart"),
    _encoder_decoder("pegasus"),
    _encoder_decoder("marian"),
    ZooModel("t5 encoder", hf("t5", d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, vocab_size=VOCAB,
                              cls="T5EncoderModel"), tokens(mask="right"), 4),
    ZooModel("t5", hf("t5", d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2,
                      vocab_size=VOCAB), tokens(decoder_input_ids=True), 10),
    # vision
    ZooModel("vit", hf("vit", **VIT), pixels, 4),
    ZooModel("deit", hf("deit", **VIT), pixels, 4),
    ZooModel("beit", hf("beit", **VIT), pixels, 4),
    ZooModel("dinov2", hf("dinov2", **VIT), pixels, 4),
    ZooModel("swin", hf("swin", image_size=IMAGE, patch_size=4, embed_dim=16, depths=[2], num_heads=[2],
                        window_size=4), pixels, 4),
    ZooModel("convnext", hf("convnext", hidden_sizes=[8, 16], depths=[2, 2], num_stages=2), pixels, 5,
             note="2 blocks per stage and the downsampling between stages, a K = 0 layer"),
    ZooModel("resnet", hf("resnet", hidden_sizes=[8, 16], depths=[2, 2], embedding_size=8), pixels, 4),
    # speech encoders: the positional convolution is a residual layer too (x + conv(x))
    ZooModel("wav2vec2", hf("wav2vec2", **SPEECH), audio, 5),
    ZooModel("hubert", hf("hubert", **SPEECH), audio, 5),
    ZooModel("wavlm", hf("wavlm", **SPEECH), audio, 5),
    # state-space
    # 2 tokens: without mamba_ssm's kernels the model scans its sequence in a Python loop, which the
    # captured graph unrolls (Inductor's compile time grows with it: 8 tokens took 40 s, 4 tokens 20 s
    # a kernel); two steps are a scan all the same
    ZooModel("mamba", hf("mamba", hidden_size=16, num_hidden_layers=3, state_size=4, vocab_size=VOCAB,
                         expand=2, conv_kernel=2, residual_in_fp32=False), tokens(length=2), 3,
             # torch.compile(model) backprop in float32: 2.3965e-4 from float64 autograd (eager: 3.65e-5)
             compiled_rounding=2.4e-4),
    ZooModel("mamba, residual in float32", hf("mamba", hidden_size=16, num_hidden_layers=3, state_size=4,
                                              vocab_size=VOCAB, expand=2, conv_kernel=2, residual_in_fp32=True),
             tokens(length=2), 3, tolerance=1e-6,
             note="the residual's cast to float32 is part of K; autograd rounds the cotangent to float32 "
                  "there, Highway-BP's K = 1 does not (hence 1e-6)"),
    # torch.nn
    ZooModel("nn.TransformerEncoder (post-LN)", lambda: TransformerLM(False), sequence, 6),
    ZooModel("nn.TransformerEncoder (pre-LN)", lambda: TransformerLM(True), sequence, 6),
    ZooModel("nn.GRU", lambda: nn.GRU(16, 16, num_layers=2), sequence, 2 * T),
    ZooModel("nn.LSTM", lambda: nn.LSTM(16, 16), sequence, T),
)


@dataclass
class ZooResult:
    name: str
    layers: int
    expected: int
    error: float | None
    forward_equal: bool
    warnings: list[str] = field(default_factory=list)
    dtype: str = "float64"
    backprop_error: float = 0.0  # float32: autograd's own error against float64 autograd (its rounding)
    # float32 under Inductor: the entry's ``compiled_rounding`` (torch.compile backprop's own error)
    compiled_backprop_error: float = 0.0

    def passes(self, entry: ZooModel) -> bool:
        """Within the dtype's bound (``tolerance``), or in float32 within 3 × backprop's own rounding
        (eager backprop's, or under Inductor torch.compile backprop's where that is larger)."""
        bound = tolerance(entry, self.dtype)
        rounding = max(self.backprop_error, self.compiled_backprop_error)
        return self.error is not None and self.error <= max(bound, 3 * rounding)


def _loss(out: object) -> torch.Tensor:
    first = out if isinstance(out, torch.Tensor) else out[0] if isinstance(out, (tuple, list)) else next(
        iter(out.values()))
    if isinstance(first, (tuple, list)):
        first = first[0]
    return first.float().pow(2).sum() if first.dtype in (torch.bfloat16, torch.float16) else first.pow(2).sum()


DTYPES = ("float64", "float32", "bfloat16", "autocast")
"""How a zoo step runs: ``autocast`` is a float32 model under ``torch.autocast("cpu", torch.bfloat16)``."""


def tolerance(entry: ZooModel, dtype: str) -> float:
    """The bound on the k ≥ L error. float64: relative, against autograd in float64. float32:
    relative, against autograd in float64, or 3 × float32 autograd's own error there when that is
    larger (BERT with a padding mask: float32 autograd is 4e-4 from float64, Inductor's float32
    backprop 4e-4 from eager's). bfloat16 and autocast: 1 − cosine to autograd in the same dtype."""
    if dtype == "float64":
        return entry.tolerance
    return 1e-4 if dtype == "float32" else 1e-2


def _cast(model: nn.Module, inputs: dict, dtype: str) -> tuple[nn.Module, dict]:
    param = {"float64": torch.float64, "bfloat16": torch.bfloat16}.get(dtype, torch.float32)
    return model.to(param), {k: v.to(param) if v.is_floating_point() else v for k, v in inputs.items()}


def _error(got: dict, want: dict, dtype: str) -> float:
    # a parameter the loss does not reach has no gradient in eager mode and zeros from a compiled graph
    if not want.keys() <= got.keys() or any(got[n].any() for n in got.keys() - want.keys()):
        return float("inf")
    got = {n: got[n] for n in want}
    if dtype in ("float64", "float32"):
        return max_relative_error({n: g.double() for n, g in got.items()}, want)
    flat = lambda grads: torch.cat([grads[n].double().flatten() for n in sorted(grads)])  # noqa: E731
    return 1.0 - torch.nn.functional.cosine_similarity(flat(got), flat(want), dim=0).item()


def run(entry: ZooModel, backend: str = "eager", dtype: str | None = None) -> ZooResult:
    """One training step with exact backprop and one with Highway-BP at k ≥ L, both in ``dtype``
    (float64, float32, bfloat16 weights, or float32 under bfloat16 autocast), the pass compiled
    by ``backend`` ("eager" or "inductor", the default)."""
    import contextlib

    dtype = dtype or ("float64" if entry.float64 else "float32")
    torch.manual_seed(0)
    model, inputs = _cast(entry.build().train(), entry.inputs(), dtype)
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == "autocast" else contextlib.nullcontext
    with amp():
        want_out = model(**inputs)
        want_loss = _loss(want_out)
    want_loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    backprop_error = 0.0
    if dtype == "float32" and entry.float64:  # measured against float64 autograd, beside float32 autograd's own error there
        exact, _ = _cast(copy.deepcopy(model), {}, "float64")
        _loss(exact(**_cast(exact, inputs, "float64")[1])).backward()
        want64 = {n: p.grad for n, p in exact.named_parameters() if p.grad is not None}
        backprop_error = _error(want, want64, dtype)
        want = want64
    compiled = hbp_compile(model, k=10_000, backend=backend, strict=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with amp():
            out = compiled(**inputs)
            loss = _loss(out)
        loss.backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    if backend == "eager":
        same_forward = torch.equal(loss, want_loss)
    else:  # Inductor fuses and rounds differently from eager: equal up to its rounding
        same_forward = bool(torch.isclose(loss.double(), want_loss.double(),
                                          rtol={"float64": 1e-10, "float32": 1e-4}.get(dtype, 2e-2)))
    return ZooResult(entry.name, compiled.hbp_report.num_layers, entry.layers, _error(got, want, dtype), same_forward,
                     [str(w.message) for w in caught if "hbp_compile" in str(w.message)], dtype, backprop_error,
                     entry.compiled_rounding if backend == "inductor" and dtype == "float32" else 0.0)


def _run_or_error(entry: ZooModel, backend: str, dtype: str) -> ZooResult | str:
    try:
        return run(entry, backend, dtype)
    except Exception as exc:  # noqa: BLE001 - a table of what happens, errors included
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    finally:
        torch._dynamo.reset()  # each model compiles from scratch, as in the tests


def _short(warning: str, width: int = 140) -> str:
    text = warning.replace("hbp_compile: ", "")
    return (text[:width] + ("…" if len(text) > width else "")).replace("|", "/").replace("\n", " ")


def table(backend: str = "eager", dtype: str = "float64", only: str | None = None) -> list[str]:
    """The zoo as markdown rows: one training step per model, as ``test_zoo.py`` runs it."""
    rows = ["| model | layers found / expected | k ≥ L error | forward bit-identical | hbp_compile warning | note |",
            "|---|---|---|---|---|---|"]
    for entry in ZOO:
        if only and not re.search(only, entry.name):
            continue
        own = dtype if dtype != "float64" or entry.float64 else "float32"  # a model with no float64
        r = _run_or_error(entry, backend, own)
        if isinstance(r, str):
            rows.append(f"| {entry.name} | error | | | {_short(r, 200)} | |")
            continue
        warning = "; ".join(_short(w) for w in r.warnings)
        error = f"{r.error:.0e}" + (f" ({r.backprop_error:.0e})" if r.dtype == "float32" and entry.float64 else "")
        error += " (float32)" if own != dtype else ""
        rows.append(f"| {r.name} | {r.layers} / {entry.layers} | {error} | {'yes' if r.forward_equal else 'NO'} | "
                    f"{warning} | {entry.note} |")
        print(rows[-1], flush=True)
    return rows


# the default path first (a run cut short keeps what matters most); eager float64 is the first table
CONFIGS = (("inductor", "float32"), ("inductor", "autocast"), ("inductor", "bfloat16"),
           ("eager", "float32"), ("eager", "autocast"), ("eager", "bfloat16"))


def _cell(job: tuple[str, str, str]) -> tuple[str, str, str, str, bool]:
    """One model in one configuration, as a table cell and whether it is as expected."""
    name, backend, dtype = job
    entry = next(e for e in ZOO if e.name == name)
    if dtype == "float64" and not entry.float64:
        return name, backend, dtype, "no float64", True
    r = _run_or_error(entry, backend, dtype)
    if isinstance(r, str):
        return name, backend, dtype, f"**raises** {_short(r, 100)}", False
    good = r.passes(entry) and r.forward_equal and r.layers == entry.expected_found
    text = f"{r.layers}/{entry.layers} · {r.error:.0e}" + ("" if good else " **✗**")
    text += "" if r.forward_equal else " (forward differs)"
    if r.warnings:
        text += " · " + "; ".join(_short(w, 100) for w in r.warnings)
    return name, backend, dtype, text, good and (not r.warnings or bool(entry.warning))


def matrix(configs=CONFIGS, only: str | None = None, jobs: int = 1) -> list[str]:
    """Every model in every configuration (backend × dtype), a process per job: one markdown table
    whose cells read "layers found/expected · k ≥ L error", then any warning."""
    import concurrent.futures
    import multiprocessing

    names = [e.name for e in ZOO if not only or re.search(only, e.name)]
    work = [(n, b, d) for b, d in configs for n in names]
    cells: dict[tuple[str, str, str], str] = {}
    context = multiprocessing.get_context("spawn")  # a fresh torch per worker, none of the parent's state
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        for name, backend, dtype, text, good in pool.map(_cell, work):
            cells[name, backend, dtype] = text
            print(f"{name} · {backend} {dtype}: {text}", flush=True)
    rows = ["| model | " + " | ".join(f"{b} {d}" for b, d in configs) + " |",
            "|---|" + "---|" * len(configs)]
    rows += [f"| {n} | " + " | ".join(cells[n, b, d] for b, d in configs) + " |" for n in names]
    return rows


HEADER = """# The zoo: models written by others

Written by `python -m tests.zoo --write docs/zoo.md --matrix --jobs 2`; `tests/test_zoo.py` asserts
every row of the first table in CI, `tests/test_default_path.py` nine families of the second under
Inductor in float32 and bfloat16 autocast.

Each model is built from a small random config (2 blocks, width 16) and trains one step with
`hbp_compile(model, k=10_000)` (k ≥ L: Highway-BP must equal autograd) against plain autograd.
*Expected* is the count of residual layers a reader sees in the architecture; where the pass finds
another count or falls back, the note says why. A graph with nothing to rewrite beside a rewritten
one (a speech model's convolutional feature extractor) is in the report and the logger, not a warning.

## Eager backend, float64

Bit-identical forward, gradients within 1e-8 of autograd's (unless the note says why).

"""

MATRIX_HEADER = """
## Every backend and precision

The default path is `backend="inductor"` (compiled by Inductor). Precisions: *float64* and
*float32* (the model and its inputs in that dtype), *bfloat16* (the weights and inputs), *autocast*
(a float32 model under `torch.autocast("cpu", dtype=torch.bfloat16)`). Each cell reads "layers
found / expected · k ≥ L error", then the hbp_compile warning if any. The error is relative against
autograd in float64 (float64, and float32, where the bound is 1e-4 or 3 × float32 autograd's own
error against float64, whichever is larger: BERT with a padding mask is 4e-4 from float64 in plain
float32 autograd), and 1 − cosine against autograd in the same precision for bfloat16 and autocast
(bound 1e-2). **✗** marks a cell outside its bound; "raises" a training step that raised.

"""


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", metavar="PAGE", help="write the table(s) into this markdown page")
    parser.add_argument("--backend", default="eager", choices=("eager", "inductor"))
    parser.add_argument("--dtype", default="float64", choices=DTYPES)
    parser.add_argument("--only", metavar="REGEX", help="only the models whose name matches")
    parser.add_argument("--matrix", action="store_true",
                        help="also every model in every backend and precision (slow: about an hour of CPU)")
    parser.add_argument("--jobs", type=int, default=1, help="processes for --matrix")
    parser.add_argument("--no-table", action="store_true", help="only the matrix")
    args = parser.parse_args()
    rows = [] if args.no_table else table(args.backend, args.dtype, args.only)
    grid = matrix(only=args.only, jobs=args.jobs) if args.matrix else []
    if args.write:
        with open(args.write, "w") as page:
            page.write(HEADER + "\n".join(rows) + "\n" if rows else "")
            if grid:
                page.write(MATRIX_HEADER + "\n".join(grid) + "\n")


if __name__ == "__main__":
    main()
