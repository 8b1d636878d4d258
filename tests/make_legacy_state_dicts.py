"""Writes tests/data/danlu-0.1-state-dicts.pt: state dicts saved by danlu 0.1 (commit c5a07cf), with the
trajectory that followed, for tests/test_torch_contract.py::test_danlu_0_1_state_dicts_load_and_continue.

Run it with danlu 0.1 on the path (``git worktree add /tmp/orig c5a07cf``;
``PYTHONPATH=/tmp/orig/src python tests/make_legacy_state_dicts.py``). Kept for the record: the file it
writes is what the test reads.
"""

import copy
from pathlib import Path

import torch

import danlu

SHAPES = [(4, 3), (3,)]


def loss_fn(ps):
    return sum(((p - 0.3) ** 2).sum() + 0.1 * (p**4).sum() for p in ps)


CONFIGS = {
    "AdamW-accum3": lambda ps: danlu.AdamW(ps, lr=1e-2, accum_steps=3),
    "Tiger-accum2": lambda ps: danlu.Tiger(ps, lr=1e-2, accum_steps=2, weight_decay=0.1),
    "AdaX": lambda ps: danlu.AdaX(ps, lr=1e-2),
    "Adafactor-relative": lambda ps: danlu.Adafactor(ps, lr=None, min_dim_size_to_factor=2, beta1=0.9),
    "Adafactor-absolute": lambda ps: danlu.Adafactor(ps, lr=2e-2),
    "Amos": lambda ps: danlu.Amos(ps, lr=0.1, momentum=0.9),
    "EGStepSize-paper-group": lambda ps: danlu.EGStepSize(danlu.SGDM(ps, lr=0.1), meta_lr=0.1, form="paper",
                                                          granularity="group"),
    "EGStepSize-su": lambda ps: danlu.EGStepSize(danlu.AdamW(ps, lr=1e-2, accum_steps=2), meta_lr=0.1),
    "GradientPenalty": lambda ps: danlu.GradientPenalty(danlu.AdamW(ps, lr=1e-2), strength=1e-2),
    "MGS": lambda ps: danlu.MGS(None, danlu.SGDM(ps, lr=0.1), candidates=3, noise=0.1, seed=3),
}
CLOSURE = {"GradientPenalty", "MGS"}


def step(name, opt, ps):
    def closure():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(ps)
        loss.backward()
        return loss

    if name == "MGS":
        opt.step(closure, lambda: float(loss_fn(ps)))
    elif name in CLOSURE:
        opt.step(closure)
    else:
        closure()
        opt.step()


def main():
    out = {}
    for name, make in CONFIGS.items():
        g = torch.Generator().manual_seed(0)
        ps = [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in SHAPES]
        opt = make(ps)
        for _ in range(5):  # mid-window for accum 3 and 2
            step(name, opt, ps)
        saved = {"params": [p.detach().clone() for p in ps], "state_dict": copy.deepcopy(opt.state_dict())}
        for _ in range(4):
            step(name, opt, ps)
        saved["final"] = [p.detach().clone() for p in ps]
        out[name] = saved
    path = Path(__file__).parent / "data" / "danlu-0.1-state-dicts.pt"
    torch.save(out, path)
    print(path, path.stat().st_size)


if __name__ == "__main__":
    main()
