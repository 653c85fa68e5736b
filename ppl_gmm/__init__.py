"""ppl-gmm: exact EM, MAP and variational inference compared on one Pyro-declared mixture."""

__version__ = "0.1.0"
