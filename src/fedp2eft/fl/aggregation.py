"""Aggregation through Flower's own strategy objects (``flwr.serverapp.strategy``).

The server loop (``server_app.py``) samples clients, vets every reply and checkpoints; what the vetted replies
become is the strategy's ``aggregate_train``. A reply reaches the strategy holding only what it averages: the
weights and the example count that weights them (client metrics are reported by the loop, so a client that
drops a non-finite metric cannot make the strategy refuse the round).
"""

from __future__ import annotations

from flwr.app import Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg, Strategy

from fedp2eft.errors import FedP2EFTError
from fedp2eft.fl import protocol as P
from fedp2eft.fl.privacy import DPConfig, private_strategy
from fedp2eft.fl.weights import Weights, from_record, to_record


def _fedavg() -> Strategy:
    return FedAvg(weighted_by_key=P.NUM_EXAMPLES, arrayrecord_key=P.WEIGHTS, configrecord_key=P.CONFIG)


# The strategies a job may name. Each must aggregate from the replies alone: strategies that keep server-side
# optimizer state between rounds (FedAdam, FedAvgM, ...) would need that state checkpointed with the run.
STRATEGIES = {"fedavg": _fedavg}


def make_strategy(name: str, dp: DPConfig | None = None, clients_per_round: int = 1) -> Strategy:
    """The named strategy; with ``dp``, behind Flower's DP fixed-clipping wrapper (``privacy.py``)."""
    if name not in STRATEGIES:
        raise FedP2EFTError(f"unknown aggregation strategy {name!r}; use one of {sorted(STRATEGIES)}")
    strategy = STRATEGIES[name]()
    return strategy if dp is None else private_strategy(strategy, dp, clients_per_round)


def is_private(strategy: Strategy) -> bool:
    return isinstance(strategy, DifferentialPrivacyServerSideFixedClipping)


def strip_to_aggregate(reply: Message, num_examples: int, strategy: Strategy) -> None:
    """Leave in ``reply`` only its weights and the weight it gets in the average, the strategy's whole input:
    its example count, or 1 under DP (DP-FedAvg's noise is calibrated to an average of equally weighted clipped
    updates; a client with more data must not count more)."""
    weight = 1 if is_private(strategy) else num_examples
    reply.content = RecordDict({P.WEIGHTS: reply.content.array_records[P.WEIGHTS],
                                P.METRICS: MetricRecord({P.NUM_EXAMPLES: weight})})


def aggregate(strategy: Strategy, server_round: int, reference: Weights, replies: list[Message]) -> Weights:
    """The strategy's aggregate of ``replies`` (in this order, so the float sums are reproducible), in the
    reference weights' dtypes; tensors that are not floating point (step counters, index buffers) keep the
    reference value instead of being averaged."""
    if is_private(strategy):
        strategy.current_arrays = to_record(reference)  # what each update is clipped against
    arrays, _ = strategy.aggregate_train(server_round, replies)
    if arrays is None:
        raise FedP2EFTError(f"round {server_round}: the aggregation strategy returned nothing")
    averaged = from_record(arrays)
    return {name: averaged[name].to(ref.dtype) if ref.is_floating_point() else ref.clone()
            for name, ref in reference.items()}
