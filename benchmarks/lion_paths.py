"""Lion's step four ways against torch's fused AdamW, interleaved in one process: the per-tensor loop,
a hand-written ``torch._foreach_*`` step (the candidate default path on CPU), ``fused=True``, and the
loop with bfloat16 state (``state_dtype=torch.bfloat16``, stochastic rounding).

Run: ``python benchmarks/lion_paths.py`` (29.4M parameters in transformer shapes, fp32, 8 rounds; the
medians of rounds 3-8 and their ratios to fused AdamW are printed).
"""

import statistics
import time

import torch

import danlu
from danlu.bench.speed import transformer_shapes


def foreach_lion_(params, grads, exp_avgs, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1):
    """Lion by foreach ops (without danlu's NaN propagation, which would add a pass)."""
    c = torch._foreach_mul(exp_avgs, betas[0])
    torch._foreach_add_(c, grads, alpha=1 - betas[0])
    torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_add_(params, torch._foreach_sign(c), alpha=-lr)
    torch._foreach_mul_(exp_avgs, betas[1])
    torch._foreach_add_(exp_avgs, grads, alpha=1 - betas[1])


def main() -> None:
    torch.manual_seed(0)
    shapes = transformer_shapes(30e6)
    base = [torch.randn(s) * 0.02 for s in shapes]
    grads = [torch.randn(s) * 1e-3 for s in shapes]

    def params():
        ps = [p.clone().requires_grad_() for p in base]
        for p, g in zip(ps, grads):
            p.grad = g
        return ps

    opts = {
        "torch-adamw-fused": torch.optim.AdamW(params(), lr=1e-3, fused=True),
        "lion (loop)": danlu.Lion(params(), lr=1e-4, weight_decay=0.1),
        "lion (fused=True)": danlu.Lion(params(), lr=1e-4, weight_decay=0.1, fused=True),
        "lion (bf16 state)": danlu.Lion(params(), lr=1e-4, weight_decay=0.1, state_dtype=torch.bfloat16),
    }
    fe_params, fe_m = [p.clone() for p in base], [torch.zeros_like(p) for p in base]
    steps = {name: opt.step for name, opt in opts.items()}
    steps["lion (foreach)"] = lambda: foreach_lion_(fe_params, grads, fe_m)
    times = {name: [] for name in steps}
    with torch.no_grad():
        for r in range(8):
            for name, step in steps.items():
                t0 = time.perf_counter()
                step()
                if r >= 2:
                    times[name].append(time.perf_counter() - t0)
    ref = statistics.median(times["torch-adamw-fused"])
    for name, ts in times.items():
        print(f"{name:<20} {1e3 * statistics.median(ts):8.1f} ms  {statistics.median(ts) / ref:5.2f}× fused AdamW")


if __name__ == "__main__":
    main()
