"""Generalized EM: EM for a model without a closed-form M-step, from its Pyro declaration alone.

The E-step's responsibilities r_nk are the softmax over k of the model's ``log_joint`` (Pyro's
enumeration of the assignment, or the model's own faster hook). The M-step does not maximize
Q(θ) = Σ_n Σ_k r_nk log p(x_n, z_n = k | θ) + log p(θ) but climbs it: a few steps of a
deterministic optimizer (L-BFGS with a strong-Wolfe line search, or Adam) in unconstrained
coordinates, each global site mapped onto its support by ``biject_to``, as the declaration states
it. The new θ is kept only if Q rose; otherwise θ stays. Since log p(x | θ') - log p(x | θ) is at
least Q(θ') - Q(θ) (the entropy term of the responsibilities can only add), the log-likelihood
(plus log prior) never decreases, as in exact EM, and the fit stops as ``em`` does: when the
objective per point moved by less than ``tol`` (a θ kept because Q could not rise moves nothing).

A model that maximizes Q in closed form over some of its sites given the others
(``closed_form_sites``, ``conditional_m_step``) gets expectation conditional maximization (ECM,
Meng & Rubin 1993): each M-step first sets those sites to their conditional maximum, then climbs
the rest by gradient; both moves raise Q, so the guarantee holds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field
from torch import Tensor
from torch.distributions import biject_to
from torch.distributions.transforms import Transform

from ..errors import UserError
from ..models.base import ClosedFormEM, LatentModel, Params
from .base import FitResult, Options, Report, StepInfo

if TYPE_CHECKING:
    from .em import EMRun

__all__ = ["GEMOptions", "GradientMStep", "MStepKind", "check_gradient_em", "fit_gradient", "m_step_kind"]

PENALTY = 1e6  # per point: what a trial θ outside the model's domain costs the line search

MStepKind = Literal["closed_form", "ecm", "gradient"]


class GEMOptions(Options):
    """The M-step options of batch ``em``."""

    # closed_form: the model's exact M-step; ecm: the model's closed-form blocks, gradient steps
    # for the other sites; gradient: generalized EM on every site; null: closed_form where the
    # model has one, else ecm where it has closed-form blocks, else gradient
    m_step: MStepKind | None = None
    m_step_optimizer: Literal["lbfgs", "adam"] = "lbfgs"
    m_step_iters: int = Field(20, ge=1, le=100_000)  # optimizer iterations per gradient M-step
    # null: 1 for lbfgs (its line search scales the step), 0.05 for adam
    m_step_lr: float | None = Field(None, gt=0)


def m_step_kind(model: LatentModel, options: GEMOptions) -> MStepKind:
    """The M-step a fit of ``model`` uses under ``options``."""
    if options.m_step is not None:
        return options.m_step
    if isinstance(model, ClosedFormEM):
        return "closed_form"
    return "ecm" if model.closed_form_sites else "gradient"


def check_gradient_em(model: LatentModel, backend: str, kind: MStepKind = "gradient") -> dict[str, Transform]:
    """The map from unconstrained coordinates onto each global site's support, by site, or the
    ``UserError`` that says why generalized EM (or ECM, ``kind``) cannot fit ``model``."""
    if kind == "ecm" and not model.closed_form_sites:
        raise UserError(
            f"backends.{backend}.m_step: ecm needs a model with closed-form blocks (closed_form_sites), "
            f"but model {model.name!r} has none. Set m_step: gradient, or leave it unset."
        )
    if not model.enumerated_sites():
        raise UserError(
            f"backends.{backend}: model {model.name!r} declares no discrete latent site enumerated in "
            "the plate 'data' (an assignment marked with pyro.infer.config_enumerate), so EM has no "
            "E-step: there are no responsibilities to compute. Declare the assignment with "
            "@config_enumerate, or use the map, svi or mcmc backend."
        )
    transforms: dict[str, Transform] = {}
    for name, support in model.global_supports().items():
        try:
            transforms[name] = biject_to(support)
        except NotImplementedError:
            raise UserError(
                f"backends.{backend}: site {name!r} of model {model.name!r} has support {support}, which "
                "has no unconstrained coordinates for a gradient M-step. Use the mcmc backend."
            ) from None
    return transforms


class GradientMStep:
    """Raises Q(θ) per point for fixed responsibilities, from θ: the closed-form blocks of ECM
    (``closed_form``) to their conditional maximum, then the other sites by gradient steps in
    unconstrained coordinates."""

    def __init__(
        self,
        model: LatentModel,
        x: Tensor,
        transforms: Mapping[str, Transform],
        options: GEMOptions,
        closed_form: bool = False,
    ) -> None:
        self.model, self.x, self.transforms = model, x, transforms
        self.blocks = tuple(model.closed_form_sites) if closed_form else ()
        self.optimizer = options.m_step_optimizer
        self.iters = options.m_step_iters
        self.lr = options.m_step_lr or (1.0 if self.optimizer == "lbfgs" else 0.05)
        self.eps = torch.finfo(x.dtype).eps

    def conditional(self, params: Params, resp: Tensor) -> Params:
        """θ with the closed-form blocks at their maximum given the other sites."""
        if not self.blocks:
            return params
        with torch.no_grad():
            update = self.model.conditional_m_step(self.x, resp, params)
        sites = self.model.to_sites(params)
        sites.update({name: update[name].to(self.x) for name in self.blocks})
        return {name: value.detach() for name, value in self.model.from_sites(sites).items()}

    def q(self, resp: Tensor, sites: Mapping[str, Tensor]) -> Tensor | None:
        """Q(θ) / N at site values, or None outside the model's domain."""
        try:
            theta = self.model.from_sites(sites)
            value = (resp * self.model.log_joint(self.x, theta)).sum()
            if self.model.has_prior:
                value = value + self.model.log_prior(theta)
        except (torch.linalg.LinAlgError, ValueError):  # e.g. a covariance that rounds to singular
            return None
        value = value / self.x.shape[0]
        return value if bool(torch.isfinite(value)) else None

    def __call__(self, params: Params, resp: Tensor) -> tuple[Params, bool]:
        """θ after the M-step and whether the gradient climb raised Q (else θ after the closed-form
        blocks alone, which never lower it)."""
        params = self.conditional(params, resp)
        sites = self.model.to_sites({name: value.detach() for name, value in params.items()})
        names = [name for name in sites if name not in self.blocks]
        if not names:
            return params, True
        free = [
            self.transforms[name].inv(sites[name]).detach().clone().requires_grad_(True) for name in names
        ]

        def q(values: list[Tensor]) -> Tensor | None:
            """Q(θ) / N at unconstrained values of the climbed sites."""
            moved = {name: self.transforms[name](u) for name, u in zip(names, values, strict=True)}
            return self.q(resp, {**sites, **moved})

        with torch.no_grad():
            start = q(free)
        if start is None:
            return params, False
        climb = self._lbfgs if self.optimizer == "lbfgs" else self._adam
        found = climb(q, free, float(start))
        with torch.no_grad():
            reached = q(found)
            if reached is None or not float(reached) > float(start):
                return params, False
            moved = {name: self.transforms[name](u) for name, u in zip(names, found, strict=True)}
            theta = self.model.from_sites({**sites, **moved})
        return {name: value.detach() for name, value in theta.items()}, True

    def _lbfgs(
        self, q: Callable[[list[Tensor]], Tensor | None], free: list[Tensor], start: float
    ) -> list[Tensor]:
        optimizer = torch.optim.LBFGS(
            free,
            lr=self.lr,
            max_iter=self.iters,
            line_search_fn="strong_wolfe",
            tolerance_grad=self.eps**0.5 / 10,
            tolerance_change=10 * self.eps,
        )

        def closure() -> Tensor:
            optimizer.zero_grad()
            value = q(free)
            if value is None:  # a finite penalty keeps the line search's interpolation finite
                for u in free:
                    u.grad = torch.zeros_like(u)
                return free[0].new_tensor(PENALTY - start)
            loss = -value
            loss.backward()
            for u in free:
                assert u.grad is not None
                torch.nan_to_num_(u.grad, nan=0.0, posinf=0.0, neginf=0.0)
            return loss.detach()

        optimizer.step(closure)
        return [u.detach() for u in free]

    def _adam(
        self, q: Callable[[list[Tensor]], Tensor | None], free: list[Tensor], start: float
    ) -> list[Tensor]:
        """``iters`` Adam steps; the best iterate, since Adam's need not be the last."""
        optimizer = torch.optim.Adam(free, lr=self.lr)
        best, best_value = [u.detach().clone() for u in free], start
        for _ in range(self.iters):
            optimizer.zero_grad()
            value = q(free)
            if value is None:
                break
            if float(value.detach()) > best_value:
                best, best_value = [u.detach().clone() for u in free], float(value.detach())
            (-value).backward()
            optimizer.step()
        with torch.no_grad():
            last = q(free)
        if last is not None and float(last) > best_value:
            best = [u.detach().clone() for u in free]
        return best


def fit_gradient(
    model: LatentModel,
    x: Tensor,
    init: Params,
    options: GEMOptions,
    max_iter: int,
    run: EMRun,
    report: Report,
) -> FitResult:
    """Generalized EM from ``init``; ``run`` keeps the clock, the objective and the stopping rule."""
    kind = m_step_kind(model, options)
    transforms = check_gradient_em(model, run.backend, kind)
    unknown = sorted(set(model.to_sites(init)) - set(transforms))
    if unknown:
        raise UserError(
            f"backends.{run.backend}: model {model.name!r} maps its parameters to site(s) {unknown} that "
            "its declaration has no latent global site for. Use the map, svi or mcmc backend."
        )
    climb = GradientMStep(model, x, transforms, options, closed_form=kind == "ecm")
    n = x.shape[0]
    params: Params = {name: value.to(x) for name, value in init.items()}
    converged, rejected, step = False, 0, 0
    for step in range(max_iter + 1):
        try:
            with torch.no_grad():
                log_joint = model.log_joint(x, params)
        except torch.linalg.LinAlgError:
            raise run.singular(step, params) from None
        log_norm = torch.logsumexp(log_joint, dim=1)
        total = float(log_norm.sum(dtype=torch.float64))
        objective = run.objective(total, params, step)
        report(StepInfo(step, run.clock.seconds(), objective, total / n))
        if run.settled(objective):
            converged = True
            break
        if step == max_iter:
            break
        params, rose = climb(params, torch.exp(log_joint - log_norm[:, None]))
        rejected += not rose
    return run.result(params, step, converged, m_step=kind, m_steps_rejected=rejected)
