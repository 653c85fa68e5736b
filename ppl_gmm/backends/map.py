"""MAP (or, without a prior, maximum likelihood) by gradient: Pyro SVI with an ``AutoDelta`` guide
over the model's global sites, the assignments enumerated out by ``TraceEnum_ELBO``."""

from __future__ import annotations

import pyro
from pydantic import Field
from pyro import poutine
from pyro.infer.autoguide import AutoDelta, init_to_value
from torch import Tensor

from ..models.base import LatentModel, Params
from .base import BACKENDS, Backend, FitResult, Report, refuse_sequences
from .pyro_svi import SVIOptions, run_svi

__all__ = ["MAP", "MAPOptions"]


class MAPOptions(SVIOptions):
    tol: float = Field(1e-8, ge=0)  # the loss is deterministic here, so a relative tol is safe


@BACKENDS.register("map")
class MAP(Backend[MAPOptions]):
    name = "map"
    options = MAPOptions
    objective_lags = True

    def check(self, model: LatentModel, options: MAPOptions) -> None:
        if options.batch_size is not None:
            refuse_sequences(model, self.name, "mini-batches of rows (batch_size) would cut the sequences")
        model.check_mode("MAP")

    def total_steps(self, options: MAPOptions, n: int | None = None) -> int:
        return options.steps

    def objective_is_target(self, options: MAPOptions) -> bool:
        # AutoDelta's q has no entropy, so the negative loss is log p(x, θ): with all points in
        # each step, exactly the log posterior (flat prior: log-likelihood) of the estimate
        return options.batch_size is None

    def fit(
        self, model: LatentModel, x: Tensor, init: Params, options: MAPOptions, report: Report
    ) -> FitResult:
        pyro.clear_param_store()  # guides read their parameters from the global store
        sites = model.to_sites(init)
        guide = AutoDelta(
            poutine.block(model.model, expose=list(sites)), init_loc_fn=init_to_value(values=sites)
        )

        def point_estimate() -> Params:
            return model.from_sites(guide.median(x))

        fit = run_svi(model, guide, x, options, point_estimate, report, self.name)
        params = {name: value.detach() for name, value in point_estimate().items()}
        return FitResult(
            params,
            fit.n_steps,
            fit.converged,
            fit.fit_seconds,
            "map" if model.has_prior else "mle",
            extras=fit.extras,
        )
