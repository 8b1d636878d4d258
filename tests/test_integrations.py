"""danlu inside the training frameworks users run: HF Trainer and Lightning (and timm, where installed).

These drive the real clients (the ``test`` extra installs transformers and lightning) on a tiny model
for a few steps on CPU; each test names the failure it guards against. The snippets in the README's
"Works with" section are the ones exercised here.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import danlu


class Regressor(nn.Module):
    """A model HF Trainer can train: forward(x, labels) returns {"loss": ...}."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x, labels=None):
        out = self.net(x)
        return {"loss": F.mse_loss(out, labels), "logits": out}


class Data(torch.utils.data.Dataset):
    def __init__(self, n: int = 64) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x.sum(dim=1, keepdim=True).tanh()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def hf_args(tmp_path, **kw):
    transformers = pytest.importorskip("transformers")
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=6, learning_rate=1e-3,
                report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, seed=0,
                remove_unused_columns=False, disable_tqdm=True, dataloader_num_workers=0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


@pytest.mark.parametrize("cls,kwargs", [(danlu.Lion, {"lr": 1e-4, "weight_decay": 0.1}), (danlu.Adafactor, {}),
                                        (danlu.Tiger, {}), (danlu.Amos, {})])
def test_hf_trainer_optimizer_cls_and_kwargs(tmp_path, cls, kwargs):
    """Trainer builds the optimizer from (class, kwargs) and always adds its scheduler: Adafactor's
    old lr=None failed there (TypeError: unsupported operand ... 'NoneType' and 'float')."""
    transformers = pytest.importorskip("transformers")
    model = Regressor()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = transformers.Trainer(model=model, args=hf_args(tmp_path), train_dataset=Data(),
                                   optimizer_cls_and_kwargs=(cls, kwargs))
    trainer.train()
    inner = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(inner, cls)
    assert trainer.lr_scheduler.get_last_lr()[0] < trainer.lr_scheduler.base_lrs[0]  # the linear decay ran
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_hf_trainer_accumulation_in_momentum_counts_updates(tmp_path):
    """With accumulation in the optimizer (Trainer's gradient_accumulation_steps=1) Trainer steps the
    scheduler on every micro-batch: the schedule ran k× too fast. StepOnUpdate counts updates."""
    transformers = pytest.importorskip("transformers")
    model = Regressor()
    opt = danlu.SGDM(model.parameters(), lr=0.1, accum_steps=4)
    updates = 3
    sched = transformers.get_linear_schedule_with_warmup(opt, num_warmup_steps=1, num_training_steps=updates)
    trainer = transformers.Trainer(model=model, args=hf_args(tmp_path, max_steps=4 * updates),
                                   train_dataset=Data(), optimizers=(opt, danlu.StepOnUpdate(sched)))
    trainer.train()
    assert sched.last_epoch == updates and sched.get_last_lr()[0] == 0.0


def _lightning():
    return pytest.importorskip("lightning.pytorch")


def _loader():
    return torch.utils.data.DataLoader(Data(), batch_size=8)


def _trainer(pl, **kw):
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    base = dict(max_steps=6, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False)
    base.update(kw)
    return pl.Trainer(**base)


def _module(pl, configure):
    """A LightningModule around :class:`Regressor` (automatic optimization) whose
    ``configure_optimizers`` returns ``configure(module)``."""

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = Regressor()

        def training_step(self, batch, i):
            return self.model(batch["x"], batch["labels"])["loss"]

        def configure_optimizers(self):
            return configure(self)

    return Module


def _penalised_module(pl):
    return _module(pl, lambda m: danlu.GradientPenalty(torch.optim.SGD(m.parameters(), lr=0.1), strength=1e-2))


def test_lightning_automatic_optimization_with_step_on_update():
    pl = _lightning()

    def configure(module):
        opt = danlu.Lion(module.parameters(), lr=1e-3, accum_steps=2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": danlu.StepOnUpdate(sched), "interval": "step"}}

    module = _module(pl, configure)()
    _trainer(pl).fit(module, _loader())
    opt = module.optimizers().optimizer
    assert opt.param_groups[0]["lr"] == 1e-3 * 0.5**3  # 6 micro-batches, 3 updates


def test_lightning_gradient_penalty_automatic_and_zero_order_manual():
    """GradientPenalty takes Lightning's closure (automatic optimization); ZeroOrder, whose closure
    must not call backward, runs in manual optimization."""
    pl = _lightning()

    Penalised = _penalised_module(pl)
    class ZO(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = Regressor()
            self.automatic_optimization = False

        def training_step(self, batch, i):
            opt = self.optimizers()
            opt.step(lambda: self.model(batch["x"], batch["labels"])["loss"])

        def configure_optimizers(self):
            return danlu.ZeroOrder(self.parameters(), lr=1e-2, samples=2)

    for cls in (Penalised, ZO):
        module = cls()
        before = [p.detach().clone() for p in module.parameters()]
        _trainer(pl).fit(module, _loader())
        assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters())), cls.__name__


def test_lightning_gradient_penalty_refuses_accumulate_grad_batches():
    """accumulate_grad_batches=2 left the first micro-batch's gradient in .grad, which GradientPenalty
    dropped silently; now it raises."""
    pl = _lightning()

    Penalised = _penalised_module(pl)
    with pytest.raises(RuntimeError, match="did not come from its closure"):
        _trainer(pl, accumulate_grad_batches=2).fit(Penalised(), _loader())


def test_timm_lookahead_and_scheduler_round_trip():
    """timm's Lookahead keeps its slow weights in the base optimizer's state: danlu refused to reload
    it (... has state ['exp_avg', 'lookahead_slow_buff'], expected ['exp_avg'])."""
    timm_optim = pytest.importorskip("timm.optim")
    timm_scheduler = pytest.importorskip("timm.scheduler")
    model = Regressor()
    opt = timm_optim.Lookahead(danlu.Lion(model.parameters(), lr=1e-3), k=2)
    sched = timm_scheduler.CosineLRScheduler(opt, t_initial=10)
    data = Data()
    for epoch in range(3):
        opt.zero_grad()
        model(data.x, data.y)["loss"].backward()
        opt.step()
        sched.step(epoch + 1)
    sd = opt.state_dict()
    model2 = Regressor()
    opt2 = timm_optim.Lookahead(danlu.Lion(model2.parameters(), lr=1e-3), k=2)
    opt2.load_state_dict(sd)
    assert "lookahead_slow_buff" in opt2.state_dict()["state"][0]
