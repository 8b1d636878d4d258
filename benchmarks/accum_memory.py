"""Peak memory of gradient accumulation: in .grad, inside the momentum, and folded in during backward.

Each mode runs in its own process on a stack of Linear layers (default 12 × 2048², 50.4M parameters,
fp32) with AdamW, k micro-batches per update, and reports the process's peak resident memory
(ru_maxrss) minus the resident memory right after ``import torch``:

* ``torch-grad``: torch.optim.AdamW, micro-batch gradients summed in ``.grad``, one step per window
  (params + grads + 2 × state).
* ``danlu-momentum``: danlu.AdamW(accum_steps=k), ``step()`` after every micro-batch
  (params + grads + 2 × state, no accumulation buffer beyond ``.grad``).
* ``danlu-fused``: the same with ``fuse_into_backward()``: each gradient is folded into the state as
  soon as backward produces it and freed (params + 2 × state + one gradient).

Run: ``python benchmarks/accum_memory.py [--layers 12 --width 2048 --k 4]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(mode: str, layers: int, width: int, k: int, windows: int) -> dict:
    import torch

    base = _rss_mib()
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    n_params = sum(p.numel() for p in model.parameters())
    if mode == "torch-grad":
        import torch.optim

        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    else:
        import danlu

        opt = danlu.AdamW(model.parameters(), lr=1e-4, accum_steps=k)
        if mode == "danlu-fused":
            opt.fuse_into_backward()
    x = torch.randn(4, width)
    for _ in range(windows):
        for i in range(k):
            model(x).pow(2).mean().backward()
            if mode != "torch-grad":
                opt.step()
        if mode == "torch-grad":
            opt.step()
        opt.zero_grad(set_to_none=True)
    return {"mode": mode, "params": n_params, "peak_mib": round(_rss_mib() - base, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.layers, args.width, args.k, args.windows)))
        return
    rows = []
    for mode in ("torch-grad", "danlu-momentum", "danlu-fused"):
        out = subprocess.run(
            [sys.executable, __file__, "--child", mode, "--layers", str(args.layers), "--width", str(args.width),
             "--k", str(args.k), "--windows", str(args.windows)],
            check=True, capture_output=True, text=True,
        ).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    mib_params = rows[0]["params"] * 4 / 2**20
    print(f"{rows[0]['params'] / 1e6:.1f}M fp32 parameters ({mib_params:.0f} MiB), AdamW, k={args.k}")
    print(f"{'mode':<16}{'peak MiB':>10}{'× params':>10}")
    for r in rows:
        print(f"{r['mode']:<16}{r['peak_mib']:>10.0f}{r['peak_mib'] / mib_params:>10.2f}")
    saved = rows[1]["peak_mib"] - rows[2]["peak_mib"]
    print(f"fuse_into_backward saves {saved:.0f} MiB ({saved / mib_params:.2f} × params) against danlu-momentum")


if __name__ == "__main__":
    main()
