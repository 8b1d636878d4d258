"""``torch.compile`` gives the eager answer, with the real backends.

Two checks:

* the per-tensor kernels are compile-clean: dynamo traces each whole ``_update`` into one graph
  (``fullgraph=True`` fails on a graph break, which an ``.item()`` or a Python branch on a tensor value
  causes), and the aot_eager backend (AOTAutograd's functionalization, what inductor builds on) must
  give the eager step bit for bit in float64;
* ``torch.compile(opt.step)``, as users write it, with aot_eager and inductor on every optimizer that
  keeps an update counter (bias corrections, β̂_t, relative steps): the counter counts and the
  parameters match eager. The backend ``"eager"`` cannot catch the failure this guards against: an
  in-place add on a 0-d float64 CPU counter is dropped by AOTAutograd, so the step stayed at t = 1.
"""

import pytest
import torch

import danlu

CASES = [
    ("lion", danlu.Lion, dict(lr=1e-2, weight_decay=0.1)),
    ("tiger", danlu.Tiger, dict(lr=1e-2, weight_decay=0.1)),
    ("adax", danlu.AdaX, dict(lr=1e-2, weight_decay=0.1)),
    ("adafactor", danlu.Adafactor, dict(weight_decay=0.1, min_dim_size_to_factor=4)),
    ("adafactor-lr-momentum", danlu.Adafactor, dict(lr=1e-2, beta1=0.9, min_dim_size_to_factor=4)),
    ("amos", danlu.Amos, dict(lr=0.1, momentum=0.9, clip_value=1.0, extra_l2=0.01)),
    ("adamw", danlu.AdamW, dict(lr=1e-2)),
    ("sgdm", danlu.SGDM, dict(lr=1e-2, weight_decay=0.1)),
]


def eager_and_traced(make, params, gen, steps=3):
    """Two optimizers ``make(copies of params)``, one with its ``_update`` compiled (``fullgraph=True``,
    aot_eager backend); both take ``steps`` steps on the same float64 gradients drawn from ``gen``.
    Returns their parameters (eager, traced)."""
    torch._dynamo.reset()
    eager = make([p.clone() for p in params])
    traced = make([p.clone() for p in params])
    traced._update = torch.compile(traced._update, backend="aot_eager", fullgraph=True)
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
        for opt in (eager, traced):
            for p, g in zip(opt.param_groups[0]["params"], grads):
                p.grad = g.clone()
            opt.step()
    return eager.param_groups[0]["params"], traced.param_groups[0]["params"]


@pytest.mark.parametrize("name,cls,kwargs", CASES, ids=[c[0] for c in CASES])
def test_kernel_traces_without_graph_breaks(name, cls, kwargs):
    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 5), (5,), (3, 4, 5), (5, 4, 4)]
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    eager, traced = eager_and_traced(lambda ps: cls(ps, **kwargs), params, gen)
    for a, b in zip(eager, traced):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


# Every optimizer with an update counter in its state, and a wrapper over one.
COUNTED = {
    "adamw": lambda ps: danlu.AdamW(ps, lr=1e-2),
    "adax": lambda ps: danlu.AdaX(ps, lr=1e-2),
    "adafactor": lambda ps: danlu.Adafactor(ps, min_dim_size_to_factor=4, beta1=0.9),
    "amos": lambda ps: danlu.Amos(ps, lr=0.1, momentum=0.9),
    "egs-adamw": lambda ps: danlu.EGStepSize(danlu.AdamW(ps, lr=1e-2), meta_lr=0.1),
    "adamw-accum": lambda ps: danlu.AdamW(ps, lr=1e-2, accum_steps=2),
}


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("name", list(COUNTED))
def test_compiled_step_counts_and_matches_eager(name, backend):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 5), (5,), (3, 4, 5)]
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    eager_p, comp_p = [p.clone() for p in params], [p.clone() for p in params]
    eager, comp = COUNTED[name](eager_p), COUNTED[name](comp_p)
    compiled_step = torch.compile(comp.step, backend=backend)
    steps = 4
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
        for ps, step in ((eager_p, eager.step), (comp_p, compiled_step)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            step()
    updates = steps // getattr(getattr(comp, "optimizer", comp), "accum_steps", 1)
    for p, q in zip(eager_p, comp_p):
        assert float(comp.state[q]["step"]) == float(eager.state[p]["step"]) == updates
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("lr", [1e-2, "tensor"], ids=["float-lr", "tensor-lr"])
def test_scheduled_lr_does_not_recompile(lr):
    """A scheduler changing the lr every step must not recompile the compiled step: one graph for the
    first step (which creates the state), one for every later step."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = danlu.AdamW(model.parameters(), lr=torch.tensor(1e-2) if lr == "tensor" else lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 / (t + 1))
    step = torch.compile(opt.step, backend="aot_eager")
    for _ in range(6):
        model(torch.randn(2, 8)).sum().backward()
        step()
        opt.zero_grad()
        sched.step()
    assert counters["stats"]["unique_graphs"] == 2
