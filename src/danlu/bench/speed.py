"""``danlu speed``: optimizer step time and state memory on a transformer-shaped set of tensors.

Every optimizer gets its own copy of the same parameters and the same fixed gradients. Steps are
timed interleaved (round r steps every optimizer once before round r + 1), so a slow phase of a
shared machine hits all of them alike; each optimizer reports its median step time and the ratio
to torch's fused AdamW measured in the same run. State bytes per parameter count every tensor in
the optimizer's state (a wrapper's and its inner optimizer's), after the first step. ``<name>-fused``
is the optimizer with ``fused=True`` (one compiled pass per bucket); its first step, reported
separately, includes the compilation. ``<name>-bf16`` and ``<name>-fused-bf16`` keep the optimizer's
moments in bfloat16 (``state_dtype=torch.bfloat16``, stochastic rounding on store).

The limit: a step is memory-bound, so the least time it can take is the bytes it must move over the
machine's streaming bandwidth. ``bytes_per_param`` counts, per parameter, θ read and written, the
gradient read, every state tensor read and written (the measured state bytes per parameter, twice),
and the extra reads of the gradient the algorithm needs before it can update (Adafactor's factored
statistics and its update clip: two; Amos's statistics: one). The bandwidth is measured in the same run
(:func:`stream_bandwidth`: the best of several in-place ``b += c`` passes over buffers far larger than
the cache), and ``ideal_ms`` is that byte count over it; ``fraction_of_limit`` = ideal_ms / median_ms.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch

from ..registry import create_optimizer

__all__ = ["SpeedResult", "stream_bandwidth", "bytes_per_param", "transformer_shapes", "baselines", "default_names",
           "run_speed", "format_table", "results_json", "is_valid_name",
           "compiler_setup_seconds"]

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
    path: str  # "loop" (per tensor), "fused" (compiled per bucket), "foreach" (torch), "peer" (another library)
    bytes_per_param: float  # what one step must move per parameter (see the module doc)
    ideal_ms: float  # bytes_per_param · n / the measured streaming bandwidth
    fraction_of_limit: float  # ideal_ms / median_ms


# Extra passes over the gradient an algorithm needs before its update pass, per base name.
_EXTRA_GRAD_PASSES = {"adafactor": 2, "torch-adafactor": 2, "amos": 1, "pytorch-optimizer-amos": 1}


def bytes_per_param(name: str, elt: int, state_bytes_per_param: float) -> float:
    """Bytes one step of ``name`` must move per parameter (θ read and written, g read, state read and
    written, extra reads of g), for parameters and gradients of ``elt`` bytes."""
    base = _split(name)[0]
    return 3 * elt + 2 * state_bytes_per_param + _EXTRA_GRAD_PASSES.get(base, 0) * elt


def _synchronizer(device: str) -> Callable[[], None]:
    """What waits for ``device``'s queued work before a clock is read (nothing on CPU)."""
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def stream_bandwidth(device: str = "cpu", n_bytes: int = 256 << 20, repeats: int = 7) -> float:
    """The machine's streaming bandwidth in bytes/s: the best of ``repeats`` in-place passes ``b += c``
    over float32 buffers of ``n_bytes`` each (three streams: b read and written, c read). In place, as
    an optimizer step updates θ and its state, so no write-allocate traffic is counted as bandwidth."""
    n = n_bytes // 4
    b = torch.zeros(n, device=device)
    c = torch.zeros(n, device=device)
    sync = _synchronizer(device)
    best = math.inf
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        b.add_(c)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 3 * n * 4 / best


def _split(name: str) -> tuple[str, bool, bool]:
    """``<base>[-fused][-bf16]`` as (base, fused, bfloat16 state)."""
    bf16 = name.endswith(_BF16)
    if bf16:
        name = name[: -len(_BF16)]
    fused = name.endswith(_FUSED)
    return (name[: -len(_FUSED)] if fused else name), fused, bf16


def compiler_setup_seconds(device: str = "cpu") -> float:
    """Compile and run a one-op function with inductor: the process's one-time compiler setup (the
    C++ toolchain and vector-ISA probes on CPU), paid by whichever fused optimizer compiles first.
    ``danlu speed`` runs it before timing, so each fused optimizer's first step is its own compile."""
    fn = torch.compile(lambda x: x * 2 + 1, fullgraph=True)
    sync = _synchronizer(device)
    t0 = time.perf_counter()
    fn(torch.ones(64, device=device))
    sync()
    return time.perf_counter() - t0


def _path(name: str, known: dict[str, Any]) -> str:
    """The path ``name`` runs on; ``known`` is :func:`baselines`."""
    if name not in known and _split(name)[1]:
        return "fused"
    if name.startswith("torch-adamw-"):
        return name.rsplit("-", 1)[-1]  # fused, foreach, forloop
    if name in known:
        return "loop" if name.startswith("torch-") else "peer"  # torch's own default on CPU: the for-loop
    return "loop"


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
    "egd": dict(lr=1e-2), "eg-step-size": dict(inner="adamw", meta_lr=1e-2),
}
# Timed settings of a registry optimizer under a name of their own: (registry name, keywords).
# ``egd`` itself is EGU (its default: positive parameters, no state); ``egd-signed`` is EG± (θ⁻ state).
_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {"egd-signed": ("egd", dict(lr=1e-2, signed=True))}
# Optimizers whose parameters must be positive: timed on |θ| + 10⁻³ (same bytes, same shapes).
_POSITIVE = {"egd"}


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
    bandwidth: float | None = None,
    shapes: Sequence[Sequence[int]] | None = None,
) -> list[SpeedResult]:
    """Time ``names`` (danlu registry names or :func:`baselines` names) interleaved; see module doc.

    The tensors have ``shapes`` when given (a model's own, e.g. from ``danlu speed --params-from``),
    else :func:`transformer_shapes` of ``n_params``."""
    known = baselines()
    gen = torch.Generator().manual_seed(0)
    shapes = transformer_shapes(n_params) if shapes is None else [tuple(s) for s in shapes]
    if not shapes:
        raise ValueError("shapes must name at least one tensor")
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
        else:
            base_name, fused, bf16 = _split(name)
            kwargs = dict(_DANLU_KWARGS.get(base_name, {}))
            if base_name in _VARIANTS:
                base_name, kwargs = _VARIANTS[base_name][0], dict(_VARIANTS[base_name][1])
            elif base_name in _POSITIVE:
                with torch.no_grad():
                    for p in params:
                        p.abs_().add_(1e-3)
            if fused:
                kwargs["fused"] = True
            if bf16:
                kwargs["state_dtype"] = torch.bfloat16
            opts[name] = create_optimizer(base_name, params, **kwargs)
    sync = _synchronizer(device)
    if bandwidth is None:
        bandwidth = stream_bandwidth(device)
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
    elt = base[0].element_size()
    out = []
    for name, ts in times.items():
        median = statistics.median(ts)
        state_bpp = _state_bytes(opts[name]) / n
        bpp = bytes_per_param(name, elt, state_bpp)
        ideal = bpp * n / bandwidth
        out.append(SpeedResult(
            name=name,
            median_ms=1e3 * median,
            ratio_to_fused_adamw=None if ref is None else median / ref,
            state_bytes_per_param=state_bpp,
            first_step_s=first.get(name, float("nan")),
            path=_path(name, known),
            bytes_per_param=bpp,
            ideal_ms=1e3 * ideal,
            fraction_of_limit=ideal / median,
        ))
    return out


_FUSED = "-fused"
_BF16 = "-bf16"


def default_names() -> list[str]:
    """The baselines, every danlu optimizer that steps from ``.grad``, ``<name>-fused`` for each with a
    fused path, and ``<name>-fused-bf16`` for Lion, Tiger and SGDM (bfloat16 momentum; any optimizer
    with bfloat16-capable state can be named, see :func:`is_valid_name`)."""
    from ..registry import OPTIMIZERS, list_optimizers

    names = [n for n in list_optimizers() if n not in _NEEDS_CLOSURE and not n.startswith("torch-")]
    names += [v for v, (n, _) in _VARIANTS.items() if n in names]
    fused = [n + _FUSED for n in names if getattr(OPTIMIZERS.get(_VARIANTS.get(n, (n,))[0]), "_step_scalars", ())]
    bf16 = [n + _FUSED + _BF16 for n in _BF16_NAMES if n + _FUSED in fused]
    return list(baselines()) + names + fused + bf16


def is_valid_name(name: str, known: list[str] | None = None) -> bool:
    """Whether ``danlu speed`` can time ``name``: a default name (``known``: :func:`default_names`, if
    the caller has it), or ``<danlu name>[-fused]-bf16`` for an optimizer with bfloat16-capable state
    (and a fused path, for ``-fused``)."""
    from ..registry import OPTIMIZERS

    if name in (default_names() if known is None else known):
        return True
    base, fused, bf16 = _split(name)
    cls = OPTIMIZERS.get(base)
    return (bf16 and cls is not None and base not in _NEEDS_CLOSURE and bool(getattr(cls, "_low_precision_state", ()))
            and (not fused or bool(getattr(cls, "_step_scalars", ()))))


# The sign-momentum family, whose one state tensor bfloat16 halves (each such compile takes minutes
# on 2 cores, so AdamW's and AdaX's are timed on request only).
_BF16_NAMES = ("lion", "tiger", "sgdm")


def format_table(results: list[SpeedResult], n_params: int, header: str, bandwidth: float | None = None) -> str:
    """The results as a table, fastest first; ``of limit`` is the step's fraction of the ideal time."""
    if bandwidth is not None:
        header += f"; streaming bandwidth {bandwidth / 1e9:.1f} GB/s"
    lines = [header, f"{'optimizer':<26}{'path':>8}{'median ms':>11}{'× fused AdamW':>15}{'state B/param':>15}"
                     f"{'step B/param':>14}{'ideal ms':>10}{'of limit':>10}{'first step s':>14}"]
    for r in sorted(results, key=lambda r: r.median_ms):
        ratio = "—" if r.ratio_to_fused_adamw is None else f"{r.ratio_to_fused_adamw:.2f}"
        lines.append(f"{r.name:<26}{r.path:>8}{r.median_ms:>11.2f}{ratio:>15}{r.state_bytes_per_param:>15.2f}"
                     f"{r.bytes_per_param:>14.1f}{r.ideal_ms:>10.2f}{r.fraction_of_limit:>10.2f}"
                     f"{r.first_step_s:>14.2f}")
    return "\n".join(lines)


def results_json(results: list[SpeedResult]) -> list[dict[str, Any]]:
    return [asdict(r) for r in results]
