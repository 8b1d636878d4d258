"""The per-tensor kernels are compile-clean: dynamo traces each whole step into one graph.

``fullgraph=True`` fails on a graph break, which is what an ``.item()`` or a Python branch on a tensor
value causes. The "eager" backend checks tracing without paying for code generation; the traced step
must equal the eager step bit for bit (in float64, where no scalar is rounded to the
parameter dtype differently by the two paths).
"""

import copy

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
]


def eager_and_traced(make, params, gen, steps=3):
    """Two optimizers ``make(copies of params)``, one with its ``_update`` traced by dynamo
    (``fullgraph=True``, eager backend); both take ``steps`` steps on the same float64 gradients drawn
    from ``gen``. Returns their parameters (eager, traced)."""
    torch._dynamo.reset()
    eager = make([p.clone() for p in params])
    traced = make([p.clone() for p in params])
    traced._update = torch.compile(traced._update, backend="eager", fullgraph=True)
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
