"""Embedded real tasks for ``danlu compare``: frozen problems where the optimizer is the only variable.

Each :class:`Task` has a train and a validation split, a default step budget, the optimizers it suits
and a per-optimizer default learning rate (the centre of an lr grid). ``task.build(seed)`` returns a
fresh :class:`Problem`; a training loop only ever needs::

    problem = task.build(seed)
    for step in range(steps):
        opt.zero_grad()
        problem.train_loss(step).backward()
        opt.step()
        if problem.project is not None:   # nnls: keep x ≥ 0 for additive optimizers
            problem.project()
    metrics = problem.evaluate()          # always has "val_loss" (the quantity to pick an lr by)

Nothing is downloaded: digits and breast-cancer ship with scikit-learn, the character corpus is the
Python standard library's own source, and the rest is generated. The data, splits, matrices and optima
are frozen (seeded by the task's name, not by ``seed``); ``seed`` sets only the initial parameters
and the minibatch order. Randomness comes from local :class:`torch.Generator` objects seeded from
(seed, step), so the global RNG is never advanced (model construction runs inside
:func:`torch.random.fork_rng`). Same seed, same torch build and same Python version → the same run.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TASKS", "CharTransformer", "Problem", "Task", "get_task"]

# Optimizer names as the CLI spells them (lowercase).
NN_OPTIMIZERS = ("adamw", "lion", "tiger", "adax", "adafactor", "amos", "sgdm", "torch-adamw", "torch-sgd")
ANALYTIC_OPTIMIZERS = ("adamw", "lion", "tiger", "adax", "adafactor", "sgdm", "torch-adamw", "torch-sgd")


# --------------------------------------------------------------------------- the two records


@dataclass
class Problem:
    """One built instance of a task: parameters, a differentiable training loss and validation metrics.

    Attributes:
        params: the trainable tensors (``list(model.parameters())`` when there is a model).
        train_loss: ``train_loss(step)`` is the differentiable minibatch loss for that step; the batch
            (or noise) depends only on (seed, step), so calling it twice in a step gives the same batch.
        evaluate: validation metrics as floats; always ``"val_loss"`` (lower is better; the lr is
            picked by it), plus task-specific ones (``"val_acc"``, ``"val_bpc"``, ``"val_error"``, ...).
        model: the :class:`torch.nn.Module` when the task trains one, else ``None``.
        task_loss: the non-differentiable task metric on the training set (zero-one: the 0-1 error),
            for :class:`danlu.ZeroOrder` and :class:`danlu.MGS`; ``None`` elsewhere.
        project: an in-place projection onto the feasible set to call after each step (nnls: clamp
            x ≥ 0 for additive optimizers; a no-op for EGD, whose iterates stay positive); else ``None``.
        optimum: the known minimiser of the training objective (quadratic, rosenbrock, nnls), else ``None``.
        info: fixed numbers about the instance (e.g. ``"noise_floor"``, ``"vocab_size"``).
        batch_loss: ``batch_loss(indices)`` is the differentiable training loss on the given rows of
            the training split (``info["train_size"]`` rows; all of them for the full-batch loss), for
            experiments that choose their own batches (digits, zero-one); else ``None``.
        train_data: (inputs, targets) of the training split, shared by every build: read, never write
            (digits, zero-one; for losses the task does not define, e.g. a policy gradient); else ``None``.
    """

    params: list[torch.Tensor]
    train_loss: Callable[[int], torch.Tensor]
    evaluate: Callable[[], dict[str, float]]
    model: nn.Module | None = None
    task_loss: Callable[[], float] | None = None
    project: Callable[[], None] | None = None
    optimum: torch.Tensor | None = None
    info: dict[str, float] = field(default_factory=dict)
    batch_loss: Callable[[torch.Tensor], torch.Tensor] | None = None
    train_data: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass(frozen=True, eq=False)
class Task:
    """A frozen benchmark problem; :meth:`build` makes a fresh :class:`Problem` for a seed."""

    name: str
    description: str
    default_steps: int
    suits: tuple[str, ...]
    lrs: Mapping[str, float] = field(repr=False)
    builder: Callable[[int], Problem] = field(repr=False)
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, repr=False)
    """Fixed keywords per optimizer on this task, passed to :func:`danlu.create_optimizer` by the
    compare loop (zero-one: ZeroOrder's σ and samples, sized so perturbations flip predictions)."""

    def default_lr(self, optimizer: str) -> float:
        """A sensible lr for ``optimizer`` (lowercase CLI name) on this task, the centre of an lr grid."""
        key = optimizer.lower()
        if key not in self.lrs:
            raise ValueError(f"Task {self.name!r} has no default lr for optimizer {optimizer!r}; "
                             f"known: {', '.join(sorted(self.lrs))}")
        return self.lrs[key]

    def build(self, seed: int = 0) -> Problem:
        """Build the problem: frozen data, parameters initialised from ``seed``."""
        return self.builder(int(seed))


# --------------------------------------------------------------------------- seeding helpers


def _gen(*key: object) -> torch.Generator:
    """A CPU generator seeded from ``key`` by a stable hash (the same on every machine and run)."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") % 2**63)


@contextlib.contextmanager
def _seeded_init(*key: object) -> Iterator[None]:
    """Seed the global CPU RNG for module construction, restoring its state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch.randint(0, 2**62, (), generator=_gen(*key)).item())
        yield


def _split(n: int, n_val: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A frozen shuffled split of range(n) into (train, val) indices."""
    perm = torch.randperm(n, generator=_gen(name, "split"))
    return perm[n_val:], perm[:n_val]


def _batch(n: int, size: int, *key: object) -> torch.Tensor:
    """``size`` distinct indices of range(n), a function of ``key`` only."""
    return torch.randperm(n, generator=_gen(*key))[:size]


def _standardize(x: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    mean, std = x[train].mean(0), x[train].std(0)
    return (x - mean) / std.clamp_min(1e-3)


@functools.lru_cache(maxsize=None)
def _sklearn_split(loader: Any, n_val: int, name: str, y_dtype: torch.dtype):
    """A scikit-learn bundled data set, standardized on its train split: (x_train, y_train, x_val, y_val).
    Loaded once per process (the tensors are shared by every build and never written to)."""
    data = loader()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=y_dtype)
    train, val = _split(len(y), n_val, name)
    x = _standardize(x, train)
    return x[train], y[train], x[val], y[val]


# --------------------------------------------------------------------------- digits


def _build_digits(seed: int, batch: int = 64) -> Problem:
    """The digits MLP; ``batch`` rows per training step (64, the registered task's; experiments that
    vary the batch size build with another, e.g. ``functools.partial(_build_digits, batch=256)``)."""
    from sklearn.datasets import load_digits

    if isinstance(batch, bool) or not isinstance(batch, int):
        raise TypeError(f"batch must be an int, got {type(batch).__name__}")
    xt, yt, xv, yv = _sklearn_split(load_digits, 360, "digits", torch.long)
    if not 1 <= batch <= len(yt):
        raise ValueError(f"batch must be in [1, {len(yt)}] (the train split's rows), got {batch}")
    with _seeded_init("digits", seed, "init"):
        model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(xt[idx]), yt[idx])

    def train_loss(step: int) -> torch.Tensor:
        return batch_loss(_batch(len(yt), batch, "digits", seed, step))

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        logits = model(xv)
        return {"val_loss": F.cross_entropy(logits, yv).item(),
                "val_acc": (logits.argmax(1) == yv).float().mean().item()}

    return Problem(list(model.parameters()), train_loss, evaluate, model=model,
                   info={"train_size": len(yt), "val_size": len(yv)}, batch_loss=batch_loss, train_data=(xt, yt))


# --------------------------------------------------------------------------- charlm

# Modules present in every CPython ≥ 3.10, in a fixed order; missing ones are skipped.
STDLIB_FILES = (
    "abc.py", "argparse.py", "bisect.py", "calendar.py", "collections/__init__.py", "contextlib.py",
    "copy.py", "dataclasses.py", "enum.py", "fnmatch.py", "fractions.py", "functools.py", "heapq.py",
    "os.py", "queue.py", "shlex.py", "string.py", "textwrap.py", "typing.py",
)
CORPUS_CHARS = 300_000
CONTEXT = 64


@functools.lru_cache(maxsize=1)
def _corpus() -> str:
    """The first CORPUS_CHARS characters of STDLIB_FILES concatenated (same Python version → same text)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for rel in STDLIB_FILES:
        path = root / rel
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        parts.append(text)
        total += len(text)
        if total >= CORPUS_CHARS:
            break
    if not parts:
        raise RuntimeError(f"charlm: none of the standard-library sources found under {root}")
    return "".join(parts)[:CORPUS_CHARS]


class CharTransformer(nn.Module):
    """A small pre-norm causal transformer over characters (learned positions, tied to ``context``)."""

    mask: torch.Tensor  # the causal mask, a buffer

    def __init__(self, vocab: int, context: int = CONTEXT, dim: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(context, dim)
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)
        # Separate layers, not nn.TransformerEncoder, whose deep copies would start identical.
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        h = self.tok(ids) + self.pos.weight[:t]
        for block in self.blocks:
            h = block(h, src_mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(h))


def _build_charlm(seed: int, batch: int = 32, val_windows: int = 128) -> Problem:
    text = _corpus()
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    n_train = int(0.9 * len(ids))
    train_windows = ids[:n_train].unfold(0, CONTEXT + 1, 1)           # every window inside train
    val = ids[n_train:].unfold(0, CONTEXT + 1, CONTEXT)[:val_windows]  # fixed, non-overlapping
    with _seeded_init("charlm", seed, "init"):
        model = CharTransformer(len(vocab))

    def loss_on(windows: torch.Tensor) -> torch.Tensor:
        logits = model(windows[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))

    def train_loss(step: int) -> torch.Tensor:
        starts = torch.randint(0, len(train_windows), (batch,), generator=_gen("charlm", seed, step))
        return loss_on(train_windows[starts])

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        nats = loss_on(val).item()
        return {"val_loss": nats, "val_bpc": nats / math.log(2)}

    return Problem(list(model.parameters()), train_loss, evaluate, model=model,
                   info={"vocab_size": len(vocab), "corpus_chars": len(text), "val_chars": val.numel()})


# --------------------------------------------------------------------------- quadratic


def _build_quadratic(seed: int, dim: int = 100, condition: float = 1e3, noise: float = 0.1) -> Problem:
    """f(x) = ½(x − x*)ᵀH(x − x*), H = Q·diag(λ)·Qᵀ, λ log-spaced in [1/condition, 1]; each step
    jitters the target, x* + ξ with ξ ~ N(0, noise²I), so E[train loss at x*] = ½·noise²·tr H."""
    eig = torch.logspace(-math.log10(condition), 0.0, dim)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=_gen("quadratic", "rotation")))
    h = q @ torch.diag(eig) @ q.T
    x_star = torch.randn(dim, generator=_gen("quadratic", "optimum"))
    x = nn.Parameter(x_star + torch.randn(dim, generator=_gen("quadratic", seed, "init")))

    def f(d: torch.Tensor) -> torch.Tensor:
        return 0.5 * d @ h @ d

    def train_loss(step: int) -> torch.Tensor:
        xi = noise * torch.randn(dim, generator=_gen("quadratic", seed, step))
        return f(x - x_star - xi)

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        return {"val_loss": f(x - x_star).item(), "dist_to_opt": (x - x_star).norm().item()}

    return Problem([x], train_loss, evaluate, optimum=x_star.clone(),
                   info={"noise_floor": 0.5 * noise**2 * eig.sum().item(), "condition": condition})


# --------------------------------------------------------------------------- rosenbrock


def rosenbrock(x: torch.Tensor) -> torch.Tensor:
    """Σᵢ 100(x_{i+1} − x_i²)² + (1 − x_i)², minimum 0 at x = 1."""
    return (100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2).sum()


def _build_rosenbrock(seed: int, dim: int) -> Problem:
    """Deterministic; starts at (−1.2, 1, −1.2, 1, …) plus a small seeded jitter."""
    start = torch.tensor([-1.2, 1.0]).repeat(dim // 2)
    x = nn.Parameter(start + 0.05 * torch.randn(dim, generator=_gen("rosenbrock", dim, seed, "init")))
    optimum = torch.ones(dim)

    def train_loss(step: int) -> torch.Tensor:
        return rosenbrock(x)

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        return {"val_loss": rosenbrock(x).item(), "dist_to_opt": (x - optimum).norm().item()}

    return Problem([x], train_loss, evaluate, optimum=optimum)


# --------------------------------------------------------------------------- zero-one


def _build_zero_one(seed: int) -> Problem:
    """Full batch: train_loss is the logistic (cross-entropy) surrogate, task_loss the 0-1 error."""
    from sklearn.datasets import load_breast_cancer

    xt, yt, xv, yv = _sklearn_split(load_breast_cancer, 114, "zero-one", torch.float32)
    with _seeded_init("zero-one", seed, "init"):
        model = nn.Linear(xt.shape[1], 1)

    def logits(inputs: torch.Tensor) -> torch.Tensor:
        return model(inputs).squeeze(-1)

    def error(inputs: torch.Tensor, labels: torch.Tensor) -> float:
        return ((logits(inputs) > 0).float() != labels).float().mean().item()

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits(xt[idx]), yt[idx])

    def train_loss(step: int) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits(xt), yt)

    @torch.no_grad()
    def task_loss() -> float:
        return error(xt, yt)

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        err = error(xv, yv)
        return {"val_loss": err, "val_error": err,
                "val_ce": F.binary_cross_entropy_with_logits(logits(xv), yv).item()}

    return Problem(list(model.parameters()), train_loss, evaluate, model=model, task_loss=task_loss,
                   info={"train_size": len(yt), "val_size": len(yv)}, batch_loss=batch_loss,
                   train_data=(xt, yt))


# --------------------------------------------------------------------------- nnls


@functools.lru_cache(maxsize=1)
def _nnls_data(rows: int = 300, n: int = 50, noise: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.randn(rows, n, generator=_gen("nnls", "A"))
    g = _gen("nnls", "x")
    x_true = torch.rand(n, generator=g) * (torch.rand(n, generator=g) < 0.5)
    b = a @ x_true + noise * torch.randn(rows, generator=_gen("nnls", "noise"))
    return a, b


NNLS_TRAIN_ROWS = 200


@functools.lru_cache(maxsize=1)
def _nnls_optimum(iters: int = 3000) -> torch.Tensor:
    """argmin_{x ≥ 0} ½·mean((Ax − b)²) over the train rows, by accelerated projected gradient in float64."""
    a, b = _nnls_data()
    a, b = a[:NNLS_TRAIN_ROWS].double(), b[:NNLS_TRAIN_ROWS].double()
    hess = a.T @ a / len(b)
    step = 1.0 / torch.linalg.eigvalsh(hess)[-1]
    x = y = torch.zeros(a.shape[1], dtype=torch.float64)
    t = 1.0
    for _ in range(iters):
        x_next = (y - step * (hess @ y - a.T @ b / len(b))).clamp_min(0.0)
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        y = x_next + (t - 1) / t_next * (x_next - x)
        x, t = x_next, t_next
    return x.float()


def _build_nnls(seed: int, n_train: int = NNLS_TRAIN_ROWS, batch: int = 50) -> Problem:
    """min_{x ≥ 0} ½·mean((Ax − b)²) with a frozen Gaussian A (300 × 50: 200 train, 100 val rows)."""
    a, b = _nnls_data()
    at, bt, av, bv = a[:n_train], b[:n_train], a[n_train:], b[n_train:]
    optimum = _nnls_optimum()
    x = nn.Parameter(0.1 + 0.9 * torch.rand(a.shape[1], generator=_gen("nnls", seed, "init")))  # > 0

    def loss(rows: torch.Tensor, targets: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((rows @ point - targets) ** 2).mean()

    def train_loss(step: int) -> torch.Tensor:
        idx = _batch(n_train, batch, "nnls", seed, step)
        return loss(at[idx], bt[idx], x)

    @torch.no_grad()
    def project() -> None:
        x.clamp_(min=0.0)

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        feasible = x.clamp(min=0.0)  # metrics at the feasible point even if project() was skipped
        return {"val_loss": loss(av, bv, feasible).item(), "train_loss": loss(at, bt, feasible).item(),
                "dist_to_opt": (feasible - optimum).norm().item()}

    return Problem([x], train_loss, evaluate, project=project, optimum=optimum.clone(),
                   info={"optimum_train_loss": loss(at, bt, optimum).item()})


# --------------------------------------------------------------------------- registry


def _task(name: str, description: str, default_steps: int, suits: tuple[str, ...],
          lrs: dict[str, float], builder: Callable[[int], Problem],
          options: dict[str, dict[str, Any]] | None = None) -> Task:
    missing = set(suits) - set(lrs)
    assert not missing, f"{name}: no default lr for {sorted(missing)}"
    frozen = MappingProxyType({k: MappingProxyType(dict(v)) for k, v in (options or {}).items()})
    return Task(name, description, default_steps, suits, MappingProxyType(dict(lrs)), builder, frozen)


_TASK_LIST = (
    _task("digits", "scikit-learn's 8x8 handwritten digits (1437 train / 360 val), MLP 64-128-10, batch 64; "
          "val cross-entropy and accuracy", 1000, NN_OPTIMIZERS,
          dict(adamw=3e-3, lion=3e-4, tiger=3e-4, adax=3e-3, adafactor=1e-2, amos=0.02, sgdm=0.1,
               **{"torch-adamw": 3e-3, "torch-sgd": 0.1}),
          _build_digits),
    _task("charlm", f"2-layer causal transformer (d=64, context {CONTEXT}) on characters of the Python "
          "standard library's source (90/10 split by position), batch 32; val loss in bits per character",
          1000, NN_OPTIMIZERS,
          dict(adamw=3e-3, lion=1e-3, tiger=1e-3, adax=3e-3, adafactor=3e-2, amos=0.02, sgdm=0.3,
               **{"torch-adamw": 3e-3, "torch-sgd": 0.3}),
          _build_charlm),
    _task("quadratic", "100-d quadratic, condition number 1e3, target jittered by N(0, 0.1²) each step; "
          "val loss is the exact excess loss (0 at the optimum)", 1000, ANALYTIC_OPTIMIZERS,
          dict(adamw=3e-2, lion=3e-3, tiger=3e-3, adax=3e-2, adafactor=3e-2, sgdm=1.0,
               **{"torch-adamw": 3e-2, "torch-sgd": 1.0}),
          _build_quadratic),
    _task("rosenbrock", "2-d Rosenbrock from (-1.2, 1) (+ seeded jitter); minimum 0 at (1, 1)", 2000,
          ANALYTIC_OPTIMIZERS,
          dict(adamw=5e-2, lion=2e-3, tiger=2e-3, adax=5e-2, adafactor=5e-2, sgdm=3e-3,
               **{"torch-adamw": 5e-2, "torch-sgd": 1e-3}),
          functools.partial(_build_rosenbrock, dim=2)),
    _task("rosenbrock-32d", "32-d Rosenbrock (chained) from (-1.2, 1, ...) (+ seeded jitter); minimum 0 at 1",
          3000, ANALYTIC_OPTIMIZERS,
          dict(adamw=5e-2, lion=5e-3, tiger=5e-3, adax=5e-2, adafactor=5e-2, sgdm=3e-3,
               **{"torch-adamw": 5e-2, "torch-sgd": 1e-3}),
          functools.partial(_build_rosenbrock, dim=32)),
    _task("zero-one", "linear classifier on scikit-learn's breast-cancer data (455 train / 114 val), full "
          "batch; the objective is the 0-1 error (task_loss; val_loss = val 0-1 error), cross-entropy "
          "is the differentiable surrogate and the baseline; zero-order searches the 0-1 error itself "
          "(sigma 0.1, 4 antithetic pairs)", 500, ("zero-order", "mgs", "adamw"),
          {"zero-order": 0.3, "mgs": 1e-2, "adamw": 1e-2},
          _build_zero_one,
          # σ = 0.1 moves a logit by ~σ·√31 ≈ 0.5: enough to flip the misclassified examples near the
          # boundary (σ ≤ 0.01 flips almost none and the estimate is 0); measured by the zero-order experiment.
          options={"zero-order": {"sigma": 0.1, "samples": 4}}),
    _task("nnls", "non-negative least squares, frozen 300x50 Gaussian A (200 train / 100 val rows), "
          "batch 50 rows, positive start; project() clamps x >= 0 for additive optimizers", 500,
          ("egd", "adamw", "sgdm"),
          dict(egd=0.15, adamw=1e-2, sgdm=0.1),
          _build_nnls),
)

TASKS: Mapping[str, Task] = MappingProxyType({t.name: t for t in _TASK_LIST})


def get_task(name: str) -> Task:
    """The task called ``name``; a ValueError lists the known names otherwise."""
    try:
        return TASKS[name.lower()]
    except KeyError:
        raise ValueError(f"Unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None
