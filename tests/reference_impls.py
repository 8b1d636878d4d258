"""Independent float64 NumPy reference implementations of danlu's five optimizers.

Written from the algorithm spec (``adaptive.md`` §0 conventions, §1–§4 formulas), NOT from danlu's
source: no torch, no shared helpers with the package. Each reference object follows ONE tensor;
``step(theta, grad)`` returns the new parameter (a fresh float64 array) and keeps its own state.

Deliberate differences of *form* from danlu's documented recursions (the maths is the same), so
that an agreement is a real cross-check:

* AdaX keeps the RAW second moment v_t = (1+β2)·v_{t−1} + β2·g² and divides by (1+β2)^t − 1 at use
  (danlu stores the normalised v̂ with Su's β̂_t recursion).
* Adafactor keeps row/column SUMS (not means) of G² = g² + ε1 and rebuilds V̂ slice by slice with an
  explicit loop over the non-factored dims (V̂_ij = R_i·C_j / Σ_i R_i).
* Amos computes the reduced mean as an explicit sum / count over the reduced dims.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "LionRef",
    "TigerRef",
    "AdaXRef",
    "AdafactorRef",
    "AmosRef",
    "adafactor_factored_dims",
    "amos_default_eta_and_dims",
    "rms",
]


def rms(x: np.ndarray) -> float:
    """Root mean square over the whole tensor (0-d and empty-safe for the sizes we use)."""
    x = np.asarray(x, dtype=np.float64)
    return math.sqrt(float(np.sum(x * x)) / max(x.size, 1))


def _f64(x) -> np.ndarray:
    return np.array(x, dtype=np.float64, copy=True)


# --------------------------------------------------------------------------------------------------
# Lion / Tiger  (spec §0 + §1, google/automl order)
# --------------------------------------------------------------------------------------------------
class LionRef:
    """c = β1·m + (1−β1)·g;  θ ← θ − η·(sign(c) + λ·θ);  m ← β2·m + (1−β2)·g."""

    def __init__(self, shape, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        self.lr = float(lr)
        self.beta1, self.beta2 = (float(b) for b in betas)
        self.wd = float(weight_decay)
        self.m = np.zeros(shape, dtype=np.float64)

    def step(self, theta, grad):
        theta = _f64(theta)
        g = _f64(grad)
        c = self.beta1 * self.m + (1.0 - self.beta1) * g  # uses the OLD momentum
        new = theta - self.lr * (np.sign(c) + self.wd * theta)  # decay on the pre-update θ
        self.m = self.beta2 * self.m + (1.0 - self.beta2) * g  # momentum updated last
        return new

    def state(self):
        return {"exp_avg": self.m}


class TigerRef:
    """m ← β·m + (1−β)·g;  θ ← θ·(1−η·λ) − η·sign(m)   (Su, kexue.fm/archives/9512)."""

    def __init__(self, shape, lr, beta=0.965, weight_decay=0.0):
        self.lr = float(lr)
        self.beta = float(beta)
        self.wd = float(weight_decay)
        self.m = np.zeros(shape, dtype=np.float64)

    def step(self, theta, grad):
        theta = _f64(theta)
        self.m = self.beta * self.m + (1.0 - self.beta) * _f64(grad)
        return theta * (1.0 - self.lr * self.wd) - self.lr * np.sign(self.m)

    def state(self):
        return {"exp_avg": self.m}


# --------------------------------------------------------------------------------------------------
# AdaX-W  (spec §0 + §3): raw geometric second moment, normalised at use; ε outside √v̂; no m debias
# --------------------------------------------------------------------------------------------------
class AdaXRef:
    def __init__(self, shape, lr=1e-3, betas=(0.9, 1e-4), eps=1e-6, weight_decay=0.0):
        self.lr = float(lr)
        self.beta1, self.beta2 = (float(b) for b in betas)
        self.eps = float(eps)
        self.wd = float(weight_decay)
        self.t = 0
        self.m = np.zeros(shape, dtype=np.float64)
        self.v_raw = np.zeros(shape, dtype=np.float64)  # v_t = (1+β2)·v_{t−1} + β2·g², unnormalised

    def _normaliser(self) -> float:
        # (1+β2)^t − 1 straight from the formula (float64; fine for the few steps the tests run)
        return (1.0 + self.beta2) ** self.t - 1.0

    def v_hat(self):
        return self.v_raw / self._normaliser()

    def step(self, theta, grad):
        theta = _f64(theta)
        g = _f64(grad)
        self.t += 1
        self.m = self.beta1 * self.m + (1.0 - self.beta1) * g
        self.v_raw = (1.0 + self.beta2) * self.v_raw + self.beta2 * g * g
        update = self.m / (np.sqrt(self.v_hat()) + self.eps)
        return theta - self.lr * self.wd * theta - self.lr * update

    def state(self):
        return {"exp_avg": self.m, "exp_avg_sq": self.v_hat()}


# --------------------------------------------------------------------------------------------------
# Adafactor  (spec §0 + §4; paper as Su / optax / mesh-tf implement it)
# --------------------------------------------------------------------------------------------------
def adafactor_factored_dims(shape, min_dim_size_to_factor=128):
    """Return (largest_dim, second_largest_dim) if the tensor is factored, else None.

    The two largest dims by a stable ascending argsort of the shape (on ties the later index counts
    as larger); factored only when both are ≥ ``min_dim_size_to_factor``.
    """
    shape = tuple(shape)
    if len(shape) < 2:
        return None
    order = np.argsort(np.asarray(shape), kind="stable")
    largest, second = int(order[-1]), int(order[-2])
    if shape[largest] < min_dim_size_to_factor or shape[second] < min_dim_size_to_factor:
        return None
    return largest, second


class AdafactorRef:
    """Factored second moment with row/col SUMS, explicit per-slice loop for ≥3-D tensors.

    For the factored case, let a = the largest dim (size n_a) and b = the second largest (size n_b);
    every other dim indexes independent "slices" (K of them). Per slice k, X_k is the n_b × n_a
    matrix of G² = g² + ε1 and
        R_k = EMA(row sums  Σ_j X_k[i, j])   (n_b numbers; sum over the largest dim)
        C_k = EMA(col sums  Σ_i X_k[i, j])   (n_a numbers; sum over the 2nd-largest dim)
        V̂_k[i, j] = R_k[i]·C_k[j] / Σ_i R_k[i]
    so the state is K·(n_a + n_b) numbers.
    """

    def __init__(
        self,
        shape,
        lr=None,
        eps=(1e-30, 1e-3),
        clip_threshold=1.0,
        decay_rate=0.8,
        beta1=None,
        weight_decay=0.0,
        scale_parameter=True,
        min_dim_size_to_factor=128,
    ):
        self.shape = tuple(shape)
        self.lr = None if lr is None else float(lr)
        self.eps1, self.eps2 = (float(e) for e in eps)
        self.d = float(clip_threshold)
        self.c = float(decay_rate)
        self.beta1 = beta1
        self.wd = float(weight_decay)
        self.scale_parameter = bool(scale_parameter)
        self.t = 0
        self.dims = adafactor_factored_dims(self.shape, min_dim_size_to_factor)
        if self.dims is None:
            self.v = np.zeros(self.shape, dtype=np.float64)
        else:
            a, b = self.dims
            self.n_a, self.n_b = self.shape[a], self.shape[b]
            self.K = int(np.prod([s for i, s in enumerate(self.shape) if i not in (a, b)], dtype=np.int64))
            self.R = np.zeros((self.K, self.n_b), dtype=np.float64)
            self.C = np.zeros((self.K, self.n_a), dtype=np.float64)
        self.m = None if beta1 is None else np.zeros(self.shape, dtype=np.float64)

    @property
    def factored(self) -> bool:
        return self.dims is not None

    def state_numel(self) -> int:
        """Number of second-moment floats the spec prescribes (n + m per factored slice)."""
        if self.factored:
            return self.R.size + self.C.size
        return self.v.size

    def _to_slices(self, x):
        a, b = self.dims
        # (..., n_b, n_a) then flatten the remaining dims into K slices
        return np.moveaxis(x, (b, a), (-2, -1)).reshape(self.K, self.n_b, self.n_a)

    def _from_slices(self, xs):
        a, b = self.dims
        rest = [s for i, s in enumerate(self.shape) if i not in (a, b)]
        return np.moveaxis(xs.reshape(*rest, self.n_b, self.n_a), (-2, -1), (b, a))

    def step(self, theta, grad):
        theta = _f64(theta)
        g = _f64(grad)
        self.t += 1
        t = self.t
        beta_hat = 1.0 - t ** (-self.c)
        G2 = g * g + self.eps1  # ε1 enters before the row/col statistics
        if self.factored:
            X = self._to_slices(G2)
            V_slices = np.empty_like(X)
            for k in range(self.K):
                row_sums = X[k].sum(axis=1)  # Σ over the largest dim: n_b numbers
                col_sums = X[k].sum(axis=0)  # Σ over the 2nd-largest dim: n_a numbers
                self.R[k] = beta_hat * self.R[k] + (1.0 - beta_hat) * row_sums
                self.C[k] = beta_hat * self.C[k] + (1.0 - beta_hat) * col_sums
                V_slices[k] = np.outer(self.R[k], self.C[k]) / self.R[k].sum()
            V = self._from_slices(V_slices)
        else:
            self.v = beta_hat * self.v + (1.0 - beta_hat) * G2
            V = self.v
        U = g / np.sqrt(V)
        U_hat = U / max(1.0, rms(U) / self.d)
        if self.beta1 is not None:
            self.m = self.beta1 * self.m + (1.0 - self.beta1) * U_hat  # EMA of Û before scaling
            direction = self.m
        else:
            direction = U_hat
        rho = self.lr if self.lr is not None else min(1e-2, 1.0 / math.sqrt(t))
        alpha = rho * max(self.eps2, rms(theta)) if self.scale_parameter else rho  # RMS of pre-decay θ
        return theta * (1.0 - rho * self.wd) - alpha * direction

    def v_hat(self):
        """Current V̂ at full shape (for the unfactored case this is the stored state)."""
        if not self.factored:
            return self.v
        out = np.empty((self.K, self.n_b, self.n_a))
        for k in range(self.K):
            out[k] = np.outer(self.R[k], self.C[k]) / self.R[k].sum()
        return self._from_slices(out)


# --------------------------------------------------------------------------------------------------
# Amos  (spec §0 + §2.2, jestimator semantics)
# --------------------------------------------------------------------------------------------------
def amos_default_eta_and_dims(shape):
    """danlu's documented inference when a group gives neither ``eta`` nor ``reduce_dims``."""
    shape = tuple(shape)
    if len(shape) >= 2:
        fan_in = int(np.prod(shape)) // shape[0]
        return math.sqrt(1.0 / fan_in), tuple(range(1, len(shape)))
    # 1-D (and 0-d): one scalar v, η̃ = 0.5
    return 0.5, tuple(range(len(shape)))


class AmosRef:
    def __init__(
        self,
        shape,
        lr,
        eta,
        reduce_dims,
        beta=0.999,
        momentum=None,
        clip_value=None,
        c_coef=0.25,
        d_coef=0.25,
        extra_l2=0.0,
        eps=2.0**-125,
    ):
        self.shape = tuple(shape)
        self.xi = float(lr)
        self.eta = float(eta)
        self.reduce_dims = tuple(sorted(int(d) % max(len(self.shape), 1) for d in reduce_dims))
        self.beta = float(beta)
        self.momentum = momentum
        self.clip_value = clip_value
        self.c = float(c_coef)
        self.d = float(d_coef)
        self.l2 = float(extra_l2)
        self.eps = float(eps)
        self.t = 0
        self.S = tuple(1 if i in self.reduce_dims else s for i, s in enumerate(self.shape))
        self.v = np.zeros(self.S, dtype=np.float64)
        self.b = np.zeros(self.S, dtype=np.float64)
        self.m = None if momentum is None else np.zeros(self.shape, dtype=np.float64)

    def _reduced_mean(self, x):
        if not self.reduce_dims:
            return x.copy()
        count = int(np.prod([self.shape[i] for i in self.reduce_dims], dtype=np.int64))
        return np.sum(x, axis=self.reduce_dims, keepdims=True) / count

    def step(self, theta, grad):
        theta = _f64(theta)
        g = _f64(grad)
        if self.clip_value is not None:
            g = np.minimum(np.maximum(g, -self.clip_value), self.clip_value)
        self.t += 1
        xi, eta, b_old = self.xi, self.eta, self.b
        g2 = self._reduced_mean(g * g)
        self.v = self.beta * self.v + (1.0 - self.beta) * g2
        r = (1.0 - self.beta**self.t) / np.maximum(self.v, self.eps)
        cfac = 1.0 / np.sqrt(1.0 + self.c * math.sqrt(xi) * b_old)
        gamma = cfac * xi * xi * r * g2
        dfac = 1.0 / (1.0 + self.d * math.sqrt(xi * eta) * b_old)
        delta = dfac * (-(gamma / 2.0 + self.l2) * theta - xi * eta * np.sqrt(r) * g)
        self.b = b_old + gamma * (1.0 + b_old)
        if self.momentum is not None:
            mu = float(self.momentum)
            self.m = mu * self.m + (1.0 - mu) * delta
            delta = self.m
        return theta + delta

    def state(self):
        out = {"v": self.v, "b": self.b}
        if self.m is not None:
            out["exp_avg"] = self.m
        return out
