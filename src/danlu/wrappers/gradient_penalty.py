"""Implicit gradient regularization made explicit (gradient-norm penalty) and flooding.

Gradient descent with step h does not follow the gradient flow of L: to second order in h it follows
the flow of L + (h/4)·‖∇L‖² (Barrett & Dherin; Su, kexue.fm/archives/7787). :class:`GradientPenalty`
adds such a penalty explicitly, to any torch optimizer; :func:`igr_strength` gives the strength that
equals the implicit one of a given lr; :func:`flood` is Ishida et al.'s flooding, which below its level
turns descent into ascent and so also acts as a gradient-norm penalty (Su, kexue.fm/archives/7643).
"""

from __future__ import annotations

from typing import Any, Callable, cast

import torch

from .._core.distributed import is_dtensor
from .._core.optimizer import is_state_init_step
from .._core.validate import check_choice, check_number
from .._core.wrapper import OptimizerWrapper

__all__ = ["GradientPenalty", "igr_strength", "flood"]

_METHODS = ("finite_difference", "double_backward")


def _check_strength(value: Any) -> float:
    return check_number("strength", value, low=0.0)


def closure_gradient(closure: Callable[[], Any], params: list[torch.Tensor]) -> Any:
    """Run ``closure`` with gradients enabled and ``params``' grads cleared; backpropagate its loss
    (to ``params`` only) unless the closure called backward itself. Returns the closure's loss.

    Shared by the closure-driven wrappers (GradientPenalty, MGS): a closure may be the usual torch /
    Lightning one (zero_grad, forward, backward, return loss) or return the loss without backward.
    """
    for p in params:
        p.grad = None
    with torch.enable_grad():
        loss = closure()
        if any(p.grad is not None for p in params):
            return loss  # the closure called backward itself
        if isinstance(loss, torch.Tensor) and loss.requires_grad and params:
            torch.autograd.backward(loss, inputs=params)
    return loss


def _local(t: torch.Tensor) -> torch.Tensor:
    """``t``'s local shard if it is a DTensor (FSDP2), else ``t``."""
    return t.to_local() if is_dtensor(t) else t


class GradientPenalty(OptimizerWrapper):
    r"""Step an inner optimizer on the gradient of L + λ·‖∇L‖² (explicit gradient regularization).

    With g = ∇L(θ) over *all* parameters of the inner optimizer jointly (‖∇L‖² = Σ_tensors Σ g²) and
    H the Hessian, the penalised gradient is::

        ∇[L + λ‖∇L‖²](θ) = g + 2λ·H·g

    and the inner optimizer (SGD, AdamW, Lion, ...) takes its step with that in ``.grad``.

    ``method="finite_difference"`` (default) uses ∇L(θ + εg) = g + εHg + O(ε²) with ε = 2λ::

        1. L, g  ← closure() at θ                          (1st forward + backward)
        2. θ̃ = θ + 2λ·g                                    (θ saved first)
        3. g̃    ← closure() at θ̃                           (2nd forward + backward)
        4. θ restored from the saved copy, bitwise, in every dtype
        5. .grad = g̃ = ∇[L + λ‖∇L‖²](θ) + O(λ²);  inner.step()

    No double backward is needed, so it works with any model (fused attention kernels included). It is
    an un-normalised SAM step: SAM perturbs by ρ·g/‖g‖, this by 2λ·g. The O(λ²) term is small only
    while the shift 2λ·g stays inside the region where the loss is smooth: across ReLU kinks it is not.
    On the digits MLP (``danlu compare --experiment implicit-regularization``) with λ = 0.44, a shift of
    0.875·g, the finite-difference estimate of Hg had 13× the norm of the exact one (it matched to 2e−5
    only at λ ≤ 0.01); it still lowered ‖∇L‖² about as much as the exact penalty, i.e. it behaved as the
    SAM-like step rather than as the penalty. Use ``"double_backward"`` when the penalty itself matters.

    ``method="double_backward"`` computes the same gradient exactly: g by ``autograd.grad`` with
    ``create_graph=True``, then 2λHg as the gradient of λ·Σ g² by a second backward through that graph.
    The two methods agree to O(λ²).

    ``strength=0`` is the inner optimizer itself: one closure call, then ``inner.step()`` (bitwise the
    same as ``inner.step(closure)``).

    Cost per step: finite difference, 2 forwards + 2 backwards and one extra copy of the parameters
    that have a gradient (freed after the step; the first gradient is released before the second
    pass). Double backward, 1 forward + a backward that keeps its graph + a backward through it,
    roughly 2–3× a backward in time and the graph of the gradient in memory; it fails on operations
    without a double backward (e.g. flash/memory-efficient attention kernels).

    **Closure contract.** ``step(closure)`` requires a closure. The closure re-evaluates the model on
    the *same* batch and returns the loss (a scalar tensor). It may call ``loss.backward()`` itself
    (the usual torch and Lightning closure: zero_grad, forward, backward, return loss), or return the
    loss without backward and let the wrapper differentiate. The wrapper tells the two apart by the
    gradients: it sets ``.grad = None`` on its parameters before every closure call (so the closure
    need not zero them), and if none has a gradient afterwards and the loss requires grad, it
    backpropagates the loss itself, with respect to its own parameters only. ``method=
    "double_backward"`` needs the second form (a closure that already called backward has freed the
    graph the penalty differentiates): it raises ``RuntimeError`` otherwise, with parameters and
    optimizer state unchanged. The closure runs with gradients enabled even inside ``torch.no_grad``.
    Calling ``step()`` without a callable closure raises ``TypeError`` before anything changes (this
    includes ``strength=0``, so that a sweep over strengths keeps one calling convention).

    Consequences: gradients accumulated in ``.grad`` outside the closure (a ``backward()`` before
    ``step``, Lightning's ``accumulate_grad_batches`` > 1) cannot enter the penalty: ``step`` raises
    ``RuntimeError`` before anything changes rather than drop them (the gradients its own last step
    left, and all-zero ones, are fine); accumulate inside the closure, or in the inner optimizer's
    momentum (``accum_steps``), instead. A step without a closure raises ``TypeError``, except the
    state initialisation of ``torch.distributed.checkpoint``'s state-dict helpers (all-zero gradients
    at lr 0), which steps the inner optimizer. Under finite differences the closure runs twice per
    step, so a Lightning ``training_step`` runs (and logs) twice, dropout draws new masks for the second pass unless the
    closure fixes the RNG, and BatchNorm in train mode updates its running statistics twice. Fp16
    AMP through ``GradScaler`` calls ``step()`` without a closure and is not supported (bf16 autocast
    is). The inner optimizer must step from ``.grad`` alone (``torch.optim.LBFGS`` is refused), and
    must not have ``fuse_into_backward()`` hooks active (``step`` raises ``RuntimeError``); momentum
    accumulation (``accum_steps=k``) works, each micro-step absorbing a penalised gradient; read
    ``wrapper.is_update_step`` (the inner optimizer's).

    Parameters whose gradient is ``None`` after the first pass are not perturbed and are left with
    ``.grad = None``, so the inner optimizer skips them.

    Args:
        optimizer: the inner ``torch.optim.Optimizer``; the wrapper shares its param groups (an lr
            scheduler on the wrapper changes the inner lr) and its state (the wrapper's own entries
            in it are prefixed), so the wrapper's state dict is the inner one's in torch's layout.
        strength: λ ≥ 0, the coefficient of ‖∇L‖² (required). λ = :func:`igr_strength` (lr) = lr/4
            doubles the implicit regularization of gradient descent at that lr; a scheduler does not
            change λ, set ``wrapper.strength`` yourself to track the lr.
        method: ``"finite_difference"`` (default) or ``"double_backward"``.

    References:
        Barrett & Dherin, "Implicit Gradient Regularization", ICLR 2021, arXiv:2009.11162 (explicit
        gradient regularization, λ = h/4 per unit of R = ‖∇L‖²); Su Jianlin, kexue.fm/archives/7787
        (the operator derivation) and /7234 (the finite-difference gradient penalty).

    Deviations:
        The finite-difference step size is tied to λ (ε = 2λ), so the penalised gradient is a single
        gradient at a shifted point and costs no extra buffer beyond the saved parameters; Su's
        general form (1 − 2λ/ε)·g + (2λ/ε)·g(θ + εg) with a free ε is not offered. In bf16 the shifted
        point θ + 2λg is rounded to bf16, so a λ·g below half an ulp of θ is lost (the restore is
        exact regardless); use ``"double_backward"`` or float32 master weights for tiny λ.
    """

    _hyper_keys = ("strength", "method")
    _prefix = "gp_"
    _entry = "danlu_gradient_penalty"

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        strength: float,
        method: str = "finite_difference",
    ) -> None:
        strength = _check_strength(strength)
        method = check_choice("method", method, _METHODS)
        super().__init__(optimizer)
        if isinstance(optimizer, torch.optim.LBFGS):
            raise TypeError(
                "GradientPenalty steps its inner optimizer from .grad without a closure; "
                "LBFGS re-evaluates a closure and is not supported"
            )
        self._strength = strength
        self._method = method

    @property
    def strength(self) -> float:
        return self._strength

    @strength.setter
    def strength(self, value: float) -> None:
        self._strength = _check_strength(value)

    @property
    def method(self) -> str:
        return self._method

    @method.setter
    def method(self, value: str) -> None:
        self._method = check_choice("method", value, _METHODS)

    def _check_own(self, entry: dict[str, Any] | None, own_state: dict[int, dict[str, Any]],
                   own_groups: dict[int, dict[str, Any]], with_state: dict[int, dict[str, Any]]) -> None:
        hyper = (entry or {}).get("hyper") or {}
        try:
            if "strength" in hyper:
                _check_strength(hyper["strength"])
            if "method" in hyper:
                check_choice("method", hyper["method"], _METHODS)
        except (TypeError, ValueError) as err:
            raise ValueError(f"GradientPenalty.load_state_dict: {err}") from err

    # --- the step ---------------------------------------------------------------------------------

    def _trainable(self) -> list[torch.Tensor]:
        return [p for p in self._params() if p.requires_grad]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step on ∇[L + λ‖∇L‖²]; returns the closure's loss at the unperturbed θ.

        Args:
            closure: required; re-evaluates the model and returns the loss, with or without calling
                backward itself (see the class docstring).
        """
        if closure is None and is_state_init_step(self):
            self.optimizer.step()
            return None
        if closure is None or not callable(closure):
            raise TypeError(
                "GradientPenalty.step needs a closure that re-evaluates the model and returns the loss, "
                f"e.g. opt.step(lambda: loss_fn(model(x), y)); got {closure!r}"
            )
        if getattr(self.optimizer, "_fused", False):
            # Backward hooks would fold the first pass's gradient into the inner state (and free
            # .grad) before the wrapper could replace it by the penalised one.
            raise RuntimeError(
                "GradientPenalty cannot wrap an optimizer whose fuse_into_backward() hooks are active; "
                "remove them (handle.remove()) first"
            )
        params = self._trainable()
        self._refuse_outside_grads(params)
        if self._strength == 0.0:
            loss = closure_gradient(closure, params)
        elif self._method == "finite_difference":
            loss = self._finite_difference(closure, params)
        else:
            loss = self._double_backward(closure, params)
        self.optimizer.step()
        self._note_grads_left(params)
        return loss

    def _finite_difference(self, closure: Callable[[], Any], params: list[torch.Tensor]) -> Any:
        loss = closure_gradient(closure, params)
        shifted = [p for p in params if p.grad is not None]
        if not shifted:
            return loss
        # Restoring from a copy rather than subtracting 2λg again makes the round trip exact in every
        # dtype (θ + εg − εg is not θ in floating point, by far not in bf16).
        # FSDP2 parameters move on their local shards (their gradients are sharded alike).
        local = [_local(p) for p in shifted]
        saved = [t.detach().clone() for t in local]
        for t, p in zip(local, shifted):
            t.add_(_local(cast(torch.Tensor, p.grad)), alpha=2.0 * self._strength)  # shifted: those with grads
        try:
            closure_gradient(closure, params)
        finally:
            for t, theta in zip(local, saved):
                t.copy_(theta)
        keep = {id(p) for p in shifted}
        for p in params:
            if id(p) not in keep:
                p.grad = None
        return loss

    def _double_backward(self, closure: Callable[[], Any], params: list[torch.Tensor]) -> Any:
        for p in params:
            p.grad = None
        with torch.enable_grad():
            loss = closure()
            if any(p.grad is not None for p in params):
                raise RuntimeError(
                    "GradientPenalty(method='double_backward') needs a closure that returns the loss "
                    "WITHOUT calling backward (the wrapper differentiates it twice); this closure "
                    "called backward. Remove loss.backward() from it, or use "
                    "method='finite_difference', which accepts both kinds of closure"
                )
            if not (isinstance(loss, torch.Tensor) and loss.requires_grad and params):
                return loss
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            used = [(p, g) for p, g in zip(params, grads) if g is not None]
            if not used:
                return loss
            penalty = cast(torch.Tensor, sum(g.square().sum() for _, g in used))  # used is not empty
            hess_g: tuple[torch.Tensor | None, ...]
            if penalty.requires_grad:  # False when L is linear in every parameter
                hess_g = torch.autograd.grad(penalty, [p for p, _ in used], allow_unused=True)
            else:
                hess_g = (None,) * len(used)
        for (p, g), h in zip(used, hess_g):
            grad = g.detach()
            if h is not None:
                grad = grad.add(h, alpha=self._strength)  # h = ∇Σg² = 2Hg
            p.grad = grad
        return loss


def igr_strength(lr: float) -> float:
    """The penalty strength λ = lr/4 that equals gradient descent's implicit regularization at ``lr``.

    Gradient descent θ ← θ − h·∇L follows, with local error O(h³), the gradient flow of
    L + (h/4)·‖∇L‖² (Barrett & Dherin, arXiv:2009.11162; Su, kexue.fm/archives/7787). So
    ``GradientPenalty(opt, igr_strength(h))`` at a small lr adds explicitly what a step size h would
    add implicitly (on top of the small lr's own h_small/4). For the finite-difference method this
    means evaluating the gradient at θ + (h/2)·g.
    """
    lr = check_number("lr", lr, low=0.0)
    return lr / 4.0


def flood(loss: Any, level: float) -> Any:
    r"""Flooding: |L − b| + b, which descends L above the level b and ascends it below.

    Apply it to the mini-batch *mean* loss, then backpropagate as usual::

        loss = danlu.flood(F.cross_entropy(model(x), y), level=0.05)
        loss.backward()

    The value equals L when L ≥ b; the gradient is +∇L above b, −∇L below (and 0 at L = b exactly,
    torch's subgradient of |·| at 0). Once the training loss reaches b it hovers there; a descent step
    followed by an ascent step (or the reverse) of lr ε moves θ by −(ε²/2)·∇‖∇L‖² + O(ε³), so below
    the level flooding acts as gradient descent on ‖∇L‖² with lr ε²/2 (Su, kexue.fm/archives/7643).

    Args:
        loss: a tensor (autograd flows through) or a Python number.
        level: b, a finite number (Ishida et al. tune it on validation data, typically in [0, 0.1]).

    References:
        Ishida et al., "Do We Need Zero Training Loss After Achieving Zero Training Error?",
        ICML 2020, arXiv:2002.08709.
    """
    level = check_number("level", level)
    if isinstance(loss, torch.Tensor):
        return (loss - level).abs() + level
    return abs(loss - level) + level
