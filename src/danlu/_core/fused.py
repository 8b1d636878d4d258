"""The fused path: one compiled function per bucket of tensors, generated from the per-tensor kernel.

``fused=True`` on an optimizer that opts in (class attribute ``_step_scalars``) makes its step, for
each param group, group the tensors that have a gradient into *buckets* (same device, dtype and
state dtypes) and run, per bucket, one ``torch.compile``-d function that applies the optimizer's own
per-tensor kernel (``_update``) to every tensor of the bucket. Inductor fuses each tensor's
elementwise chain into a single pass over memory (the C++ backend on CPU, Triton on CUDA), so the
step moves the bytes the math needs and nothing more; the math itself is written once, in the kernel.

Every hyperparameter a scheduler may change between steps (the names in ``_step_scalars``: ``lr``,
``betas``, ``momentum``, ``weight_decay``, ...) enters the compiled function as a 0-d tensor that
the driver keeps and ``fill_``s from the group before each step, so a scheduler, also one that
writes Python floats (ReduceLROnPlateau, OneCycleLR's momentum), never recompiles. The kernels take
these as Python numbers (the per-tensor path) or 0-d tensors (this one) alike; they match to
rounding (float64 tests).

A kernel that computes scalars from its step counter (bias corrections, Adafactor's β̂_t and relative
step, Amos's decays: the optimizer's ``_derive``) gets a second, small compiled function per bucket
that increments the bucket's counters and computes those scalars; its outputs are passed to the
single pass, which then reads them. In one graph, inductor would inline the scalar math into the
element loop and redo it (float64 ``pow``, ``sqrt``) for every vector of elements: that doubled
AdamW's step on CPU.

Those scalars are computed batched: the tensors of a bucket whose scalars depend on nothing but
their counters and the group (``_derive_batch_key``; Amos's η̃ splits them by fan-in) get one call of
``_derive`` on their counters stacked into 1-D tensors, written back after; each tensor's entries are
taken out inside the element graph (views made there cost nothing at run time). Per tensor, the
scalars graph grew with the bucket. bfloat16 state adds its rounding key (``_derive_stored``) to them.

What inductor does that this driver works around (torch 2.13, CPU), each found by a test or a
measurement:

- it elides a float32 → bfloat16 → float32 round trip inside a loop (keeps the float32 value), so
  every bucket compiles with ``emulate_precision_casts`` (the per-tensor kernels' numerics, and the
  stochastic rounding's neighbour arithmetic, need the rounding);
- it treats the Python floats of the group (eps, ...) as symbolic and then retraces the whole bucket
  once it cannot keep them symbolic, so buckets trace with ``specialize_float`` (they are constants;
  the values a scheduler changes are 0-d tensors already);
- its per-input size asserts repeat dynamo's guards for every tensor on every step (off);
- a bucket compiled after another one of the same optimizer gets automatic dynamic shapes (the
  tensors were seen before with other shapes), and with them inductor's CPU outer-loop fusion fails
  on a per-row reduction broadcast back over its rows (Tiger's ``lr_scale="row_rms"``: ``KeyError:
  'buf…'`` in ``try_outer_loop_fusion_with_local_buf``), so buckets compile with ``dynamic=False``
  (a bucket's shapes never change: a different set of tensors is another bucket);
- integer bit casts run one element at a time and signed overflow is undefined in the generated C++
  (see ``danlu._core.rounding``); ``g·0`` folds to 0 (see ``numerics.propagate_nonfinite_``).

Each bucket gets a function with a code object of its own, so dynamo's per-code cache holds one
entry per bucket and buckets never evict each other. Where compilation fails (no compiler, an
unsupported platform) the per-tensor path runs instead, with one warning; inside an outer
``torch.compile`` the per-tensor path runs and is compiled by it.
"""

from __future__ import annotations

import contextlib
import types
import warnings
from typing import Any, Callable, cast

import torch

__all__ = ["FusedSteps"]

# Inductor elides a float32 → bfloat16 → float32 round trip inside a fused loop (it keeps the float32
# value); the per-tensor kernels' numerics, and the stochastic rounding's neighbour arithmetic, need it
# kept. Where the option exists (it does in the torch releases danlu supports from 2.5 on, checked
# here), every bucket is compiled with it; it changes nothing for float32/float64 buckets.
# ``size_asserts`` off: dynamo's guards already check every input's sizes and strides before a graph
# runs; inductor's own asserts repeated that for every tensor of the bucket, on every step.
_ELEMENT_OPTIONS: dict[str, Any] = {"size_asserts": False}
try:
    import torch._inductor.config as _inductor_config

    if hasattr(_inductor_config, "emulate_precision_casts"):
        _ELEMENT_OPTIONS["emulate_precision_casts"] = True
except Exception:  # pragma: no cover - no inductor: compilation fails later and the per-tensor path runs
    pass


def _apply_kernel(update: Callable[..., None], params: list[torch.Tensor], grads: list[torch.Tensor],
                  states: list[dict[str, Any]], group: dict[str, Any], derived: list[Any] | None) -> None:
    """``update`` on every tensor; ``derived`` is :func:`_derive_all`'s batched scalars or None."""
    per = _split_derived(derived, len(params))
    for i, (p, g, st) in enumerate(zip(params, grads, states)):
        update(p, g, st, group, per[i])


def _split_derived(derived: list[Any] | None, n: int) -> list[dict[str, Any] | None]:
    """Each tensor's scalars from the batches ``[(indices, outputs), ...]``: 1-D outputs are indexed,
    others (0-d, numbers) shared. Inside the element graph, so the views cost nothing at run time."""
    per: list[dict[str, Any] | None] = [None] * n
    for idx, outputs in derived or ():
        for j, i in enumerate(idx):
            per[i] = {k: (v[j] if isinstance(v, torch.Tensor) and v.dim() == 1 else v) for k, v in outputs.items()}
    return per


def _derive_all(derive: Callable[..., dict[str, Any]], key: Callable[..., Any], params: list[torch.Tensor],
                states: list[dict[str, Any]], group: dict[str, Any]) -> list[tuple[list[int], dict[str, Any]]]:
    """Every tensor's scalars of one step, batched: the tensors whose ``key(p, group)`` agree (the
    per-tensor constants the scalars depend on, e.g. Amos's η̃) get one call of ``derive`` on their
    0-d state entries stacked into 1-D tensors, which are then written back (``derive`` increments
    counters). Returns ``[(indices, outputs), ...]`` (see :func:`_split_derived`). One batched call
    keeps the scalars graph small: per tensor it would be as large as the bucket."""
    out: list[tuple[list[int], dict[str, Any]]] = []
    batches: dict[Any, list[int]] = {}
    for i, p in enumerate(params):
        batches.setdefault(key(p, group), []).append(i)
    for idx in batches.values():
        first = states[idx[0]]
        names = [k for k, v in first.items() if isinstance(v, torch.Tensor) and v.dim() == 0]
        stacked = {k: torch.stack([states[i][k] for i in idx]) for k in names}
        view = {**first, **stacked}
        outputs = derive(params[idx[0]], view, group)
        for k in names:
            new = view[k]
            for j, i in enumerate(idx):
                states[i][k].copy_(new[j])
        out.append((idx, outputs))
    return out


def _trace_config() -> Any:
    """Dynamo's settings for tracing a bucket: Python floats of the group that are not step scalars
    (eps, ...) are constants of the graph. Unspecialised, each became a symbolic float that the
    tensorify pass then gave up on, and dynamo traced the whole bucket a second time (≈13 s of a
    30M-parameter compile)."""
    import torch._dynamo.config as dynamo_config  # noqa: PLC0415

    if hasattr(dynamo_config, "specialize_float"):
        return dynamo_config.patch(specialize_float=True)
    return contextlib.nullcontext()


def _fresh_function(name: str, template: Callable[..., Any] = _apply_kernel) -> Callable[..., Any]:
    """A copy of ``template`` with its own code object (dynamo caches per code object)."""
    fn = cast(types.FunctionType, template)  # a plain ``def`` function of this module
    code = fn.__code__.replace(co_name=name)
    return type(fn)(code, fn.__globals__, name)


def _scalar_like(value: Any, device: torch.device) -> Any:
    """A 0-d float64 tensor holding ``value`` (a tuple of them for a tuple), or None for None."""
    if value is None:
        return None
    if isinstance(value, (tuple, list)):
        return tuple(_scalar_like(v, device) for v in value)
    return torch.tensor(float(value), dtype=torch.float64, device=device)


def _fill(slot: Any, value: Any) -> None:
    if isinstance(slot, tuple):
        for s, v in zip(slot, value):
            _fill(s, v)
    elif slot is not None:
        slot.fill_(float(value))


def _kind(value: Any) -> Any:
    """What a scalar slot must look like for ``value``: None, a number, or a tuple of those."""
    if value is None:
        return None
    if isinstance(value, (tuple, list)):
        return tuple(_kind(v) for v in value)
    return float


class FusedSteps:
    """The compiled bucket functions and the 0-d scalar tensors of one optimizer."""

    def __init__(self) -> None:
        self._functions: dict[Any, Callable[..., None]] = {}
        self._derive_functions: dict[Any, Callable[..., list[dict[str, Any]]]] = {}
        self._scalars: dict[Any, Any] = {}
        self.disabled: str | None = None  # why the per-tensor path runs instead, once warned

    def __getstate__(self) -> dict[str, Any]:
        return {}  # compiled functions are rebuilt on demand (deepcopy, pickle)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]

    def _group_view(self, gi: int, group: dict[str, Any], names: tuple[str, ...], device: torch.device) -> dict:
        """``group`` with each of ``names`` replaced by the driver's 0-d tensor, filled from the group."""
        view = dict(group)
        for name in names:
            value = group[name]
            if isinstance(value, torch.Tensor):
                continue  # a tensor lr is the user's own 0-d tensor already
            key = (gi, name, device, _kind(value))
            slot = self._scalars.get(key)
            if slot is None:
                slot = self._scalars[key] = _scalar_like(value, device)
            else:
                _fill(slot, value)
            view[name] = slot
        return view

    def run(self, optimizer: Any,
            work: list[tuple[torch.Tensor, torch.Tensor, dict[str, Any], dict[str, Any]]]) -> None:
        """Step ``work`` ((parameter, gradient, group, state): state initialised, none empty; for an FSDP2
        parameter its local shards)
        bucket by bucket: compiled where it can be, the per-tensor kernel where it cannot."""
        compiling = torch.compiler.is_compiling()  # an outer torch.compile traces the per-tensor path
        index = {id(g): i for i, g in enumerate(optimizer.param_groups)}
        buckets: dict[Any, tuple[list[torch.Tensor], list[torch.Tensor], list[dict[str, Any]]]] = {}
        tensor = torch.Tensor
        for p, grad, group, state in work:
            dtypes = tuple([(k, v.dtype) for k, v in state.items() if isinstance(v, tensor)])
            bucket = buckets.get(key := (index[id(group)], p.device, p.dtype, dtypes))
            if bucket is None:
                bucket = buckets[key] = ([], [], [])
            bucket[0].append(p)
            bucket[1].append(grad)
            bucket[2].append(state)
        names = tuple(optimizer._step_scalars)
        views: dict[Any, dict[str, Any]] = {}  # one filled view per (group, device), shared by its buckets
        for key, (params, grads, states) in buckets.items():
            group = optimizer.param_groups[key[0]]
            derived = None
            has_scalars = optimizer._derive is not None or group.get("state_dtype") == torch.bfloat16
            derive = optimizer._derive_stored if has_scalars else None
            if self.disabled is None and not compiling:
                fn = self._functions.get(key)
                if fn is None:
                    fn = self._functions[key] = torch.compile(
                        _fresh_function(f"danlu_bucket_{len(self._functions)}"), fullgraph=True, dynamic=False,
                        options=_ELEMENT_OPTIONS)
                view = views.get(key[:2])
                if view is None:
                    view = views[key[:2]] = self._group_view(key[0], group, names, key[1])
                try:
                    with _trace_config():
                        if derive is not None:
                            dfn = self._derive_functions.get(key)
                            if dfn is None:
                                dfn = self._derive_functions[key] = torch.compile(
                                    _fresh_function(f"danlu_scalars_{len(self._derive_functions)}", _derive_all),
                                    fullgraph=True, dynamic=False, options=_ELEMENT_OPTIONS)
                            derived = dfn(derive, optimizer._derive_batch_key, params, states, view)
                        fn(optimizer._update_stored, params, grads, states, view, derived)
                    continue
                except Exception as err:
                    # A failed compilation raises before its graph runs; anything else is real.
                    if not type(err).__module__.startswith(("torch._dynamo", "torch._inductor")):
                        raise
                    self._disable(optimizer, f"torch.compile failed ({type(err).__name__}: {err})")
            # The per-tensor path; if the scalars' graph already ran (the counters moved), with its scalars.
            _apply_kernel(optimizer._update_stored, params, grads, states, group, derived)

    def _disable(self, optimizer: Any, why: str) -> None:
        self.disabled = why
        warnings.warn(f"{type(optimizer).__name__}(fused=True): {why}; using the per-tensor path", RuntimeWarning,
                      stacklevel=4)
