"""Sharded parameters: danlu's kernels on FSDP2's local shards, with explicit collectives.

DDP needs nothing from an optimizer but determinism: every rank holds the whole parameter and the
same all-reduced gradient, and danlu's kernels are deterministic, so the replicas stay equal.

FSDP2 (``torch.distributed.fsdp.fully_shard``) hands the optimizer DTensor parameters and gradients
sharded on dim 0 over a 1-D device mesh (``torch.chunk``'s split: uneven when the dim does not divide
by the world size, empty on the ranks past the last row). danlu does not step them through DTensor's
dispatch of every op (its Partial placements have given silently wrong answers in several torch
releases, and the compiled fused path cannot trace them). Instead the optimizer's step, for each such
parameter:

* takes the local shards (``to_local()``) of the parameter, its gradient and its state, and runs the
  same per-tensor kernel as one process on them (or the fused path, for a kernel that reduces nothing
  across the sharded dim), under a :class:`Shard` context;
* the kernel's few reductions go through :func:`sum_over`, :func:`mean_over`, :func:`amax_over` and
  :func:`rms`: with no context (one process, DDP) they are exactly the plain torch ops; inside a
  context, a reduction over the sharded dim of a tensor *aligned* with the parameter (its dim 0 is the
  parameter's dim 0, not yet reduced) sums the local part and then all-reduces it over the mesh's
  process group, on a plain tensor; means divide by the global count;
* shape-dependent choices read :func:`global_shape` (Adafactor's factored dims);
* state tensors are DTensors on the parameter's mesh, placed like what they describe (:func:`place_state`):
  an entry shaped like the parameter is sharded with it, a statistic that keeps dim 0 is sharded on
  its dim 0, one reduced over dim 0 (Adafactor's statistic over rows, Amos's scalar ``v`` of a bias)
  is replicated; 0-d entries (``step``) stay plain tensors, as torch.optim's. So
  ``torch.distributed.checkpoint`` saves and reshards the state like the parameters.

A rank whose shard is empty still runs the kernel on its empty tensors, so it joins every collective.
The collectives are bucketed (:func:`run_bucketed`): the kernels of one step run side by side, each up
to its next collective, and the k-th collective of every kernel is one all-reduce of their
concatenation. A factored Adafactor step thus costs three to four all-reduces per step in all (the
statistic over rows, the row-mean normaliser, RMS(U), RMS(θ)), not per sharded matrix; their size is
the sum of the statistics'. Every rank runs the same kernels with the same sequence of collectives
(their shapes are global), so the rounds match across ranks.

Layouts other than dim-0 sharding or replication on a 1-D mesh (tensor parallel's Shard(1), Partial
gradients, 2-D meshes) raise ``ValueError`` on every rank before anything moves.
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Sequence, cast

import torch

from .numerics import acc_dtype
from .numerics import rms as _plain_rms

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor import Shard as DShard
    from typing_extensions import TypeIs

__all__ = ["Shard", "layout_of", "is_dtensor", "check_layouts", "local_state", "store_local_state", "place_state",
           "on_shard", "current", "global_shape", "sum_over", "mean_over", "amax_over", "rms", "check_sync",
           "loss_group", "check_same_seeds", "average_values", "all_zero", "all_reduce_flat_",
           "shard_sum", "run_bucketed", "per_rank_shape", "check_shard_statistics", "check_regathered",
           "sum_partials"]

_tls = threading.local()
_DTensor: Any = None


def _dtensor_type() -> Any:
    """``torch.distributed.tensor.DTensor``, imported once (None where torch.distributed is unavailable)."""
    global _DTensor
    if _DTensor is None:
        try:
            from torch.distributed.tensor import DTensor  # noqa: PLC0415
        except Exception:  # pragma: no cover - builds without torch.distributed
            _DTensor = False
        else:
            _DTensor = DTensor
    return _DTensor or None


def is_dtensor(t: Any) -> TypeIs[DTensor]:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (cheap: no import for plain tensors)."""
    if type(t) is torch.Tensor or type(t) is torch.nn.Parameter:
        return False
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


class Shard:
    """The local view of one DTensor parameter: its mesh and process group, whether dim 0 is sharded
    over more than one rank, its global shape, and its local shard (``local``, a plain tensor that
    shares the parameter's storage)."""

    __slots__ = ("mesh", "placements", "group", "sharded", "global_shape", "local", "row_offset", "local_stats")

    def __init__(self, param: Any, local_stats: bool = False) -> None:
        # shard_statistics="local": reductions over the sharded dim stay on the shard (no communication);
        # statistics reduced over dim 0 are then one per rank (placed Shard(0) over ranks, see place_state).
        self.local_stats = local_stats
        self.mesh = param.device_mesh
        self.placements = tuple(param.placements)
        self.sharded = self.placements[0].is_shard() and self.mesh.size() > 1
        self.group = self.mesh.get_group() if self.sharded else None
        self.global_shape = torch.Size(param.shape)
        self.local = param.to_local()
        self.row_offset = 0
        if self.sharded:
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset  # noqa: PLC0415

            _, offset = compute_local_shape_and_global_offset(self.global_shape, self.mesh, self.placements)
            self.row_offset = int(offset[0]) if len(offset) else 0

    def element_offset(self) -> int:
        """The flat (row-major) offset of the local shard's first element in the global parameter."""
        return self.row_offset * math.prod(self.global_shape[1:]) if self.sharded else 0


def _describe(placements: Sequence[Any]) -> str:
    return "(" + ", ".join(str(pl) for pl in placements) + ")"


def layout_of(p: torch.Tensor, what: str = "parameter", group: dict[str, Any] | None = None) -> Shard | None:
    """``None`` for a plain tensor; a :class:`Shard` for a DTensor on a 1-D mesh placed ``Shard(0)`` or
    ``Replicate()``; ``ValueError`` for any other layout (tensor parallel, 2-D meshes, Partial)."""
    if not is_dtensor(p):
        return None
    mesh, placements = p.device_mesh, tuple(p.placements)
    if mesh.ndim != 1:
        raise ValueError(
            f"danlu optimizers support DTensor {what}s on a 1-D device mesh (FSDP2's fully_shard); got a "
            f"{mesh.ndim}-D mesh with placements {_describe(placements)} (HSDP, 2-D or tensor-parallel layouts "
            "are not supported)")
    pl = placements[0]
    sd = cast("DShard", pl).dim if pl.is_shard() else None  # a Shard's dim (the stubs say Placement)
    ok = pl.is_replicate() or (sd is not None and (sd == 0 or (p.dim() and sd == -p.dim())))
    if not ok:
        raise ValueError(
            f"danlu optimizers support DTensor {what}s sharded on dim 0 (FSDP2) or replicated; got placements "
            f"{_describe(placements)} of a {what} of shape {tuple(p.shape)} (tensor parallel layouts are not "
            "supported: their statistics would be computed per shard)")
    return Shard(p, local_stats=group is not None and group.get("shard_statistics") == "local")


def check_layouts(name: str, work: Sequence[tuple[torch.Tensor, Any]]) -> None:
    """Refuse, before anything moves, a DTensor parameter whose layout or gradient layout is unsupported
    (every rank raises: all ranks hold the same layouts)."""
    for p, _ in work:
        if not is_dtensor(p):
            if is_dtensor(p.grad):
                raise ValueError(f"{name}: a plain parameter has a DTensor gradient")
            continue
        try:
            layout_of(p)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
        g = p.grad
        if not is_dtensor(g) or g.device_mesh != p.device_mesh or tuple(g.placements) != tuple(p.placements):
            got = _describe(g.placements) if is_dtensor(g) else type(g).__name__
            raise ValueError(
                f"{name}: the gradient of a DTensor parameter with placements {_describe(p.placements)} must be a "
                f"DTensor placed the same (got {got}; a Partial gradient must be reduced before the step)")


# --- state ----------------------------------------------------------------------------------------------
def local_state(state: dict[str, Any]) -> dict[str, Any]:
    """A dict of the local shards of ``state``'s DTensor entries (sharing storage) and its other entries."""
    return {k: (v.to_local() if is_dtensor(v) else v) for k, v in state.items()}


def store_local_state(optimizer: Any, shard: Shard, group: dict[str, Any], state: dict[str, Any],
                      local: dict[str, Any]) -> None:
    """Write back into ``state`` what a kernel put into ``local`` (entries it made or replaced), as DTensors
    placed by :func:`place_state`'s rule; entries updated in place already are the DTensors' storage."""
    for k, v in local.items():
        old = state.get(k)
        if old is v or (is_dtensor(old) and old.to_local() is v):
            continue
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            state[k] = _from_local(optimizer, shard, group, k, v)
        else:
            state[k] = v


def _from_local(optimizer: Any, shard: Shard, group: dict[str, Any], key: str, local: torch.Tensor) -> Any:
    from torch.distributed.tensor import DTensor, Replicate  # noqa: PLC0415
    from torch.distributed.tensor import Shard as DShard  # noqa: PLC0415

    if not shard.sharded:
        return DTensor.from_local(local, shard.mesh, shard.placements, run_check=False)
    placed = _placement(optimizer, key, shard, group)
    if placed in ("shard", "per_rank"):  # keeps the parameter's dim 0, or one row per rank
        rows = shard.global_shape[0] if placed == "shard" else shard.mesh.size()
        shape = torch.Size((rows, *local.shape[1:]))
        return DTensor.from_local(local, shard.mesh, (DShard(0),), run_check=False, shape=shape,
                                  stride=_contiguous_strides(shape))
    return DTensor.from_local(local, shard.mesh, (Replicate(),), run_check=False)


def _contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(strides))


def _placement(optimizer: Any, key: str, shard: Shard, group: dict[str, Any]) -> str:
    out = optimizer._state_placement(key, shard.global_shape, group)
    if out not in ("shard", "replicate"):
        raise ValueError(f"{type(optimizer).__name__}._state_placement({key!r}) returned {out!r}")
    # A statistic reduced over dim 0 is the same on every rank, unless each rank reduced its own rows.
    return "per_rank" if out == "replicate" and shard.local_stats else out


def per_rank_shape(optimizer: Any, key: str, p: Any, group: dict[str, Any], shape: torch.Size) -> torch.Size:
    """The global shape of state entry ``key`` (of ``shape`` in one process) for a DTensor ``p``: with
    ``shard_statistics="local"`` a statistic reduced over the sharded dim has one row per rank."""
    shard = layout_of(p, group=group)
    if shard is None or not shard.sharded or not shard.local_stats or not len(shape):
        return shape
    if _placement(optimizer, key, shard, group) != "per_rank":
        return shape
    return torch.Size((shard.mesh.size(), *shape[1:]))


def place_state(optimizer: Any, shard: Shard, group: dict[str, Any], state: dict[str, Any]) -> None:
    """Place fresh state (made by ``_init_state`` from the DTensor parameter) like what it describes: entries
    shaped like the parameter keep its placement; statistics are sharded on dim 0 or replicated as the
    optimizer's ``_state_placement`` says; 0-d entries become plain tensors."""
    from torch.distributed.tensor import DTensor, Replicate  # noqa: PLC0415
    from torch.distributed.tensor import Shard as DShard  # noqa: PLC0415
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset  # noqa: PLC0415

    for k, v in list(state.items()):
        if not isinstance(v, torch.Tensor):
            continue
        if v.dim() == 0:
            if is_dtensor(v):
                state[k] = v.full_tensor()
            continue
        placed = _placement(optimizer, k, shard, group) if shard.sharded else "shard"
        if (placed == "shard" and is_dtensor(v) and v.shape == shard.global_shape
                and tuple(v.placements) == shard.placements):
            continue  # shaped and placed like the parameter already (a statistic of a one-row parameter may
            # have its shape and still be reduced over dim 0: the optimizer's placement decides)
        full = v.full_tensor() if is_dtensor(v) else v
        if not shard.sharded:
            state[k] = DTensor.from_local(full, shard.mesh, shard.placements, run_check=False)
            continue
        if placed == "per_rank":  # this rank's own statistic over its rows (shard_statistics="local")
            state[k] = _from_local(optimizer, shard, group, k, full.clone())
        elif placed == "shard":
            local_shape, offset = compute_local_shape_and_global_offset(full.shape, shard.mesh, (DShard(0),))
            local = full.narrow(0, int(offset[0]), int(local_shape[0])).clone()
            state[k] = DTensor.from_local(local, shard.mesh, (DShard(0),), run_check=False, shape=full.shape,
                                          stride=_contiguous_strides(full.shape))
        else:
            state[k] = DTensor.from_local(full.clone(), shard.mesh, (Replicate(),), run_check=False)


# --- the kernels' view ----------------------------------------------------------------------------------
_active = 0  # shard contexts open in any thread: while 0 (one process, DDP) the helpers are the plain ops


@contextmanager
def on_shard(shard: Shard | None) -> Iterator[None]:
    """Run a kernel on ``shard``'s local tensors: reductions and :func:`global_shape` see the shard."""
    global _active
    prev = getattr(_tls, "shard", None)
    _tls.shard = shard
    with _active_lock:
        _active += 1
    try:
        yield
    finally:
        _tls.shard = prev
        with _active_lock:
            _active -= 1


_active_lock = threading.Lock()


def current() -> Shard | None:
    """The shard a kernel runs on (None: one process, DDP, or a compiled graph)."""
    if not _active or torch.compiler.is_compiling():  # a compiled graph never reads the thread-local
        return None
    return _tls.__dict__.get("shard")


def global_shape(p: torch.Tensor) -> torch.Size:
    """The shape of the whole parameter whose local shard is ``p`` (``p.shape`` outside a shard context)."""
    sh = current()
    if sh is not None and p is sh.local:
        return sh.global_shape
    return p.shape


def _dims(x: torch.Tensor, dim: int | Sequence[int] | None) -> tuple[int, ...]:
    nd = max(x.dim(), 1)
    if dim is None:
        return tuple(range(x.dim()))
    if isinstance(dim, int):
        return (dim % nd,)
    return tuple(sorted(d % nd for d in dim))


def _crosses(x: torch.Tensor, dim: int | Sequence[int] | None, aligned: bool) -> Shard | None:
    sh = current()
    if sh is None or not sh.sharded or sh.local_stats or not aligned or x.dim() == 0:
        return None
    return sh if 0 in _dims(x, dim) else None


def _all_reduce(t: torch.Tensor, sh: Shard, op: str) -> torch.Tensor:
    bucket = getattr(_tls, "bucket", None)
    if bucket is not None:  # a kernel run by run_bucketed: joins the round's flat collective
        return bucket[0].submit(bucket[1], t, sh.group, op)
    all_reduce_flat_([t], sh.group, op)
    return t


def all_reduce_flat_(tensors: Sequence[torch.Tensor], group: Any = None, op: str = "sum") -> None:
    """All-reduce ``tensors`` (one dtype and device) in place, as one collective on their concatenation
    (``op``: ``"sum"`` or ``"max"``; ``group`` None: the default process group)."""
    import torch.distributed as dist  # noqa: PLC0415

    reduce_op = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
    if len(tensors) == 1 and tensors[0].is_contiguous():
        dist.all_reduce(tensors[0], op=reduce_op, group=group)
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=reduce_op, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


class _Rounds:
    """The coordinator of :func:`run_bucketed`: each kernel thread blocks at its next collective; once every
    unfinished kernel is blocked (or done), the pending tensors of each (group, op, dtype, device) are
    reduced in one all-reduce of their concatenation, in kernel order, and the kernels resume."""

    def __init__(self, n: int) -> None:
        self.cond = threading.Condition()
        self.pending: dict[int, tuple[torch.Tensor, Any, str]] = {}
        self.done: set[int] = set()
        self.released: set[int] = set()
        self.n = n

    def submit(self, i: int, t: torch.Tensor, group: Any, op: str) -> torch.Tensor:
        with self.cond:
            self.pending[i] = (t, group, op)
            self.cond.notify_all()
            self.cond.wait_for(lambda: i in self.released)
            self.released.discard(i)
        return t

    def finish(self, i: int) -> None:
        with self.cond:
            self.done.add(i)
            self.cond.notify_all()

    def drive(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: len(self.pending) + len(self.done) == self.n)
                if not self.pending:
                    return
                batch = sorted(self.pending.items())
                self.pending = {}
            buckets: dict[Any, list[tuple[int, torch.Tensor]]] = {}
            for i, (t, group, op) in batch:
                buckets.setdefault((id(group), op, t.dtype, t.device), []).append((i, t))
            groups = {id(g): g for _, (_, g, _) in batch}
            for (gid, op, _, _), items in buckets.items():
                all_reduce_flat_([t for _, t in items], groups[gid], op)
            with self.cond:
                self.released.update(i for i, _ in batch)
                self.cond.notify_all()


def run_bucketed(tasks: Sequence[tuple[Shard, Any]]) -> None:
    """Run ``tasks`` ((shard, fn): ``fn()`` runs one kernel on ``shard``'s local tensors), their collectives
    bucketed: the k-th collective of every kernel is reduced in one all-reduce (per dtype and op) instead of
    one each. Every rank runs the same kernels with the same sequence of collectives (their shapes are
    global), so the rounds match across ranks. Kernels run in threads; the first error is re-raised after
    all have finished."""
    if len(tasks) <= 1:
        for shard, fn in tasks:
            with on_shard(shard):
                fn()
        return
    rounds = _Rounds(len(tasks))
    errors: list[tuple[int, BaseException]] = []
    grad_enabled = torch.is_grad_enabled()

    def body(i: int, shard: Shard, fn: Any) -> None:
        _tls.bucket = (rounds, i)
        try:
            with torch.set_grad_enabled(grad_enabled), on_shard(shard):
                fn()
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append((i, err))
        finally:
            _tls.bucket = None
            rounds.finish(i)

    threads = [threading.Thread(target=body, args=(i, sh, fn), daemon=True) for i, (sh, fn) in enumerate(tasks)]
    for th in threads:
        th.start()
    try:
        rounds.drive()
    finally:
        for th in threads:
            th.join()
    if errors:
        raise min(errors, key=lambda e: e[0])[1]


def sum_over(x: torch.Tensor, dim: int | tuple[int, ...] | list[int] | None = None, *, keepdim: bool = False,
             aligned: bool = True) -> torch.Tensor:
    """``x.sum(dim, keepdim)`` (all dims for None); over the sharded dim of an aligned ``x``, of the whole
    parameter: the local sum, all-reduced."""
    out = x.sum() if dim is None and not keepdim else x.sum(dim=dim, keepdim=keepdim)
    sh = _crosses(x, dim, aligned)
    return out if sh is None else _all_reduce(out.contiguous(), sh, "sum")


def _count(x: torch.Tensor, dims: tuple[int, ...], sh: Shard | None) -> int:
    n = 1
    for d in dims:
        n *= sh.global_shape[0] if (sh is not None and d == 0) else x.shape[d]
    return n


def mean_over(x: torch.Tensor, dim: int | tuple[int, ...] | list[int] | None = None, *, keepdim: bool = False,
              aligned: bool = True) -> torch.Tensor:
    """``x.mean(dim, keepdim)``; over the sharded dim of an aligned ``x``: the global sum over the global count."""
    sh = _crosses(x, dim, aligned)
    if sh is None:
        return x.mean() if dim is None and not keepdim else x.mean(dim=dim, keepdim=keepdim)
    return sum_over(x, dim, keepdim=keepdim, aligned=aligned).div_(_count(x, _dims(x, dim), sh))


def amax_over(x: torch.Tensor, dim: int | Sequence[int], *, keepdim: bool = False,
              aligned: bool = True) -> torch.Tensor:
    """``x.amax(dim, keepdim)``; over the sharded dim of an aligned ``x``: all-reduced (an empty shard gives −inf)."""
    sh = _crosses(x, dim, aligned)
    if sh is None:
        return x.amax(dim=_dims(x, dim), keepdim=keepdim)
    if x.numel() == 0:
        shape = [1 if d in _dims(x, dim) else n for d, n in enumerate(x.shape)]
        out = x.new_full(shape, -math.inf)
        if not keepdim:
            out = out.squeeze(_dims(x, dim))
    else:
        out = x.amax(dim=_dims(x, dim), keepdim=keepdim)
    return _all_reduce(out.contiguous(), sh, "max")


def rms(x: torch.Tensor, *, aligned: bool = True) -> torch.Tensor:
    """RMS of the whole (aligned) tensor, 0-d, accumulated in ≥ float32 (as ``numerics.rms``)."""
    sh = _crosses(x, None, aligned)
    if sh is None:
        return _plain_rms(x)
    ss = x.to(acc_dtype(x)).square().sum()
    return _all_reduce(ss, sh, "sum").div_(max(math.prod(sh.global_shape), 1)).sqrt_()


# --- derivative-free optimizers: only scalars cross ranks --------------------------------------------
def _initialized() -> bool:
    import torch.distributed as dist  # noqa: PLC0415

    return dist.is_available() and dist.is_initialized()


def check_sync(name: str, sync: Any) -> None:
    """Validate a ``sync`` option (None, True, False); ``True`` needs an initialized process group."""
    if sync is not None and not isinstance(sync, bool):
        raise TypeError(f"Invalid sync: {sync!r} (expected None, True or False)")
    if sync is True and not _initialized():
        raise ValueError(f"Invalid sync: True (expected an initialized torch.distributed process group: call "
                         f"torch.distributed.init_process_group before building {name}, or pass sync=None)")


def loss_group(name: str, params: Sequence[torch.Tensor], sync: bool | None) -> Any:
    """The process group over which a derivative-free optimizer averages its loss values, or None: the
    parameters' device mesh's (FSDP2), else the default group when torch.distributed runs with more than
    one rank; None when ``sync`` is False or there is one rank."""
    meshes = []
    for p in params:
        sh = layout_of(p)
        if sh is not None and sh.mesh not in meshes:
            meshes.append(sh.mesh)
    if len(meshes) > 1:
        raise ValueError(f"{name}: the parameters are DTensors on {len(meshes)} different device meshes (expected one)")
    if sync is False:
        if meshes and meshes[0].size() > 1:
            raise ValueError(f"{name}: sync=False with sharded (FSDP2) parameters: each rank holds only its shard, "
                             "so the ranks must average their losses (sync=None or True)")
        return None
    if not _initialized():
        if sync:
            raise ValueError(f"{name}: sync=True but torch.distributed is not initialized")
        return None
    import torch.distributed as dist  # noqa: PLC0415

    if meshes:
        return meshes[0].get_group() if meshes[0].size() > 1 else None
    return dist.group.WORLD if dist.get_world_size() > 1 else None


def check_same_seeds(name: str, seeds: Sequence[int], group: Any) -> None:
    """Raise ``ValueError`` on every rank unless every rank drew the same ``seeds`` (one all-reduce of
    2·len(seeds) integers: max of s and of −s)."""
    import torch.distributed as dist  # noqa: PLC0415

    t = torch.tensor(list(seeds) + [-s for s in seeds], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    n = len(seeds)
    if any(int(t[i]) != -int(t[n + i]) for i in range(n)):
        raise ValueError(f"{name}: the ranks drew different direction seeds this step: construct the optimizer "
                         "with the same seed on every rank (and load the same state into each)")


def average_values(values: Sequence[float], group: Any) -> list[float]:
    """The mean over the ranks of each of ``values`` (float64, one all-reduce)."""
    import torch.distributed as dist  # noqa: PLC0415

    t = torch.tensor(list(values), dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return (t / dist.get_world_size(group)).tolist()


def all_zero(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every entry of ``tensors`` is 0, decided for the whole of each FSDP2 DTensor (its shards'
    answers combined by one all-reduce, so every rank returns the same)."""
    nonzero = any(bool((t.to_local() if is_dtensor(t) else t).any()) for t in tensors)
    groups: list[Any] = []
    for t in tensors:
        sh = layout_of(t, "gradient") if is_dtensor(t) else None
        if sh is not None and sh.sharded and all(g is not sh.group for g in groups):
            groups.append(sh.group)
    for group in groups:
        import torch.distributed as dist  # noqa: PLC0415

        flag = torch.tensor([1 if nonzero else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        nonzero = bool(flag.item())
    return not nonzero


def shard_sum(t: torch.Tensor, shard: Shard | None) -> torch.Tensor:
    """``t`` (a local partial sum over ``shard``'s parameter) summed over the ranks when the parameter is
    sharded, in place; else ``t``."""
    if shard is None or not shard.sharded:
        return t
    return _all_reduce(t, shard, "sum")


SHARD_STATISTICS = ("exact", "local")


def check_shard_statistics(group: dict[str, Any]) -> None:
    """Validate a group's ``shard_statistics`` (``"exact"`` or ``"local"``)."""
    value = group.get("shard_statistics", "exact")
    if value not in SHARD_STATISTICS:
        raise ValueError(f"Invalid shard_statistics: {value!r} (expected 'exact' or 'local')")


def check_regathered(name: str, params: Sequence[torch.Tensor]) -> None:
    """Refuse (``ValueError``) FSDP2 parameters that stay gathered after a forward: the root module's own
    parameters by default (``fully_shard``'s ``reshard_after_forward=None``), for the backward that
    usually follows. A derivative-free step perturbs the shards between forward-only evaluations, which
    would then not see the perturbation. Reads FSDP2's module states (a private structure: where it is
    not there, nothing is checked)."""
    if not any(is_dtensor(p) for p in params):
        return
    try:
        from torch.distributed._composable_state import _module_state_mapping  # noqa: PLC0415
    except Exception:  # pragma: no cover - another torch layout
        return
    ids = {id(p) for p in params}
    for ref in list(_module_state_mapping.values()):
        state = ref() if callable(ref) else ref
        for group in getattr(state, "_fsdp_param_groups", None) or ():
            if getattr(group, "_reshard_after_forward", True):
                continue
            if any(id(getattr(fp, "sharded_param", None)) in ids for fp in getattr(group, "fsdp_params", ())):
                raise ValueError(
                    f"{name}: FSDP2 keeps some of the parameters gathered after a forward (the root module's own "
                    "parameters, by default), so forward-only evaluations would not see the perturbed shards; "
                    "wrap the root with fully_shard(model, reshard_after_forward=True)")


def sum_partials(rows: Sequence[Sequence[torch.Tensor]], shards: Sequence[Shard | None]) -> list[list[torch.Tensor]]:
    """``rows[i]``: 0-d local partial sums over the shard ``shards[i]`` of a parameter. Returns them summed
    over the ranks where that parameter is sharded (the rest as given), with one all-reduce per process
    group and dtype for all of them: the bucketed form of :func:`shard_sum` for a wrapper's per-tensor sums."""
    out = [list(r) for r in rows]
    buckets: dict[Any, list[tuple[int, int]]] = {}
    groups: dict[int, Any] = {}
    for i, (row, sh) in enumerate(zip(rows, shards)):
        if sh is None or not sh.sharded:
            continue
        groups[id(sh.group)] = sh.group
        for j, t in enumerate(row):
            buckets.setdefault((id(sh.group), t.dtype, t.device), []).append((i, j))
    import torch.distributed as dist  # noqa: PLC0415

    for (gid, _, _), where in buckets.items():
        flat = torch.stack([out[i][j].reshape(()) for i, j in where])
        dist.all_reduce(flat, group=groups[gid])
        for k, (i, j) in enumerate(where):
            out[i][j] = flat[k]
    return out
