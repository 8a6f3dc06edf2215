"""The Hugging Face Trainer trains a compiled model with Highway-BP: hbp_compile's wrapper (forward
carries the model's signature, so the Trainer keeps the dataset's columns) and the in-place
``model.compile(backend="hbp")`` (save_model + from_pretrained round trip)."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from hbp_compile import HbpOptions, hbp_compile  # noqa: E402
from hbp_compile.backend import backend_for  # noqa: E402

# dynamo reads .grad of non-leaf tensors while tracing the loss (a torch-internal UserWarning that
# the suite's "error" filter would turn into a failure)
pytestmark = pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 8, t: int = 8, vocab: int = 64):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, t), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i], "unused_column": 0}


def _gpt2(**config_kwargs):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=16, **config_kwargs)
    return transformers.GPT2LMHeadModel(config)


def _args(tmp_path, **kwargs):
    return transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                                          report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
                                          **kwargs)


def test_trainer_with_default_arguments_trains_hbp_compile_model(tmp_path):
    model = _gpt2()
    before = model.transformer.h[0].mlp.c_fc.weight.detach().clone()
    compiled = hbp_compile(model, k=3, gamma=0.2, backend="eager")
    trainer = transformers.Trainer(model=compiled, args=_args(tmp_path), train_dataset=Tokens())
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert compiled.hbp_report.num_layers == 4  # both blocks' attention and MLP layers
    assert not torch.equal(model.transformer.h[0].mlp.c_fc.weight, before)
    # the Trainer unwraps the compiled model (an OptimizedModule) and calls save_pretrained on the
    # GPT-2 itself: tied embedding and head weights are handled, the reload has the trained weights
    trainer.save_model(str(tmp_path / "saved"))
    compiled.save_pretrained(str(tmp_path / "direct"))  # the model's own method, through the wrapper
    for saved in ("saved", "direct"):
        reloaded = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / saved))
        for (name, p), q in zip(model.named_parameters(), reloaded.parameters()):
            assert torch.equal(p.detach(), q.detach()), (saved, name)


def test_trainer_with_in_place_compile_saves_and_reloads(tmp_path):
    model = _gpt2()
    options = {"k": 3, "gamma": 0.2, "backend": "eager"}
    model.compile(backend="hbp", options=options)
    trainer = transformers.Trainer(model=model, args=_args(tmp_path), train_dataset=Tokens())
    trainer.train()
    records = backend_for(HbpOptions.from_mapping(options)).records
    assert sum(r.num_layers for r in records) >= 4
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "saved"))
    for (name, p), q in zip(model.named_parameters(), reloaded.parameters()):
        assert torch.equal(p.detach(), q.detach()), name


def test_accelerate_prepare_trains_exactly():
    """accelerate's prepare() keeps the compiled model (it is an OptimizedModule: not compiled a
    second time), unwrap_model finds the model, and a step at k >= L equals plain backprop's."""
    accelerate = pytest.importorskip("accelerate")
    no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    model, reference = _gpt2(**no_dropout).double(), _gpt2(**no_dropout).double()
    batch = Tokens()[0]
    ids = batch["input_ids"][None]
    accelerator = accelerate.Accelerator(cpu=True)
    compiled = hbp_compile(model, k=8, backend="eager")
    prepared, optimizer = accelerator.prepare(compiled, torch.optim.SGD(model.parameters(), lr=0.1))
    assert accelerator.unwrap_model(prepared, keep_torch_compile=False) is model
    accelerator.backward(prepared(ids, labels=ids).loss)
    optimizer.step()
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    reference(ids, labels=ids).loss.backward()
    reference_optimizer.step()
    assert compiled.hbp_report.num_layers == 4
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=name)
