"""``danlu speed``: optimizer step time and state memory on a transformer-shaped set of tensors.

Every optimizer gets its own copy of the same parameters and the same fixed gradients. Steps are
timed interleaved (round r steps every optimizer once before round r + 1), so a slow phase of a
shared machine hits all of them alike; each optimizer reports its median step time and the ratio
to torch's fused AdamW measured in the same run. State bytes per parameter count every tensor in
the optimizer's state (a wrapper's and its inner optimizer's), after the first step. ``<name>-fused``
is the optimizer with ``fused=True`` (one compiled pass per bucket); its first step, reported
separately, includes the compilation.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from ..registry import create_optimizer

__all__ = ["SpeedResult", "transformer_shapes", "baselines", "default_names", "run_speed", "format_table", "results_json"]

# Closure-driven optimizers (several forward passes per step) have no comparable "step" on fixed
# gradients; `danlu compare` measures them on real tasks instead.
_NEEDS_CLOSURE = {"zero-order", "mgs", "gradient-penalty"}


@dataclass
class SpeedResult:
    name: str
    median_ms: float
    ratio_to_fused_adamw: float | None
    state_bytes_per_param: float
    first_step_s: float  # the first step's time: the compilation on a fused path, state creation elsewhere


def transformer_shapes(n_params: float = 30e6) -> list[tuple[int, ...]]:
    """Shapes of a GPT-style stack with about ``n_params`` parameters: an embedding (≈15% of the
    total), then per layer qkv (3d×d), attention out (d×d), MLP in (4d×d) and out (d×4d), with biases
    and two LayerNorms; d = 512 from ≈12M parameters up, a smaller power of two below."""
    d = int(min(512, max(16, 2 ** round(math.log2(math.sqrt(n_params / 48))))))
    vocab = max(16, min(8192, int(0.15 * n_params / d)))
    layer = [(3 * d, d), (3 * d,), (d, d), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,), (d,), (d,), (d,), (d,)]
    per_layer = sum(torch.Size(s).numel() for s in layer)
    n_layers = max(1, round((n_params - vocab * d) / per_layer))
    return [(vocab, d)] + layer * n_layers + [(d,), (d,)]


def baselines() -> dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]]:
    """Peer implementations that are installed: torch AdamW (for-loop, foreach, fused), torch
    Adafactor, lion-pytorch, pytorch-optimizer's Lion and Amos."""
    out: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {
        "torch-adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
        "torch-adamw-foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
        "torch-adamw-forloop": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=False),
    }
    if hasattr(torch.optim, "Adafactor"):
        out["torch-adafactor"] = lambda ps: torch.optim.Adafactor(ps, lr=1e-2)
    try:
        from lion_pytorch import Lion as LPLion

        out["lion-pytorch"] = lambda ps: LPLion(ps, lr=1e-4)
    except ImportError:
        pass
    try:
        import pytorch_optimizer as po

        out["pytorch-optimizer-lion"] = lambda ps: po.Lion(ps, lr=1e-4)
        out["pytorch-optimizer-amos"] = lambda ps: po.Amos(ps, lr=1e-3)
    except ImportError:
        pass
    return out


_DANLU_KWARGS: dict[str, dict[str, Any]] = {
    "tiger": dict(lr=1e-4), "amos": dict(lr=1e-2), "sgdm": dict(lr=1e-2),
    "egd": dict(lr=1e-2, signed=True), "eg-step-size": dict(inner="adamw", meta_lr=1e-2),
}


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    seen: set[int] = set()
    stack: list[Any] = [opt]
    while stack:
        o = stack.pop()
        for st in o.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor) and id(v) not in seen:
                    seen.add(id(v))
                    total += v.numel() * v.element_size()
        inner = getattr(o, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer):
            stack.append(inner)
    return total


def run_speed(
    names: list[str],
    *,
    n_params: float = 30e6,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    repeats: int = 10,
    warmup: int = 2,
) -> list[SpeedResult]:
    """Time ``names`` (danlu registry names or :func:`baselines` names) interleaved; see module doc."""
    known = baselines()
    gen = torch.Generator().manual_seed(0)
    shapes = transformer_shapes(n_params)
    base = [torch.randn(s, generator=gen).mul_(0.02).to(device=device, dtype=dtype) for s in shapes]
    grads = [torch.randn(s, generator=gen).mul_(1e-3).to(device=device, dtype=dtype) for s in shapes]
    n = sum(p.numel() for p in base)
    opts: dict[str, torch.optim.Optimizer] = {}
    for name in names:
        params = [p.clone().requires_grad_() for p in base]
        for p, g in zip(params, grads):
            p.grad = g
        if name in known:
            opts[name] = known[name](params)
        elif name.endswith(_FUSED):
            base_name = name[: -len(_FUSED)]
            opts[name] = create_optimizer(base_name, params, fused=True, **_DANLU_KWARGS.get(base_name, {}))
        else:
            opts[name] = create_optimizer(name, params, **_DANLU_KWARGS.get(name, {}))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in opts}
    first: dict[str, float] = {}
    with torch.no_grad():
        for r in range(warmup + repeats):
            for name, opt in opts.items():
                sync()
                t0 = time.perf_counter()
                opt.step()
                sync()
                if r >= warmup:
                    times[name].append(time.perf_counter() - t0)
                elif r == 0:
                    first[name] = time.perf_counter() - t0
    ref = statistics.median(times["torch-adamw-fused"]) if "torch-adamw-fused" in times else None
    return [
        SpeedResult(
            name=name,
            median_ms=1e3 * statistics.median(ts),
            ratio_to_fused_adamw=None if ref is None else statistics.median(ts) / ref,
            state_bytes_per_param=_state_bytes(opts[name]) / n,
            first_step_s=first.get(name, float("nan")),
        )
        for name, ts in times.items()
    ]


_FUSED = "-fused"


def default_names() -> list[str]:
    """The baselines, every danlu optimizer that steps from ``.grad``, and ``<name>-fused`` for each
    with a fused path."""
    from ..registry import OPTIMIZERS, list_optimizers

    names = [n for n in list_optimizers() if n not in _NEEDS_CLOSURE and not n.startswith("torch-")]
    fused = [n + _FUSED for n in names if getattr(OPTIMIZERS.get(n), "_step_scalars", ())]
    return list(baselines()) + names + fused


def format_table(results: list[SpeedResult], n_params: int, header: str) -> str:
    lines = [header, f"{'optimizer':<26}{'median ms':>11}{'× fused AdamW':>15}{'state B/param':>15}"
                     f"{'first step s':>14}"]
    for r in sorted(results, key=lambda r: r.median_ms):
        ratio = "—" if r.ratio_to_fused_adamw is None else f"{r.ratio_to_fused_adamw:.2f}"
        lines.append(f"{r.name:<26}{r.median_ms:>11.2f}{ratio:>15}{r.state_bytes_per_param:>15.2f}"
                     f"{r.first_step_s:>14.2f}")
    return "\n".join(lines)


def results_json(results: list[SpeedResult]) -> list[dict[str, Any]]:
    return [asdict(r) for r in results]
