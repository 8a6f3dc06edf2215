"""PyTorch Lightning trains a compiled model with Highway-BP, both ways a Lightning user writes it:
a LightningModule holding ``self.net = hbp_compile(net)`` (fit, save_checkpoint, load_from_checkpoint
round trip), and ``trainer.fit(hbp_compile(lightning_module))`` (Lightning unwraps compiled modules)."""
from __future__ import annotations

import pytest
import torch

lightning = pytest.importorskip("lightning")

from hbp_compile import hbp_compile  # noqa: E402
from tests.models import make, mlp_stack  # noqa: E402

# Lightning's advice about dataloader workers, logging and accelerators is not what is tested here
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:lightning.*",
                                        "ignore:.*does not have many workers:UserWarning",
                                        "ignore:.*PossibleUserWarning")

DEPTH = 4


class HoldsCompiledNet(lightning.LightningModule):
    def __init__(self, compile_net: bool = True):
        super().__init__()
        net = make(mlp_stack(DEPTH))
        self.net = hbp_compile(net, k=2, backend="eager") if compile_net else net

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self(x)  # the stack's output is its loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _data() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, generator=g, dtype=torch.float64)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=4)


def _trainer(tmp_path) -> "lightning.Trainer":
    return lightning.Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))


def test_module_holding_compiled_net_fits_and_reloads_its_checkpoint(tmp_path):
    module = HoldsCompiledNet()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = _trainer(tmp_path)
    trainer.fit(module, _data())
    assert module.net.hbp_report.num_layers == DEPTH
    trained = module.state_dict()
    assert set(trained) == set(before)  # the model's own keys under net., no _orig_mod.
    assert any(not torch.equal(trained[k], before[k]) for k in trained)
    trainer.save_checkpoint(str(tmp_path / "last.ckpt"))
    reloaded = HoldsCompiledNet.load_from_checkpoint(str(tmp_path / "last.ckpt"))
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, trained[key]), key


def test_fit_of_compiled_lightning_module_runs_highway_bp(tmp_path):
    """``trainer.fit(hbp_compile(module))``: Lightning finds the module in ``_orig_mod`` and compiles
    its training_step with the wrapper's Highway-BP backend; the weights match plain backprop's at k >= L."""
    plain = HoldsCompiledNet(compile_net=False)
    module = HoldsCompiledNet(compile_net=False)
    compiled = hbp_compile(module, k=DEPTH, backend="eager")
    _trainer(tmp_path).fit(compiled, _data())
    _trainer(tmp_path).fit(plain, _data())
    assert compiled.hbp_report.num_layers == DEPTH
    for (name, p), q in zip(module.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=name)
