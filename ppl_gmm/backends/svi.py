"""SVI: a variational posterior over the global parameters (needs a prior), the assignments
enumerated exactly in the model, or (``local: mean_field``) given their own q(z_n) in the guide,
which relaxes EM's exact E-step into variational EM."""

from __future__ import annotations

import time
from typing import Literal

import pyro
import pyro.distributions as dist
import torch
from pydantic import Field
from pyro import poutine
from pyro.infer.autoguide import (
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
    init_to_value,
)
from torch import Tensor
from torch.distributions import constraints

from ..errors import UserError
from ..evaluate import posterior_moments
from ..models.base import LatentModel, Params
from .base import BACKENDS, Backend, FitError, FitResult, Report, one_line, refuse_sequences
from .pyro_svi import SVIOptions, make_elbo, run_svi

__all__ = ["SVIBackend", "SVIBackendOptions", "GUIDES"]

GUIDES = {
    "normal": AutoNormal,
    "lowrank": AutoLowRankMultivariateNormal,
    "mvn": AutoMultivariateNormal,
}


class SVIBackendOptions(SVIOptions):
    # the ELBO's steps are noisy (Monte Carlo draws of θ), so its means over windows of 100 steps
    # are compared: one calm check stops the fit. On the shipped configs this stops after 200-700
    # steps, within ~0.01 per point of where the ELBO levels off.
    tol: float = Field(1e-4, ge=0)
    patience: int = Field(1, ge=1)
    window: int | None = Field(100, ge=2)
    guide: Literal["normal", "lowrank", "mvn"] = "normal"
    rank: int | None = Field(None, ge=1)  # lowrank: the covariance's rank (default √dim)
    init_scale: float = Field(0.05, gt=0)  # initial posterior scale, unconstrained coordinates
    local: Literal["enumerate", "mean_field"] = "enumerate"
    point_estimate: Literal["posterior_mean", "posterior_median"] = "posterior_mean"
    mean_samples: int = Field(1000, ge=1)  # guide draws for the posterior mean and sd
    elbo_particles: int = Field(100, ge=1)  # particles of the final ELBO estimate


@BACKENDS.register("svi")
class SVIBackend(Backend[SVIBackendOptions]):
    name = "svi"
    options = SVIBackendOptions
    variational = True
    objective_lags = True

    def check(self, model: LatentModel, options: SVIBackendOptions) -> None:
        if options.batch_size is not None:
            refuse_sequences(model, self.name, "mini-batches of rows (batch_size) would cut the sequences")
        if options.local == "mean_field":
            refuse_sequences(
                model, self.name, "local: mean_field gives each row its own q(z), cut from its neighbours"
            )
        if not model.has_prior:
            raise UserError(
                "backends.svi: SVI approximates a posterior, which needs a proper prior over the "
                "parameters; with model.prior: none the prior is flat and improper, so the ELBO "
                "is undefined. Set model.prior: conjugate, or use the map backend for maximum "
                "likelihood by gradient."
            )
        if options.rank is not None and options.guide != "lowrank":
            raise UserError(
                f"backends.svi.rank: only the lowrank guide has a rank, but guide is {options.guide!r}."
            )

    def total_steps(self, options: SVIBackendOptions, n: int | None = None) -> int:
        return options.steps

    def fit(
        self, model: LatentModel, x: Tensor, init: Params, options: SVIBackendOptions, report: Report
    ) -> FitResult:
        pyro.clear_param_store()  # guides read their parameters from the global store
        sites = model.to_sites(init)
        kwargs = {"init_loc_fn": init_to_value(values=sites), "init_scale": options.init_scale}
        if options.guide == "lowrank" and options.rank is not None:
            kwargs["rank"] = options.rank
        global_guide = GUIDES[options.guide](poutine.block(model.model, expose=list(sites)), **kwargs)
        guide = global_guide
        if options.local == "mean_field":
            start = torch.softmax(model.log_joint(x, init), dim=1).detach()

            def guide(x: Tensor, batch_size: int | None = None) -> None:
                global_guide(x)
                probs = pyro.param("assignment_probs", start, constraint=constraints.simplex)
                subsample = None if batch_size is None or batch_size >= x.shape[0] else batch_size
                with pyro.plate("data", x.shape[0], subsample_size=subsample) as index:
                    pyro.sample("z", dist.Categorical(probs[index]), infer={"enumerate": "parallel"})

        def median() -> Params:
            return model.from_sites(global_guide.median(x))

        fit = run_svi(model, guide, x, options, median, report, self.name)
        n_steps = fit.n_steps
        # the fitted guide, by param-store name and constrained: a user rebuilds the same guide,
        # runs it once (which declares each parameter's constraint), sets each entry
        # (pyro.get_param_store()[name] = value) and runs it again to load them
        fitted = {name: value.detach().clone() for name, value in pyro.get_param_store().items()}
        try:
            with torch.no_grad():
                draws = [global_guide(x) for _ in range(options.mean_samples)]
                if options.point_estimate == "posterior_median":
                    params = median()
                else:
                    means = {name: torch.stack([d[name] for d in draws]).mean(0) for name in sites}
                    params = model.from_sites(means)
                moments = posterior_moments(model, [model.from_sites(d) for d in draws], init)
                began = time.perf_counter()
                loss = make_elbo(model, options, options.elbo_particles).loss(model.model, guide, x)
                elbo_seconds = time.perf_counter() - began
        except (ValueError, torch.linalg.LinAlgError) as exc:  # Pyro's checks, a singular draw
            raise FitError(
                f"step {n_steps}: the fitted posterior's draws are invalid ({one_line(exc)}). Lower "
                "backends.svi.init_scale or backends.svi.lr, or set data.standardize: true."
            ) from None
        return FitResult(
            params={name: value.detach() for name, value in params.items()},
            n_steps=n_steps,
            converged=fit.converged,
            fit_seconds=fit.fit_seconds,
            point_estimate=options.point_estimate,
            elbo=-loss / x.shape[0],
            extras={"elbo_seconds": elbo_seconds, **fit.extras},
            tensors={"posterior": moments, "guide": fitted},
        )
