"""A mixture of independent exponentials for positive data: the example of the README's "Adding
a model". Params: ``weights`` (K), ``rates`` (K, D); with ``prior: conjugate`` a Dirichlet(1) on
the weights and Gamma(2, 1) on each rate."""

from typing import Literal

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import config_enumerate
from pyro.ops.indexing import Vindex
from torch.distributions import constraints

from ppl_gmm.config import ModelOptions
from ppl_gmm.errors import UserError
from ppl_gmm.models import ExpFamilyEM, Flat, LatentModel


class ExponentialOptions(ModelOptions):
    name: Literal["exponential_mixture"] = "exponential_mixture"


class ExponentialMixture(ExpFamilyEM, LatentModel):
    name = "exponential_mixture"
    options = ExponentialOptions
    component_axes = {"weights": (0,), "rates": (0,)}
    pivot = "rates"
    standardizable = False  # z-scores are not positive

    def __init__(self, k, dim, has_prior):
        self.k, self.dim, self._has_prior = k, dim, has_prior

    @classmethod
    def from_config(cls, cfg, x):
        return cls(cfg.k, x.shape[1], cfg.prior == "conjugate")

    @property
    def has_prior(self):
        return self._has_prior

    @config_enumerate
    def model(self, x=None, n=None, batch_size=None):
        n = x.shape[0] if x is not None else n
        one = torch.ones((), dtype=x.dtype if x is not None else torch.get_default_dtype())
        if self.has_prior:
            weights_prior = dist.Dirichlet(one.expand(self.k))
            rates_prior = dist.Gamma(2 * one, one).expand((self.k, self.dim)).to_event(1)
        else:
            weights_prior = Flat(constraints.simplex, (), (self.k,))
            rates_prior = Flat(constraints.positive, (self.k,), (self.dim,))
        weights = pyro.sample("weights", weights_prior)
        with pyro.plate("components", self.k):
            rates = pyro.sample("rates", rates_prior)
        subsample = None if batch_size is None or batch_size >= n else batch_size
        with pyro.plate("data", n, subsample_size=subsample) as index:
            x = x[index] if x is not None and subsample is not None else x
            z = pyro.sample("z", dist.Categorical(weights))
            return pyro.sample("x", dist.Exponential(Vindex(rates)[..., z, :]).to_event(1), obs=x)

    def param_shapes(self):
        return {"weights": (self.k,), "rates": (self.k, self.dim)}

    def sample_truth(self, rng, separation):
        weights = rng.dirichlet(np.full(self.k, 10.0))
        rates = np.exp(rng.uniform(0.0, np.log(separation), size=(self.k, self.dim)))
        return {"weights": torch.from_numpy(weights), "rates": torch.from_numpy(rates)}

    @classmethod
    def check_data(cls, x, where):
        if (x <= 0).any():
            raise UserError(f"{where}: an exponential mixture needs positive values. Use model.name: gmm.")

    # closed-form EM (optional): T(x) = x, η = -λ, log π - A(η) = log π + Σ log λ
    def sufficient(self, rows):
        return rows

    def natural(self, params):
        rates = params["rates"]
        return -rates, torch.log(params["weights"]) + torch.log(rates).sum(1)

    def m_step_moments(self, nk, sums, use_prior):
        if self.has_prior and use_prior:  # the mode under Dirichlet(1) and Gamma(2, 1)
            return {"weights": nk / nk.sum(), "rates": (nk[:, None] + 1.0) / (sums + 1.0)}
        return {"weights": nk / nk.sum(), "rates": nk[:, None] / sums}
