"""User-level differential privacy for the federated stages (docs/federation.md, "Differential privacy"):
DP-FedAvg with Flower's server-side fixed-clipping strategy wrapper (each client's whole update clipped to an L2
norm, Gaussian noise added to the average), and the privacy spent, computed with Google's ``dp_accounting`` RDP
accountant for the sampling the server actually does.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, Strategy

from fedp2eft.errors import FedP2EFTError


@dataclass(frozen=True)
class DPConfig:
    """``noise_multiplier`` z: noise std on the sum of clipped updates = z x ``clipping_norm``; ε is reported at
    ``delta``."""

    noise_multiplier: float
    clipping_norm: float
    delta: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("noise_multiplier", "clipping_norm"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise FedP2EFTError(f"privacy.dp.{name} must be a positive number, got {value!r}")
        if not 0 < self.delta < 1:
            raise FedP2EFTError(f"privacy.dp.delta must be between 0 and 1 (e.g. 1e-5), got {self.delta!r}")

    @classmethod
    def from_dict(cls, raw: dict) -> DPConfig:
        unknown = sorted(set(raw) - {"noise_multiplier", "clipping_norm", "delta"})
        if unknown:
            raise FedP2EFTError(f"privacy.dp: unknown key(s) {unknown}; known: noise_multiplier, clipping_norm, delta")
        try:
            return cls(**raw)
        except TypeError as error:
            raise FedP2EFTError(f"privacy.dp needs noise_multiplier and clipping_norm (and optionally delta): "
                                f"{error}") from error


def private_strategy(strategy: Strategy, dp: DPConfig, clients_per_round: int) -> Strategy:
    """``strategy`` behind Flower's server-side fixed clipping: replies are clipped against the round's global
    weights (``current_arrays``, set by ``aggregation.aggregate``), averaged with equal weights, and noised with
    std z x C / m for m sampled clients. Its noise comes from NumPy's unseeded generator on purpose: noise drawn
    from a seed in the run's config could be recomputed and subtracted, so a resumed DP run continues with fresh
    noise instead of repeating the interrupted round bit for bit."""
    return DifferentialPrivacyServerSideFixedClipping(strategy, dp.noise_multiplier, dp.clipping_norm,
                                                      clients_per_round)


def epsilon_spent(dp: DPConfig, rounds: int, population: int, sample_size: int) -> float:
    """ε at ``dp.delta`` after ``rounds`` releases, each from ``sample_size`` clients drawn uniformly without
    replacement from ``population`` (what ``server_app.sample_clients`` does). Fixed-size samples make
    neighbouring federations differ by replacing one client, whose clipped update can move the sum by 2C, so the
    accountant sees a noise multiplier of z / 2 (RDP accounting, ``dp_accounting``)."""
    import dp_accounting
    from dp_accounting import rdp

    if rounds == 0:
        return 0.0
    logging.getLogger("absl").setLevel(logging.ERROR)  # it reports orders it skips as warnings
    accountant = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    gaussian = dp_accounting.GaussianDpEvent(dp.noise_multiplier / 2)
    event = (gaussian if sample_size >= population else
             dp_accounting.SampledWithoutReplacementDpEvent(population, sample_size, gaussian))
    accountant.compose(event, rounds)
    return float(accountant.get_epsilon(dp.delta))
