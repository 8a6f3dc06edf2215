"""A zoo of models written by others: Hugging Face classes from small random configs and torch.nn
models, each trained one step in float64 with Highway-BP at k ≥ L and compared with autograd.

``python -m tests.zoo [--write docs/zoo.md]`` prints the table (model, layers found / expected,
k ≥ L error, warning); ``tests/test_zoo.py`` asserts it. Expected layer counts are the residual layers a reader counts in
the architecture (2 per pre-LN transformer block, ...); where a model falls back, the entry names
the reason it is expected to give.
"""
from __future__ import annotations

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


def tokens(**extra) -> Callable[[], dict]:
    def make() -> dict:
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(3, VOCAB, (B, T), generator=g)
        return {"input_ids": ids, **{k: ids.clone() for k in extra}}

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
    ZooModel("bloom", hf("bloom", **TEXT), tokens(), 4, found=0, warning="custom torch.autograd.Function",
             note="refused: BloomGelu calls an autograd.Function in training mode"),
    ZooModel("opt", hf("opt", **TEXT, word_embed_proj_dim=16, ffn_dim=32), tokens(), 4),
    ZooModel("biogpt", hf("biogpt", **TEXT), tokens(), 4),
    # encoders: post-LN blocks LN(x + B(x)), 2 per block
    ZooModel("bert", hf("bert", **TEXT), tokens(), 4),
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
    ZooModel("mamba", hf("mamba", hidden_size=16, num_hidden_layers=3, state_size=4, vocab_size=VOCAB,
                         expand=2, conv_kernel=2, residual_in_fp32=False), tokens(), 3),
    ZooModel("mamba, residual in float32", hf("mamba", hidden_size=16, num_hidden_layers=3, state_size=4,
                                              vocab_size=VOCAB, expand=2, conv_kernel=2, residual_in_fp32=True),
             tokens(), 3, tolerance=1e-6,
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


def _loss(out: object) -> torch.Tensor:
    first = out if isinstance(out, torch.Tensor) else out[0] if isinstance(out, (tuple, list)) else next(
        iter(out.values()))
    if isinstance(first, (tuple, list)):
        first = first[0]
    return first.pow(2).sum()


def run(entry: ZooModel) -> ZooResult:
    """One float64 training step with exact backprop and one with Highway-BP at k ≥ L."""
    torch.manual_seed(0)
    model = entry.build().double().train()
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in entry.inputs().items()}
    want_out = model(**inputs)
    _loss(want_out).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    compiled = hbp_compile(model, k=10_000, backend="eager", strict=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = compiled(**inputs)
        _loss(out).backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    same_forward = torch.equal(_loss(out), _loss(want_out))
    error = max_relative_error(got, want) if got.keys() == want.keys() else float("inf")
    return ZooResult(entry.name, compiled.hbp_report.num_layers, entry.layers, error, same_forward,
                     [str(w.message) for w in caught if "hbp_compile" in str(w.message)])


def table() -> list[str]:
    """The zoo as markdown rows: one training step per model, as ``test_zoo.py`` runs it."""
    rows = ["| model | layers found / expected | k ≥ L error | forward bit-identical | hbp_compile warning | note |",
            "|---|---|---|---|---|---|"]
    for entry in ZOO:
        try:
            r = run(entry)
        except Exception as exc:  # noqa: BLE001 - a table of what happens, errors included
            rows.append(f"| {entry.name} | error | | | {type(exc).__name__}: {str(exc)[:200]} | |")
            continue
        warning = "; ".join(w.replace("hbp_compile: ", "")[:140] + ("…" if len(w) > 150 else "") for w in r.warnings)
        rows.append(f"| {r.name} | {r.layers} / {entry.layers} | {r.error:.0e} | {'yes' if r.forward_equal else 'NO'} | "
                    f"{warning.replace('|', '/')} | {entry.note} |")
        print(rows[-1], flush=True)
    return rows


HEADER = """# The zoo: models written by others

Written by `python -m tests.zoo --write docs/zoo.md`; `tests/test_zoo.py` asserts every row in CI.
Each model is built from a small random config (2 blocks, width 16) in float64 and trains one step
with `hbp_compile(model, k=10_000, backend="eager")` (k ≥ L: Highway-BP must equal autograd) against
plain autograd. *Expected* is the count of residual layers a reader sees in the architecture; where
the pass finds another count or falls back, the note says why (issue numbers are the open work).
A graph with nothing to rewrite beside a rewritten one (a speech model's convolutional feature
extractor) is in the report and the logger, not a warning.

"""


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", metavar="PAGE", help="write the table into this markdown page")
    args = parser.parse_args()
    rows = table()
    if args.write:
        with open(args.write, "w") as page:
            page.write(HEADER + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
