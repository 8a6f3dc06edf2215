"""Unmodified library models: torch's own pre-LN TransformerEncoder."""
import pytest
import torch

from hbp_compile import explain, hbp_compile

from .reference import max_relative_error


def encoder(depth: int, norm_first: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=norm_first)
    return torch.nn.TransformerEncoder(layer, depth, enable_nested_tensor=False).double()


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-LN", "post-LN"])
def test_transformer_encoder_two_layers_per_block(norm_first):
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    report = explain(encoder(3, norm_first), x)
    assert report.num_layers == 6
    paths = [layer.module_path for layer in report.chains[0].layers]
    assert paths == ["layers.0", "layers.0", "layers.1", "layers.1", "layers.2", "layers.2"]


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-LN", "post-LN"])
@pytest.mark.parametrize("k", [0, 6])
def test_transformer_encoder_gradients(k, norm_first):
    model = encoder(3, norm_first)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    want_out = model(x).pow(2).mean()
    want_out.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    out = hbp_compile(model, k=k, backend="eager")(x).pow(2).mean()
    assert torch.equal(out, want_out)
    out.backward()
    err = max_relative_error({n: p.grad for n, p in model.named_parameters()}, want)
    assert err < 1e-8 if k >= 6 else err > 1e-6


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gpt2_with_dropout_and_kv_cache():
    """transformers' GPT2LMHeadModel, unmodified: default dropout (0.1) and use_cache=True, so every
    attention layer returns its keys/values (side outputs) as the model's outputs."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=50, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).double().train()
    ids = torch.randint(0, 50, (2, 7))
    report = explain(model, ids)
    assert report.num_layers == 6
    assert [layer.module_path for layer in report.chains[0].layers] == [
        "transformer.h.0", "transformer.h.0", "transformer.h.1", "transformer.h.1",
        "transformer.h.2", "transformer.h.2"]
    torch.manual_seed(5)
    want_out = model(ids).logits.pow(2).mean()
    want_out.backward()
    want = _grads(model)
    model.zero_grad()
    compiled = hbp_compile(model, k=6, backend="eager")
    torch.manual_seed(5)
    out = compiled(ids).logits.pow(2).mean()
    assert torch.equal(out, want_out), "same seed, same dropout masks, same output"
    out.backward()
    assert max_relative_error(_grads(model), want) < 1e-8


def test_gpt2_kv_cache_keeping_intermediates():
    """recompute=False on GPT-2 without dropout: the keys/values leave every layer as side outputs,
    and their gradients come from the backward graph of the forward's kept values."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).double().train()
    ids = torch.randint(0, 50, (2, 7))

    def loss(m):
        out = m(ids)
        return out.logits.pow(2).mean() + sum(k.sum() + v.pow(2).sum() for k, v in _key_values(out.past_key_values))

    loss(model).backward()
    want = _grads(model)
    model.zero_grad()
    for recompute in (True, False):
        model.zero_grad()
        loss(hbp_compile(model, k=4, backend="eager", recompute=recompute)).backward()
        assert max_relative_error(_grads(model), want) < 1e-8, recompute


def _key_values(cache):
    if hasattr(cache, "layers"):  # transformers >= 4.56: DynamicCache with per-layer objects
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [tuple(kv) for kv in cache]


def test_bert_post_ln_with_dropout():
    """transformers' BertModel, unmodified: post-LN sublayers, default dropout, a pooler epilogue."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                     intermediate_size=32, vocab_size=50, max_position_embeddings=16)
    torch.manual_seed(0)
    model = transformers.BertModel(config).double().train()
    ids = torch.randint(0, 50, (2, 7))
    report = explain(model, ids)
    assert report.num_layers == 6
    assert {layer.kind.value for layer in report.chains[0].layers} == {"diagonal"}

    def loss(out):
        return out.last_hidden_state.pow(2).mean() + out.pooler_output.pow(2).mean()

    torch.manual_seed(5)
    want_out = loss(model(ids))
    want_out.backward()
    want = _grads(model)
    model.zero_grad()
    compiled = hbp_compile(model, k=6, backend="eager")
    torch.manual_seed(5)
    out = loss(compiled(ids))
    assert torch.equal(out, want_out)
    out.backward()
    assert max_relative_error(_grads(model), want) < 1e-8


class BasicBlock(torch.nn.Module):
    """The original ResNet's post-activation block: relu(x + bn(conv(relu(bn(conv(x))))))."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(c)
        self.conv2 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class Downsample(torch.nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = torch.nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(c_out)
        self.proj = torch.nn.Conv2d(c_in, c_out, 1, stride=2, bias=False)

    def forward(self, x):
        return torch.relu(self.proj(x) + self.bn(self.conv(x)))


def small_resnet():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), BasicBlock(4), BasicBlock(4), BasicBlock(4),
        Downsample(4, 8), BasicBlock(8), BasicBlock(8),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3),
    ).double()


@pytest.mark.parametrize("recompute", [True, False])
def test_resnet_with_batchnorm_and_downsampling(recompute):
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    report = explain(small_resnet(), x)
    (chain,) = report.chains  # the downsampling block joins the chain as a K = 0 layer
    assert [layer.kind.value for layer in chain.layers] == ["diagonal"] * 3 + ["zero"] + ["diagonal"] * 2
    reference, model = small_resnet(), small_resnet()
    reference(x).pow(2).mean().backward()
    compiled = hbp_compile(model, k=6, backend="eager", recompute=recompute)
    out = compiled(x).pow(2).mean()
    out.backward()
    assert max_relative_error(_grads(model), _grads(reference)) < 1e-8
    for (name, want), got in zip(reference.named_buffers(), model.buffers()):
        assert torch.equal(got, want), f"buffer {name} must move exactly as in the original model"
