"""What the distributed tests run in their worker processes (2 CPU ranks on gloo), and the one-process
reference they compare with.

Every run trains the same small MLP (:func:`make_model`) from the same initialisation on the same global
batch of 8 examples for a few steps: one process on the whole batch (:func:`train_single`), or each of
``world_size`` ranks on its slice of it under DDP or FSDP2 (:func:`train_ranked`). The MLP's shapes give
FSDP2 an uneven shard (9 rows on 2 ranks: 5 and 4), a matrix wider than tall (so Adafactor's row
statistic keeps the sharded dim and its column statistic is reduced over it) and a layer with one row
(rank 1's shard is empty).
"""

from __future__ import annotations

import os
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

import danlu

SIZES = (6, 5, 9, 3, 1)
BATCH = 8
STEPS = 4

# (name, optimizer factory name, kwargs): the configurations the distributed battery runs.
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "lion": ("lion", dict(lr=1e-2, weight_decay=0.1)),
    "lion-fused": ("lion", dict(lr=1e-2, weight_decay=0.1, fused=True)),
    "lion-bf16": ("lion", dict(lr=1e-2, state_dtype=torch.bfloat16)),
    "tiger": ("tiger", dict(lr=1e-2)),
    # Su's recipe: RMS(θ) of the whole (sharded) tensor, or per row; the NaN check over the whole gradient.
    "tiger-recipe-rms": ("tiger", dict(lr=3e-2, lr_scale="rms", on_nan="skip", weight_decay=0.1)),
    "tiger-recipe-rows": ("tiger", dict(lr=3e-2, lr_scale="row_rms", on_nan="skip")),
    "sgdm": ("sgdm", dict(lr=1e-1, weight_decay=1e-2)),
    "adamw": ("adamw", dict(lr=1e-2, weight_decay=0.1)),
    "adamw-accum2": ("adamw", dict(lr=1e-2, accum_steps=2)),
    "adamw-bf16": ("adamw", dict(lr=1e-2, state_dtype=torch.bfloat16)),
    "adax": ("adax", dict(lr=1e-2)),
    "adafactor": ("adafactor", dict(min_dim_size_to_factor=2, weight_decay=0.1)),
    "adafactor-beta1": ("adafactor", dict(min_dim_size_to_factor=2, beta1=0.9, lr=1e-2, relative_step=False)),
    "adafactor-unfactored": ("adafactor", dict()),
    "amos": ("amos", dict(lr=1e-1)),
    "amos-rows": ("amos", dict(lr=1e-1, momentum=0.9)),
    "egd-signed": ("egd", dict(lr=1e-1, signed=True)),
    "egd-budget": ("egd", dict(lr=1e-2, signed=True, l1_budget=10.0)),
    "eg-step-size-adamw": ("eg-step-size", dict(inner="adamw", lr=1e-2, meta_lr=0.5)),
    "eg-step-size-paper-tensor": ("eg-step-size", dict(inner="sgdm", lr=1e-1, meta_lr=0.5, form="paper",
                                                       granularity="tensor", normalize="cosine")),
    "scale-aware-step-adamw": ("scale-aware-step", dict(inner="adamw", lr=1e-2, weight_decay=0.0)),
    "chi-gated-sgdm": ("chi-gated", dict(inner="sgdm", lr=1e-1, k=2)),
    "gradient-penalty-lion": ("gradient-penalty", dict(inner="lion", lr=1e-2, strength=1e-2)),
    "mgs-adamw": ("mgs", dict(inner="adamw", lr=1e-2, candidates=3, noise=0.1, seed=5, max_grad_norm=1.0)),
    "mgs-uniform-snapshot": ("mgs", dict(inner="sgdm", lr=1e-1, candidates=2, noise=0.5, noise_scale="uniform",
                                         restore="snapshot", q_density="exact")),
    "zero-order": ("zero-order", dict(lr=1e-2, sigma=1e-2, samples=2, seed=3)),
    # Gradients accumulated in .grad over 2 micro-batches, synchronized on the last only (DDP's no_sync,
    # FSDP2's set_requires_gradient_sync(False)), then one step: the way to save that communication.
    "tiger-no-sync": ("tiger", dict(lr=1e-2)),
    "adamw-no-sync": ("adamw", dict(lr=1e-2, weight_decay=0.1)),
}
NO_SYNC_MICRO = 2  # micro-batches of the *-no-sync configs
# danlu's accumulation with DDP's no_sync() on all micro-batches but the last and sync_window=True (DDP only:
# FSDP2 refuses sync_window). One process runs the same accumulation without sync_window.
CONFIGS.update({
    "sgdm-sync-window": ("sgdm", dict(lr=1e-1, accum_steps=2, sync_window=True)),
    "tiger-sync-window": ("tiger", dict(lr=1e-2, accum_steps=2, sync_window=True)),
    "lion-sync-window": ("lion", dict(lr=1e-2, accum_steps=3, sync_window=True, weight_decay=0.1)),
})
# Configs whose step takes the closure (zero_grad, forward, backward, return the loss).
CLOSURE = ("gradient-penalty",)


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        if i:
            layers.append(nn.Tanh())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(STEPS, BATCH, SIZES[0], generator=g)
    y = torch.randn(STEPS, BATCH, SIZES[-1], generator=g)
    return x, y


def _spec(config: str) -> tuple[str, dict[str, Any]]:
    return CONFIGS[config] if config in CONFIGS else LOCAL_CONFIGS[config]


def build(model: nn.Module, config: str) -> torch.optim.Optimizer:
    name, kwargs = _spec(config)
    if kwargs.get("sync_window") and not dist.is_initialized():  # the one-process reference
        kwargs = {k: v for k, v in kwargs.items() if k != "sync_window"}
    return danlu.create_optimizer(name, model.parameters(), **kwargs)


def _micro(config: str) -> int:
    return _spec(config)[1].get("accum_steps", 1)


def _rows(rank: int, ws: int, j: int, k: int) -> list[int]:
    """Rank ``rank``'s part of micro-batch ``j`` of ``k``. Micro-batch j is the same examples for every
    world size (those with index ≡ j mod k) and rank r of ``ws`` holds the r-th ws-th of them, so a
    checkpoint resumed on another number of ranks sees the same micro-batches."""
    mine = list(range(j, BATCH, k))
    per = len(mine) // ws
    return mine[rank * per:(rank + 1) * per]


def _one_step(model: nn.Module, opt: torch.optim.Optimizer, config: str, x: torch.Tensor, y: torch.Tensor) -> None:
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    if _spec(config)[0] == "zero-order":  # the loss only: ZeroOrder evaluates it at perturbed points
        opt.step(lambda: nn.functional.mse_loss(model(x), y))
    elif _spec(config)[0] == "mgs":  # the task loss: this rank's MSE, not differentiated
        opt.step(closure, lambda: float(nn.functional.mse_loss(model(x), y)))
    elif _spec(config)[0] in CLOSURE:
        opt.step(closure)
    else:
        closure()
        opt.step()


def train_single(config: str, steps: int = STEPS, ws: int = 2) -> list[torch.Tensor]:
    """One process on the union of the ranks' batches (the same micro-batches where the config
    accumulates); returns the parameters after ``steps`` steps."""
    model = make_model()
    opt = build(model, config)
    x, y = batch()
    k = _micro(config)
    for t in range(steps):
        if config.endswith("-no-sync"):
            _accumulate_then_step(model, opt, [[i for r in range(ws) for i in _rows(r, ws, j, NO_SYNC_MICRO)]
                                               for j in range(NO_SYNC_MICRO)], x[t], y[t], None)
            continue
        for j in range(k):
            rows = [i for r in range(ws) for i in _rows(r, ws, j, k)]
            _one_step(model, opt, config, x[t, rows], y[t, rows])
    return [p.detach().clone() for p in model.parameters()]


def _accumulate_then_step(model: nn.Module, opt: torch.optim.Optimizer, micro: list[list[int]], x: torch.Tensor,
                          y: torch.Tensor, mode: str | None) -> None:
    """Sum the micro-batches' gradients in .grad (synchronized across ranks on the last only), one step."""
    import contextlib

    opt.zero_grad()
    for j, rows in enumerate(micro):
        last = j == len(micro) - 1
        ctx: Any = contextlib.nullcontext()
        if mode == "ddp" and not last:
            ctx = model.no_sync()
        elif mode == "fsdp":
            model.set_requires_gradient_sync(last)
        with ctx:
            nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
    opt.step()


class _WithRootParameter(nn.Module):
    """The MLP plus a parameter of the root module itself (FSDP2 keeps a root's own parameters gathered
    after a forward unless told otherwise)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.shift = nn.Parameter(torch.full((SIZES[-1],), 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + self.shift


def _shard_model(model: nn.Module, mode: str, forward_only: bool = False) -> nn.Module:
    """DDP, or FSDP2 per Linear and at the root; ``forward_only`` (derivative-free steps, which perturb the
    shards between forwards): the root re-gathers its own parameters for every forward."""
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model, reshard_after_forward=forward_only)
    return model


def full(p: torch.Tensor) -> torch.Tensor:
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()


def _train_steps(model: nn.Module, opt: torch.optim.Optimizer, config: str, steps: range, rank: int, ws: int) -> None:
    x, y = batch()
    k = _micro(config)
    mode = "ddp" if isinstance(model, nn.parallel.DistributedDataParallel) else "fsdp"
    for t in steps:
        if config.endswith("-no-sync"):
            _accumulate_then_step(model, opt, [_rows(rank, ws, j, NO_SYNC_MICRO) for j in range(NO_SYNC_MICRO)],
                                  x[t], y[t], mode)
            continue
        for j in range(k):
            rows = _rows(rank, ws, j, k)
            if config.endswith("-sync-window") and mode == "ddp" and j < k - 1:
                with model.no_sync():  # rank-local micro-gradients: sync_window averages the window's momentum
                    _one_step(model, opt, config, x[t, rows], y[t, rows])
            else:
                _one_step(model, opt, config, x[t, rows], y[t, rows])


def train_ranked(rank: int, ws: int, config: str, mode: str) -> list[torch.Tensor]:
    model = _shard_model(make_model(), mode)
    opt = build(model, config)
    _train_steps(model, opt, config, range(STEPS), rank, ws)
    return [full(p) for p in model.parameters()]


# --- entry points (run in every rank by tests/distributed/harness.run) ------------------------------------
def battery(rank: int, ws: int, out: str) -> dict[str, Any]:
    """Every config under DDP and FSDP2: {config: {"ddp": params, "fsdp": params}} (or the error text)."""
    result: dict[str, Any] = {}
    for config in CONFIGS:
        result[config] = {}
        for mode in ("ddp", "fsdp"):
            try:
                result[config][mode] = train_ranked(rank, ws, config, mode)
            except Exception:
                result[config][mode] = traceback.format_exc()
    return result


def _checkpoint(out: str, config: str, flatten: bool, tag: str = "") -> str:
    return os.path.join(out, f"{config}-{'flat' if flatten else 'nested'}{tag}")


def _options(flatten: bool) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=flatten)


def _save(model: nn.Module, opt: torch.optim.Optimizer, path: str, flatten: bool) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    sd = {"model": get_model_state_dict(model),
          "optim": get_optimizer_state_dict(model, opt, options=_options(flatten))}
    dcp.save(sd, checkpoint_id=path)


def _load(model: nn.Module, opt: torch.optim.Optimizer, path: str, flatten: bool) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    options = _options(flatten)
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt, options=options)}
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"], options=options)


def dcp_save_resume(rank: int, ws: int, out: str, configs: list[str], split: int) -> dict[str, Any]:
    """FSDP2 on ``ws`` ranks: train ``split`` steps and save model and optimizer with DCP under ``out``, in
    both of DCP's optimizer layouts (nested and flattened); then go on to ``STEPS``: the uninterrupted run."""
    result: dict[str, Any] = {}
    for config in configs:
        try:
            model = _shard_model(make_model(), "fsdp")
            opt = build(model, config)
            _train_steps(model, opt, config, range(split), rank, ws)
            for flatten in (False, True):
                _save(model, opt, _checkpoint(out, config, flatten), flatten)
            _train_steps(model, opt, config, range(split, STEPS), rank, ws)
            result[config] = [full(p) for p in model.parameters()]
        except Exception:
            result[config] = traceback.format_exc()
    return result


def dcp_load_resume(rank: int, ws: int, out: str, configs: list[str], split: int, tag: str = "",
                    resave: str = "") -> dict[str, Any]:
    """FSDP2 on ``ws`` ranks (any number): for each layout, a fresh model and optimizer (other initial
    values) loaded with DCP from the checkpoint ``tag`` names, then saved again under the tag ``resave``
    (if given) and trained from step ``split`` to ``STEPS``: {config: {"nested"|"flat": parameters}}."""
    result: dict[str, Any] = {}
    for config in configs:
        result[config] = {}
        for flatten in (False, True):
            try:
                model = _shard_model(make_model(seed=123), "fsdp")
                opt = build(model, config)
                _load(model, opt, _checkpoint(out, config, flatten, tag), flatten)
                if resave:
                    _save(model, opt, _checkpoint(out, config, flatten, resave), flatten)
                _train_steps(model, opt, config, range(split, STEPS), rank, ws)
                result[config]["flat" if flatten else "nested"] = [full(p) for p in model.parameters()]
            except Exception:
                result[config]["flat" if flatten else "nested"] = traceback.format_exc()
    return result


# --- zeroth order -------------------------------------------------------------------------------------------
ZO_CONFIGS: dict[str, dict[str, Any]] = {
    "two-sided": dict(lr=1e-2, sigma=1e-2, samples=3, seed=7),
    "one-sided-f0": dict(lr=1e-2, sigma=1e-2, samples=2, estimator="one_sided", seed=3, weight_decay=0.1),
    "sphere-ranks": dict(lr=1e-2, sigma=1e-2, samples=3, distribution="sphere", estimator="one_sided",
                         baseline="mean", fitness_shaping="centered_rank", seed=5),
    "inner-adamw": dict(sigma=1e-2, samples=2, seed=11),
}


def build_zo(model: nn.Module, config: str, **extra: Any) -> danlu.ZeroOrder:
    kwargs = {**ZO_CONFIGS[config], **extra}
    if config == "inner-adamw":
        return danlu.ZeroOrder(model.parameters(), optimizer=danlu.AdamW(model.parameters(), lr=1e-2), **kwargs)
    return danlu.ZeroOrder(model.parameters(), **kwargs)


def train_zo_single(config: str, ws: int = 2) -> list[torch.Tensor]:
    model = _WithRootParameter(make_model())
    opt = build_zo(model, config)
    x, y = batch()
    for t in range(STEPS):
        rows = [i for r in range(ws) for i in _rows(r, ws, 0, 1)]
        opt.step(lambda: nn.functional.mse_loss(model(x[t, rows]), y[t, rows]))
    return [p.detach().clone() for p in model.parameters()]


class _CountAllReduce:
    """Count the elements and bytes ``torch.distributed.all_reduce`` moves while active."""

    def __enter__(self) -> "_CountAllReduce":
        self.calls, self.bytes, self._orig = 0, 0, dist.all_reduce

        def counting(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            self.bytes += tensor.numel() * tensor.element_size()
            return self._orig(tensor, *args, **kwargs)

        dist.all_reduce = counting
        return self

    def __exit__(self, *exc: Any) -> None:
        dist.all_reduce = self._orig


def zero_order(rank: int, ws: int, out: str) -> dict[str, Any]:
    """ZeroOrder under DDP and FSDP2, each rank on its slice of the batch: {config: {mode: params}} and
    the all-reduce traffic of the optimizer's steps (the closure's own collectives excluded)."""
    result: dict[str, Any] = {"traffic": {}}
    x, y = batch()
    rows = _rows(rank, ws, 0, 1)
    for config in ZO_CONFIGS:
        result[config] = {}
        for mode in ("ddp", "fsdp"):
            try:
                model = _shard_model(_WithRootParameter(make_model()), mode, forward_only=True)
                opt = build_zo(model, config)
                counted = {"calls": 0, "bytes": 0}
                for t in range(STEPS):
                    def closure(t: int = t) -> torch.Tensor:
                        with _Paused(counter):
                            return nn.functional.mse_loss(model(x[t, rows]), y[t, rows])

                    with _CountAllReduce() as counter:
                        opt.step(closure)
                    counted["calls"] += counter.calls
                    counted["bytes"] += counter.bytes
                result[config][mode] = [full(p) for p in model.parameters()]
                result["traffic"][(config, mode)] = counted
            except Exception:
                result[config][mode] = traceback.format_exc()
    return result


class _Paused:
    """Inside the closure: the model's own collectives (FSDP2's, DDP's) are not the optimizer's."""

    def __init__(self, counter: _CountAllReduce) -> None:
        self.counter = counter

    def __enter__(self) -> None:
        self.saved = (self.counter.calls, self.counter.bytes)

    def __exit__(self, *exc: Any) -> None:
        self.counter.calls, self.counter.bytes = self.saved


def bad_input(rank: int, ws: int, out: str) -> dict[str, Any]:
    """What every rank raises (and whether anything changed) for inputs that must be refused."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    result: dict[str, Any] = {}

    def attempt(name: str, make: Callable[[], tuple[list[torch.Tensor], Callable[[], Any]]]) -> None:
        try:
            params, go = make()
            before = [full(p) for p in params]
            try:
                go()
                result[name] = ("no error", None, None)
            except BaseException as err:  # noqa: BLE001 - the type and message are the result (DCP: CheckpointException)
                after = [full(p) for p in params]
                detail = " ".join(str(e) for e in getattr(err, "failures", {}).values())  # DCP's, per rank
                result[name] = (f"{type(err).__name__}: {err} {detail}".strip(),
                                all(torch.equal(a, b) for a, b in zip(before, after)),
                                max(float((a - b).abs().max()) for a, b in zip(before, after)))
        except Exception:
            result[name] = (traceback.format_exc(), None, None)

    mesh = init_device_mesh("cpu", (ws,))

    def tensor_parallel() -> tuple[list[torch.Tensor], Callable[[], Any]]:
        w = nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)]))
        w.grad = distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)])
        return [w], danlu.Lion([w], lr=0.1).step

    def two_d_mesh() -> tuple[list[torch.Tensor], Callable[[], Any]]:
        mesh2 = init_device_mesh("cpu", (1, ws), mesh_dim_names=("dp", "tp"))
        w = nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh2, [Shard(0), Shard(0)]))
        w.grad = distribute_tensor(torch.randn(4, 6), mesh2, [Shard(0), Shard(0)])
        return [w], danlu.Adafactor([w]).step

    def other_seeds() -> tuple[list[torch.Tensor], Callable[[], Any]]:
        model = _shard_model(make_model(), "ddp")
        opt = danlu.ZeroOrder(model.parameters(), lr=0.1, seed=rank)  # a different seed on each rank
        xb, yb = batch()
        return list(model.parameters()), lambda: opt.step(lambda: nn.functional.mse_loss(model(xb[0]), yb[0]))

    def nonfinite_loss_on_one_rank() -> tuple[list[torch.Tensor], Callable[[], Any]]:
        model = _shard_model(make_model(), "ddp")
        opt = danlu.ZeroOrder(model.parameters(), lr=0.1, samples=2)
        xb, yb = batch()
        bad = float("nan") if rank == 1 else 0.0
        return list(model.parameters()), lambda: opt.step(lambda: nn.functional.mse_loss(model(xb[0]), yb[0]) + bad)

    def load_for(saved: str, loaded: str, **shape: Any) -> Callable[[], tuple[list[torch.Tensor], Callable[[], Any]]]:
        """A DCP checkpoint of ``saved`` (FSDP2, 1 step) loaded into a fresh ``loaded`` optimizer."""

        def make() -> tuple[list[torch.Tensor], Callable[[], Any]]:
            model = _shard_model(make_model(), "fsdp")
            opt = build(model, saved)
            _train_steps(model, opt, saved, range(1), rank, ws)
            path = os.path.join(out, f"bad-{saved}")
            _save(model, opt, path, False)
            other = _shard_model(make_model() if not shape else _wider_model(), "fsdp")
            other_opt = build(other, loaded)
            return list(other.parameters()), lambda: _load(other, other_opt, path, False)

        return make

    def root_kept_gathered(kind: str) -> Callable[[], tuple[list[torch.Tensor], Callable[[], Any]]]:
        def make() -> tuple[list[torch.Tensor], Callable[[], Any]]:
            model = _shard_model(_WithRootParameter(make_model()), "fsdp")  # fully_shard's default at the root
            xb, yb = batch()
            rows = _rows(rank, ws, 0, 1)

            def loss() -> torch.Tensor:
                return nn.functional.mse_loss(model(xb[0, rows]), yb[0, rows])

            if kind == "zero-order":
                opt: Any = danlu.ZeroOrder(model.parameters(), lr=0.1, samples=2)
                return list(model.parameters()), lambda: opt.step(loss)
            opt = danlu.MGS(None, danlu.SGDM(model.parameters(), lr=0.1))

            def closure() -> torch.Tensor:
                opt.zero_grad()
                out = loss()
                out.backward()
                return out

            return list(model.parameters()), lambda: opt.step(closure, lambda: float(loss()))

        return make

    for name, make in [("zero_order_root_kept_gathered", root_kept_gathered("zero-order")),
                       ("mgs_root_kept_gathered", root_kept_gathered("mgs")),
                       ("tensor_parallel", tensor_parallel), ("two_d_mesh", two_d_mesh),
                       ("other_seeds", other_seeds), ("nonfinite_loss_on_one_rank", nonfinite_loss_on_one_rank),
                       ("checkpoint_of_another_optimizer", load_for("adafactor", "adamw")),
                       ("checkpoint_of_another_shape", load_for("adamw", "adamw", wider=True))]:
        attempt(name, make)
    return result


def _wider_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(SIZES[0], 7), nn.Tanh(), nn.Linear(7, SIZES[-1]))


def collectives(rank: int, ws: int, out: str) -> dict[str, Any]:
    """All-reduce calls of one FSDP2 step (after the first) per config: the optimizer's collectives are
    bucketed, so their number does not grow with the number of sharded tensors."""
    result: dict[str, Any] = {}
    x, y = batch()
    for config in ("adafactor", "adafactor-beta1", "amos", "egd-budget", "lion", "eg-step-size-paper-tensor",
                   "mgs-adamw"):
        model = _shard_model(make_model(), "fsdp")
        opt = build(model, config)
        _train_steps(model, opt, config, range(1), rank, ws)
        rows = _rows(rank, ws, 0, 1)

        def loss() -> torch.Tensor:
            with _Paused(counter):  # the model's own collectives are not the optimizer's
                return nn.functional.mse_loss(model(x[1, rows]), y[1, rows])

        def closure() -> torch.Tensor:
            with _Paused(counter):
                opt.zero_grad()
                out = nn.functional.mse_loss(model(x[1, rows]), y[1, rows])
                out.backward()
            return out

        if _spec(config)[0] != "mgs":
            closure_counter = _CountAllReduce()
            with closure_counter:
                counter = closure_counter
                closure()
        with _CountAllReduce() as counter:
            if _spec(config)[0] == "mgs":
                opt.step(closure, lambda: float(loss()))
            else:
                opt.step()
        result[config] = {"calls": counter.calls, "bytes": counter.bytes}
    return result


# --- shard_statistics="local" -------------------------------------------------------------------------------
LOCAL_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "adafactor-local": ("adafactor", dict(min_dim_size_to_factor=2, weight_decay=0.1, shard_statistics="local")),
    "amos-local": ("amos", dict(lr=1e-1, shard_statistics="local")),
}


def local_mode(rank: int, ws: int, out: str) -> dict[str, Any]:
    """FSDP2 with shard_statistics="local": the parameters after STEPS steps, the optimizer's all-reduce
    calls in its last step, and a DCP save after 2 steps resumed on the same ranks."""
    result: dict[str, Any] = {}
    for config in LOCAL_CONFIGS:
        try:
            model = _shard_model(make_model(), "fsdp")
            opt = build(model, config)
            _train_steps(model, opt, config, range(SPLIT_LOCAL), rank, ws)
            _save(model, opt, _checkpoint(out, config, False), False)
            _train_steps(model, opt, config, range(SPLIT_LOCAL, STEPS - 1), rank, ws)
            x, y = batch()
            rows = _rows(rank, ws, 0, 1)
            opt.zero_grad()
            nn.functional.mse_loss(model(x[STEPS - 1, rows]), y[STEPS - 1, rows]).backward()
            with _CountAllReduce() as counter:
                opt.step()
            placements = {k: (str(tuple(v.placements)), tuple(v.shape)) for k, v in opt.state[next(iter(
                model.parameters()))].items() if hasattr(v, "placements")}
            resumed = _shard_model(make_model(seed=123), "fsdp")
            resumed_opt = build(resumed, config)
            _load(resumed, resumed_opt, _checkpoint(out, config, False), False)
            _train_steps(resumed, resumed_opt, config, range(SPLIT_LOCAL, STEPS), rank, ws)
            result[config] = {"params": [full(p) for p in model.parameters()], "calls": counter.calls,
                              "resumed": [full(p) for p in resumed.parameters()], "placements": placements}
        except Exception:
            result[config] = traceback.format_exc()
    return result


SPLIT_LOCAL = 2


ENTRY_POINTS: dict[str, Callable[..., Any]] = {
    "local_mode": local_mode,
    "collectives": collectives,
    "battery": battery, "dcp_save_resume": dcp_save_resume, "dcp_load_resume": dcp_load_resume,
    "zero_order": zero_order, "bad_input": bad_input,
}


def main(rank: int, ws: int, init: str, out: str, entry: str, args: tuple[Any, ...]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=ws)
    try:
        result = ENTRY_POINTS[entry](rank, ws, out, *args)
    except Exception:
        result = {"__error__": traceback.format_exc()}
    finally:
        dist.barrier()
        dist.destroy_process_group()
    torch.save(result, os.path.join(out, f"{entry}-rank{rank}.pt"))
