"""Su's recipes (spec §0, §1, §2.1, §2.2): AdamW → Lion, scale-aware groups and schedule, Amos groups."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from torch import nn

import danlu


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _group_of(groups: list[dict], p: torch.Tensor) -> dict:
    hits = [g for g in groups if any(q is p for q in g["params"])]
    assert len(hits) == 1, f"parameter in {len(hits)} groups"
    return hits[0]


def _rms(x: torch.Tensor) -> float:
    return float(x.double().pow(2).mean().sqrt())


# ==================================================================================================
# lion_from_adamw
# ==================================================================================================


class TestLionFromAdamW:
    def test_default_factor_10(self) -> None:
        out = danlu.lion_from_adamw(3e-4, 0.1)
        assert set(out) == {"lr", "weight_decay"}
        assert out["lr"] == pytest.approx(3e-5, rel=1e-15)
        assert out["weight_decay"] == pytest.approx(1.0, rel=1e-15)
        assert out == {"lr": 3e-4 / 10, "weight_decay": 0.1 * 10}

    @pytest.mark.parametrize("lr,wd,factor", [(1e-3, 1.0, 10), (3e-4, 0.01, 3), (1e-3, 0.05, 7.5), (5e-4, 0.0, 4)])
    def test_keeps_lr_times_wd(self, lr: float, wd: float, factor: float) -> None:
        """§1: lr ÷ k, λ × k, so the per-step decay lr·λ is unchanged."""
        out = danlu.lion_from_adamw(lr, wd, factor=factor)
        assert out["lr"] == pytest.approx(lr / factor, rel=1e-15)
        assert out["weight_decay"] == pytest.approx(wd * factor, rel=1e-15)
        assert out["lr"] * out["weight_decay"] == pytest.approx(lr * wd, rel=1e-14, abs=0)

    def test_readme_pairs(self) -> None:
        """§1 README pairs (factor 10): ViT AdamW(1e-3, 1.0) → Lion(1e-4, 10); diffusion (3e-4, 0.01) → (3e-5, 0.1)."""
        assert danlu.lion_from_adamw(1e-3, 1.0) == pytest.approx({"lr": 1e-4, "weight_decay": 10.0}, rel=1e-14)
        assert danlu.lion_from_adamw(3e-4, 0.01) == pytest.approx({"lr": 3e-5, "weight_decay": 0.1}, rel=1e-14)

    def test_unpacks_into_lion(self) -> None:
        p = nn.Parameter(torch.randn(4))
        opt = danlu.Lion([p], **danlu.lion_from_adamw(3e-4, 0.1))
        assert opt.param_groups[0]["lr"] == pytest.approx(3e-5)
        assert opt.param_groups[0]["weight_decay"] == pytest.approx(1.0)

    @pytest.mark.parametrize("factor", [0, 0.0, -1.0, -10])
    def test_bad_factor(self, factor: float) -> None:
        with pytest.raises(ValueError, match=r"Invalid factor"):
            danlu.lion_from_adamw(1e-3, 0.1, factor=factor)

    def test_bad_lr_and_wd(self) -> None:
        with pytest.raises(ValueError, match=r"Invalid lr"):
            danlu.lion_from_adamw(-1e-3, 0.1)
        with pytest.raises(ValueError, match=r"Invalid weight_decay"):
            danlu.lion_from_adamw(1e-3, -0.1)
        with pytest.raises(ValueError, match=r"Invalid factor"):
            danlu.lion_from_adamw(1e-3, 0.1, factor=float("nan"))


# ==================================================================================================
# scale_aware_groups
# ==================================================================================================


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc1 = nn.Linear(16, 64)
        self.ln = nn.LayerNorm(64)
        self.fc2 = nn.Linear(64, 8)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.ln(self.fc1(self.emb(idx)))))


class TestScaleAwareGroups:
    def test_lr_and_wd_per_tensor(self) -> None:
        """§2.1: η = α0·σ, λ = α0/(2σ); σ = init std for matrices, 0.5 for biases, LN weight and bias."""
        torch.manual_seed(0)
        net = Net()
        with torch.no_grad():
            net.fc1.weight.normal_(0.0, 0.02)
        a0 = 1e-3
        groups = danlu.scale_aware_groups(net, alpha0=a0)
        expected_sigma = {
            "emb.weight": float(net.emb.weight.detach().std()),
            "fc1.weight": float(net.fc1.weight.detach().std()),
            "fc1.bias": 0.5,
            "ln.weight": 0.5,
            "ln.bias": 0.5,
            "fc2.weight": float(net.fc2.weight.detach().std()),
            "fc2.bias": 0.5,
        }
        assert float(net.fc1.weight.detach().std()) == pytest.approx(0.02, rel=0.05)  # the init std
        for name, p in net.named_parameters():
            g = _group_of(groups, p)
            s = expected_sigma[name]
            assert g["lr"] == pytest.approx(a0 * s, rel=1e-6), name
            assert g["weight_decay"] == pytest.approx(a0 / (2 * s), rel=1e-6), name
        for g in groups:
            assert g["lr"] * g["weight_decay"] == pytest.approx(a0**2 / 2, rel=1e-12)

    def test_q_enters_decay_only(self) -> None:
        net = Net()
        a0, q = 2e-3, 2.0
        for g in danlu.scale_aware_groups(net, alpha0=a0, q=q):
            assert g["lr"] * g["weight_decay"] == pytest.approx(a0**2 / (2 * q), rel=1e-12)

    def test_zero_init_matrix_gets_sqrt_one_over_fan_in(self) -> None:
        lin = nn.Linear(48, 12)
        with torch.no_grad():
            lin.weight.zero_()
        groups = danlu.scale_aware_groups(lin, alpha0=1e-2)
        g = _group_of(groups, lin.weight)
        assert g["lr"] == pytest.approx(1e-2 * math.sqrt(1 / 48), rel=1e-12)
        assert g["weight_decay"] == pytest.approx(1e-2 / (2 * math.sqrt(1 / 48)), rel=1e-12)

    def test_sigma_fn_override(self) -> None:
        net = Net()
        calls = []

        def sigma_fn(name: str, p: torch.Tensor) -> float | None:
            calls.append(name)
            return 0.1 if name == "fc1.weight" else None  # None: fall back to the default rule

        groups = danlu.scale_aware_groups(net, alpha0=1e-3, sigma_fn=sigma_fn)
        assert sorted(calls) == sorted(n for n, _ in net.named_parameters())
        assert _group_of(groups, net.fc1.weight)["lr"] == pytest.approx(1e-4, rel=1e-12)
        assert _group_of(groups, net.fc1.bias)["lr"] == pytest.approx(5e-4, rel=1e-12)

    def test_bert_base_worked_example(self) -> None:
        """§1/§2.1: σ = √(1/768), α0 = 1.11e-3 → η ≈ 4e-5, λ ≈ 0.015."""
        lin = nn.Linear(768, 768, bias=False)
        groups = danlu.scale_aware_groups(lin, alpha0=1.11e-3, sigma_fn=lambda n, p: math.sqrt(1 / 768))
        (g,) = groups
        assert g["lr"] == pytest.approx(4e-5, rel=0.01)  # 4.005e-5
        assert g["weight_decay"] == pytest.approx(0.015, rel=0.03)  # 0.01538
        # with the tensor's own std instead: N(0, 1/768) init gives the same to ~3%
        with torch.no_grad():
            lin.weight.normal_(0.0, math.sqrt(1 / 768), generator=_gen(0))
        (g2,) = danlu.scale_aware_groups(lin, alpha0=1.11e-3)
        assert g2["lr"] == pytest.approx(4e-5, rel=0.03)

    def test_cover_each_trainable_once_frozen_excluded_shared_once(self) -> None:
        net = Net()
        net.tied = nn.Linear(16, 50, bias=False)
        net.tied.weight = net.emb.weight  # shared parameter (50, 16)
        net.ln.weight.requires_grad_(False)
        groups = danlu.scale_aware_groups(net, alpha0=1e-3, betas=(0.9, 0.99))
        ids = [id(p) for g in groups for p in g["params"]]
        assert len(ids) == len(set(ids))
        trainable = {id(p) for p in net.parameters() if p.requires_grad}  # parameters() de-duplicates
        assert set(ids) == trainable
        assert id(net.ln.weight) not in ids
        assert all(g["betas"] == (0.9, 0.99) for g in groups)  # group_options pass through
        # groups are merged by (lr, wd): biases and LN bias (σ = 0.5) share one group
        assert _group_of(groups, net.fc1.bias) is _group_of(groups, net.fc2.bias) is _group_of(groups, net.ln.bias)

    @pytest.mark.parametrize("opt_name", ["Lion", "Tiger"])
    def test_groups_work_with_lion_and_tiger(self, opt_name: str) -> None:
        torch.manual_seed(1)
        net = Net()
        groups = danlu.scale_aware_groups(net, alpha0=3e-2)
        opt = danlu.Lion(groups, betas=(0.9, 0.99)) if opt_name == "Lion" else danlu.Tiger(groups, lr=1.0)
        for g, src in zip(opt.param_groups, groups):
            assert g["lr"] == src["lr"] and g["weight_decay"] == src["weight_decay"]
        x = torch.randint(0, 50, (256,), generator=_gen(2))
        y = torch.randint(0, 8, (256,), generator=_gen(3))
        losses = []
        for _ in range(30):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < 0.85 * losses[0], (losses[0], losses[-1])  # observed ≈0.7

    @pytest.mark.parametrize("which", ["Lion", "Tiger"])
    @pytest.mark.parametrize("start", ["zero", "init", "3sigma"])
    def test_equilibrium_rms_is_sigma(self, which: str, start: str) -> None:
        """§1 [derived]: i.i.d. Gaussian g, betas (0, 0), η = α0σ, λ = α0/(2σ) ⇒ RMS(θ) → σ.

        Exact stationary value σ/√(1 − ηλ/2) (= σ·1.0003 here); RMS(θ)² relaxes at rate 2ηλ, so
        3000 steps ≥ 3/(ηλ) = 2400. Tolerance 10% (observed well under 1%).
        """
        sigma, a0 = 0.02, 0.05
        lin = nn.Linear(200, 100, bias=False)  # 20 000 elements
        with torch.no_grad():
            lin.weight.normal_(0.0, sigma, generator=_gen(4))
        groups = danlu.scale_aware_groups(lin, alpha0=a0)
        (g,) = groups
        s_hat = g["lr"] / a0  # the σ the recipe read off the init
        assert s_hat == pytest.approx(sigma, rel=0.02)
        eta, lam = g["lr"], g["weight_decay"]
        steps = 3000
        assert steps >= 3 / (eta * lam)
        with torch.no_grad():
            if start == "zero":
                lin.weight.zero_()
            elif start == "3sigma":
                lin.weight.mul_(3.0)
        opt = danlu.Lion(groups, betas=(0.0, 0.0)) if which == "Lion" else danlu.Tiger(groups, lr=1.0, beta=0.0)
        gen = _gen(5)
        w = lin.weight
        for _ in range(steps):
            w.grad = torch.randn(w.shape, generator=gen)
            opt.step()
        assert _rms(w.detach()) == pytest.approx(s_hat, rel=0.10)
        assert _rms(w.detach()) == pytest.approx(s_hat / math.sqrt(1 - eta * lam / 2), rel=0.02)


# ==================================================================================================
# scale_aware_lr_lambda
# ==================================================================================================


class TestScaleAwareSchedule:
    @pytest.mark.parametrize("power", [1, 2])
    @pytest.mark.parametrize("T", [1, 100, 12345.0])
    def test_halve_at(self, power: int, T: float) -> None:
        f = danlu.scale_aware_lr_lambda(halve_at=T, power=power)
        assert f(0) == 1.0
        assert f(T) == pytest.approx(0.5, rel=1e-14)
        kappa = (1.0 / T) if power == 1 else (math.sqrt(2) - 1) / T  # §2.1: α0p = (√2 − 1)/T
        assert f.kappa == pytest.approx(kappa, rel=1e-14)

    @pytest.mark.parametrize("power", [1, 2])
    def test_kappa_formula(self, power: int) -> None:
        f = danlu.scale_aware_lr_lambda(kappa=0.01, power=power)
        for t in (0, 1, 10, 1000):
            assert f(t) == pytest.approx(1 / (0.01 * t + 1) ** power, rel=1e-15)
        assert danlu.scale_aware_lr_lambda(0.01)(100) == pytest.approx(0.5)  # positional kappa, power 1

    def test_bad_arguments(self) -> None:
        with pytest.raises(TypeError):
            danlu.scale_aware_lr_lambda()
        with pytest.raises(TypeError):
            danlu.scale_aware_lr_lambda(kappa=0.1, halve_at=10)
        with pytest.raises(ValueError, match=r"Invalid power"):
            danlu.scale_aware_lr_lambda(kappa=0.1, power=3)
        with pytest.raises(ValueError, match=r"Invalid kappa"):
            danlu.scale_aware_lr_lambda(kappa=-0.1)
        with pytest.raises(ValueError, match=r"Invalid halve_at"):
            danlu.scale_aware_lr_lambda(halve_at=0)

    def test_picklable(self) -> None:
        f = danlu.scale_aware_lr_lambda(halve_at=500, power=2)
        g = pickle.loads(pickle.dumps(f))
        assert g(500) == f(500) and g(7) == f(7)
        assert copy.deepcopy(f)(123) == f(123)

    @pytest.mark.parametrize("power", [1, 2])
    def test_lambdalr_wd_ratio_and_state_dict(self, power: int) -> None:
        """§2.2 test 5: with LambdaLR, lr_t = α0σ·f(t); λ is constant, so wd_t/lr_t is constant and the
        per-step decay lr_t·λ = α0²/2·f(t)."""
        a0 = 1e-2
        net = Net()
        groups = danlu.scale_aware_groups(net, alpha0=a0)
        opt = danlu.Lion(groups)
        f = danlu.scale_aware_lr_lambda(halve_at=20, power=power)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
        base = [g["lr"] for g in groups]
        wds = [g["weight_decay"] for g in groups]
        x = torch.randint(0, 50, (8,))
        for t in range(1, 41):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
            sched.step()
            for g, b, wd in zip(opt.param_groups, base, wds):
                assert g["lr"] == pytest.approx(b * f(t), rel=1e-12)
                assert g["weight_decay"] == wd  # untouched by the scheduler
                assert g["lr"] * g["weight_decay"] == pytest.approx(a0**2 / 2 * f(t), rel=1e-12)
        assert f(20) == pytest.approx(0.5)
        assert opt.param_groups[0]["lr"] == pytest.approx(base[0] * f(40), rel=1e-12)
        assert f(40) == pytest.approx(1 / 3 if power == 1 else 1 / (2 * math.sqrt(2) - 1) ** 2, rel=1e-12)
        # state_dict round-trip restores the schedule's κ and power and the step count
        sd = sched.state_dict()
        opt2 = danlu.Lion(danlu.scale_aware_groups(net, alpha0=a0))
        sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, danlu.scale_aware_lr_lambda(kappa=123.0, power=1))
        sched2.load_state_dict(sd)
        assert sched2.lr_lambdas[0].kappa == f.kappa and sched2.lr_lambdas[0].power == power
        assert sched2.last_epoch == sched.last_epoch
        assert sched2.lr_lambdas[0](17) == f(17)

    def test_zero_grad_decay_follows_schedule(self) -> None:
        """Decay ×lr: with zero gradients θ_t = θ0·Π(1 − α0²/2·f(s)) (Lion, betas arbitrary)."""
        a0 = 0.1
        lin = nn.Linear(20, 10, bias=False)
        (g,) = groups = danlu.scale_aware_groups(lin, alpha0=a0)
        opt = danlu.Lion(groups)
        f = danlu.scale_aware_lr_lambda(kappa=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
        w0 = lin.weight.detach().double().clone()
        factor = 1.0
        for t in range(30):
            lin.weight.grad = torch.zeros_like(lin.weight)
            opt.step()
            factor *= 1 - a0**2 / 2 * f(t)
            sched.step()
        torch.testing.assert_close(lin.weight.detach().double(), w0 * factor, rtol=1e-5, atol=0)


# ==================================================================================================
# amos_groups
# ==================================================================================================


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 12)
        self.conv = nn.Conv2d(3, 6, kernel_size=(3, 5))
        self.lin = nn.Linear(12, 20)
        self.ln = nn.LayerNorm(20)
        self.head = nn.Linear(20, 4, bias=False)


class TestAmosGroups:
    def test_eta_and_reduce_dims(self) -> None:
        """§0/§2.2: Linear (out,in) → √(1/in), one v per output unit; Embedding (V,d) → √(1/d), one v per
        row; biases 0.5 scalar; LayerNorm weight 1.0 scalar; Conv2d → √(1/(in·kh·kw)), reduce (1,2,3)."""
        net = ConvNet()
        groups = danlu.amos_groups(net)
        want = {
            "emb.weight": (math.sqrt(1 / 12), (1,), (40, 1)),
            "conv.weight": (math.sqrt(1 / (3 * 3 * 5)), (1, 2, 3), (6, 1, 1, 1)),
            "conv.bias": (0.5, (0,), (1,)),
            "lin.weight": (math.sqrt(1 / 12), (1,), (20, 1)),
            "lin.bias": (0.5, (0,), (1,)),
            "ln.weight": (1.0, (0,), (1,)),
            "ln.bias": (0.5, (0,), (1,)),
            "head.weight": (math.sqrt(1 / 20), (1,), (4, 1)),
        }
        ids = [id(p) for g in groups for p in g["params"]]
        assert sorted(ids) == sorted(id(p) for p in net.parameters())
        for name, p in net.named_parameters():
            g = _group_of(groups, p)
            eta, dims, _ = want[name]
            assert g["eta"] == pytest.approx(eta, rel=1e-12), name
            assert tuple(g["reduce_dims"]) == dims, name
        # the state the optimizer builds from these groups
        opt = danlu.Amos(groups, lr=0.01)
        for p in net.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        for name, p in net.named_parameters():
            st = opt.state[p]
            assert tuple(st["v"].shape) == want[name][2], name
            assert tuple(st["b"].shape) == want[name][2], name
            assert set(st) == {"step", "v", "b"}

    def test_frozen_excluded_and_options_pass_through(self) -> None:
        net = ConvNet()
        net.lin.bias.requires_grad_(False)
        groups = danlu.amos_groups(net, momentum=0.9, clip_value=1.0)
        ids = {id(p) for g in groups for p in g["params"]}
        assert id(net.lin.bias) not in ids
        assert all(g["momentum"] == 0.9 and g["clip_value"] == 1.0 for g in groups)
        opt = danlu.Amos(groups, lr=0.01)
        assert all(g["momentum"] == 0.9 for g in opt.param_groups)
        for p in net.parameters():
            if p.requires_grad:
                p.grad = torch.randn_like(p)
        opt.step()
        st = opt.state[net.lin.weight]
        assert set(st) == {"step", "v", "b", "exp_avg"} and st["exp_avg"].shape == net.lin.weight.shape

    def test_amos_trains_small_model(self) -> None:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(10, 32), nn.LayerNorm(32), nn.Tanh(), nn.Linear(32, 1))
        x = torch.randn(512, 10, generator=_gen(6))
        w = torch.randn(10, 1, generator=_gen(7))
        y = torch.tanh(x @ w) + 0.05 * torch.randn(512, 1, generator=_gen(8))
        opt = danlu.Amos(danlu.amos_groups(model), lr=0.05)
        losses = []
        for _ in range(150):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert all(math.isfinite(v) for v in losses)
        assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])
