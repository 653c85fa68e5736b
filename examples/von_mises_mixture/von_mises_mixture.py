"""A mixture of independent von Mises distributions for angles (radians, within [-π, π]): a model
declared only in Pyro, which ``em`` fits by ECM. Params: ``weights`` (K), ``locs`` (K, D) mean
directions in [-π, π), ``concentrations`` (K, D).

With ``prior: conjugate``: Dirichlet(1) on the weights (flat on the simplex), von Mises(0, 0.1) on
each mean direction (proper, nearly uniform on the circle) and Gamma(2, 0.1) on each
concentration (mode 10, mean 20: weak, and zero density at κ = 0).

No closed-form M-step: the concentration's maximum solves A(κ) = I1(κ) / I0(κ) = R̄, which has no
closed form, so ``em`` climbs κ by gradient. Given κ, the weights and the mean directions do have
one (``conditional_m_step``): ECM's closed-form blocks.
"""

import math
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
from ppl_gmm.models import Flat, LatentModel

WEIGHT_PRIOR = 1.0  # Dirichlet concentration: flat on the simplex, so the weights' mode is nk / N
LOC_PRIOR = 0.1  # von Mises(0, κ0) on each mean direction: proper, within ±10 % of uniform
CONC_SHAPE, CONC_RATE = 2.0, 0.1  # Gamma on each κ: mode (2 - 1) / 0.1 = 10, sd 14


class VonMises(dist.VonMises):
    """Pyro's von Mises with an exact log-normalizer: log I0(κ) = log i0e(κ) + κ. torch's
    polynomial approximation is off by up to ~3e-7 in the log density and its κ-gradient, which
    moves the concentration's maximum by ~1e-6 to 3e-6 (κ from 3 to 12)."""

    def log_prob(self, value):
        kappa = self.concentration
        return kappa * (torch.cos(value - self.loc) - 1.0) - torch.log(2 * math.pi * torch.special.i0e(kappa))


class VonMisesOptions(ModelOptions):
    name: Literal["von_mises_mixture"] = "von_mises_mixture"


class VonMisesMixture(LatentModel):
    name = "von_mises_mixture"
    options = VonMisesOptions
    component_axes = {"weights": (0,), "locs": (0,), "concentrations": (0,)}
    pivot = "locs"
    standardizable = False  # z-scores are not angles
    closed_form_sites = ("weights", "locs")

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
            weights_prior = dist.Dirichlet(WEIGHT_PRIOR * one.expand(self.k))
            locs_prior = VonMises(0 * one, LOC_PRIOR * one).expand((self.k, self.dim)).to_event(1)
            conc_prior = dist.Gamma(CONC_SHAPE * one, CONC_RATE * one).expand((self.k, self.dim)).to_event(1)
        else:
            weights_prior = Flat(constraints.simplex, (), (self.k,))
            locs_prior = Flat(constraints.real, (self.k,), (self.dim,))
            conc_prior = Flat(constraints.positive, (self.k,), (self.dim,))
        weights = pyro.sample("weights", weights_prior)
        with pyro.plate("components", self.k):
            locs = pyro.sample("locs", locs_prior)
            concentrations = pyro.sample("concentrations", conc_prior)
        subsample = None if batch_size is None or batch_size >= n else batch_size
        with pyro.plate("data", n, subsample_size=subsample) as index:
            x = x[index] if x is not None and subsample is not None else x
            z = pyro.sample("z", dist.Categorical(weights))
            component = VonMises(Vindex(locs)[..., z, :], Vindex(concentrations)[..., z, :])
            return pyro.sample("x", component.to_event(1), obs=x)

    def param_shapes(self):
        return {"weights": (self.k,), "locs": (self.k, self.dim), "concentrations": (self.k, self.dim)}

    def sample_truth(self, rng, separation):
        """Per feature, the K directions evenly spaced round the circle (randomly rotated and
        ordered), and κ such that the gap 2π/K is about ``separation`` angular standard deviations
        (1/√κ)."""
        gap = 2 * math.pi / self.k
        rotation = rng.uniform(-math.pi, math.pi, size=self.dim)
        order = np.stack([rng.permutation(self.k) for _ in range(self.dim)], axis=1)
        locs = _wrap(torch.from_numpy(rotation + gap * order))
        concentrations = (separation / gap) ** 2 * rng.uniform(0.7, 1.4, size=(self.k, self.dim))
        weights = rng.dirichlet(np.full(self.k, 10.0))
        return {
            "weights": torch.from_numpy(weights),
            "locs": locs,
            "concentrations": torch.from_numpy(concentrations),
        }

    @classmethod
    def check_data(cls, x, where):
        outside = np.abs(x) > math.pi
        if outside.any():
            raise UserError(
                f"{where}: expected angles in radians within [-π, π] for a von Mises mixture, but found "
                f"{float(x[outside][0]):g}. Wrap them (numpy.angle(numpy.exp(1j * x))), after "
                "numpy.deg2rad for degrees."
            )

    def project(self, params):
        """Weights normalized; mean directions wrapped into [-π, π) (the density is periodic)."""
        out = dict(super().project(params))
        out["locs"] = _wrap(out["locs"])
        return out

    def conditional_m_step(self, x, resp, params):
        """ECM's closed-form blocks given the concentrations κ (K, D): the weights' maximum (the
        mode under Dirichlet(1) is the same), and each mean direction μ maximizing
        κ Σ_n r_nk cos(x_n - μ) + κ0 cos μ, i.e. atan2(κ Σ r sin x, κ Σ r cos x + κ0)."""
        nk = resp.sum(0)
        alpha = WEIGHT_PRIOR - 1.0 if self.has_prior else 0.0
        weights = (nk + alpha) / (nk.sum() + self.k * alpha)
        sines, cosines = resp.T @ torch.sin(x), resp.T @ torch.cos(x)
        if self.has_prior:
            kappa = params["concentrations"]
            sines, cosines = kappa * sines, kappa * cosines + LOC_PRIOR
        return {"weights": weights, "locs": torch.atan2(sines, cosines)}

    def component_features(self, params):
        """(cos μ, sin μ) of the directions, so that matching respects the circle: (K, 2D)."""
        locs = params["locs"]
        return torch.cat([torch.cos(locs), torch.sin(locs)], dim=1)

    def init_from_points(self, x, index, spread):
        """Equal weights, directions at the points x[index], concentrations from ``spread``."""
        return self.project(
            {
                "weights": torch.full((self.k,), 1.0 / self.k, dtype=x.dtype, device=x.device),
                "locs": x[index].clone(),
                "concentrations": spread["concentrations"].to(x).clone(),
            }
        )


def _wrap(angles):
    """Angles moved into [-π, π)."""
    return torch.remainder(angles + math.pi, 2 * math.pi) - math.pi
