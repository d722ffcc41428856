"""Aggregation through Flower's own strategy objects (``flwr.serverapp.strategy``).

The server loop (``server_app.py``) samples clients, vets every reply and checkpoints; what the vetted replies
become is the strategy's ``aggregate_train``. A reply reaches the strategy holding only what it averages: the
weights and the example count that weights them (client metrics are reported by the loop, so a client that
drops a non-finite metric cannot make the strategy refuse the round), and the client it came from.

A task that aggregates in its own way (``core.federation.AggregatingTask``: HetLoRA, FlexLoRA) becomes a strategy
too (``TaskStrategy``), so the loop treats it like FedAvg; it also decides what each client receives
(``weights_for``).
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg, Strategy

from fedp2eft.core.federation import AggregatingTask, FederatedTask, Reply, aggregates_itself
from fedp2eft.errors import FedP2EFTError
from fedp2eft.fl import protocol as P
from fedp2eft.fl.privacy import DPConfig, private_strategy
from fedp2eft.fl.weights import Weights, from_record, to_record


def _fedavg() -> Strategy:
    return FedAvg(weighted_by_key=P.NUM_EXAMPLES, arrayrecord_key=P.WEIGHTS, configrecord_key=P.CONFIG)


# The strategies a job may name. Each must aggregate from the replies alone: strategies that keep server-side
# optimizer state between rounds (FedAdam, FedAvgM, ...) would need that state checkpointed with the run.
STRATEGIES = {"fedavg": _fedavg}


class TaskStrategy(FedAvg):
    """An ``AggregatingTask``'s own server rule as a Flower strategy: ``aggregate_train`` hands the task the current
    global weights and every reply with its client and example count."""

    def __init__(self, task: AggregatingTask) -> None:
        super().__init__(weighted_by_key=P.NUM_EXAMPLES, arrayrecord_key=P.WEIGHTS, configrecord_key=P.CONFIG)
        self.task = task
        self.current_arrays: ArrayRecord | None = None  # the round's incoming global weights (set by ``aggregate``)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord, MetricRecord]:
        combined = []
        for reply in replies:
            metrics = reply.content.metric_records[P.METRICS]
            combined.append(Reply(int(metrics[P.CLIENT_INDEX]), from_record(reply.content.array_records[P.WEIGHTS]),
                                  int(metrics[P.NUM_EXAMPLES])))
        return to_record(self.task.aggregate(from_record(self.current_arrays), combined, server_round)), \
            MetricRecord({})


def make_strategy(name: str, dp: DPConfig | None = None, clients_per_round: int = 1,
                  task: FederatedTask | None = None) -> Strategy:
    """The named strategy; with ``dp``, behind Flower's DP fixed-clipping wrapper (``privacy.py``). A ``task`` that
    aggregates in its own way is its own strategy, whatever the name (and refuses DP, which assumes an average)."""
    if task is not None and aggregates_itself(task):
        if dp is not None:
            raise FedP2EFTError(f"{type(task).__name__} combines its clients' updates in its own way, not by an "
                                "average of clipped updates, so differential privacy cannot be added to it; run "
                                "it without dp")
        return TaskStrategy(task)
    if name not in STRATEGIES:
        raise FedP2EFTError(f"unknown aggregation strategy {name!r}; use one of {sorted(STRATEGIES)}")
    strategy = STRATEGIES[name]()
    return strategy if dp is None else private_strategy(strategy, dp, clients_per_round)


def is_private(strategy: Strategy) -> bool:
    return isinstance(strategy, DifferentialPrivacyServerSideFixedClipping)


def weights_for(strategy: Strategy, weights: Weights, client: int) -> Weights:
    """What ``client`` receives this round: the global weights, or its share of them under a ``TaskStrategy``."""
    return strategy.task.client_weights(weights, client) if isinstance(strategy, TaskStrategy) else weights


def strip_to_aggregate(reply: Message, num_examples: int, strategy: Strategy, client: int) -> None:
    """Leave in ``reply`` only its weights, the weight it gets in the average and its client, the strategy's
    whole input: its example count, or 1 under DP (DP-FedAvg's noise is calibrated to an average of equally
    weighted clipped updates; a client with more data must not count more)."""
    weight = 1 if is_private(strategy) else num_examples
    reply.content = RecordDict({P.WEIGHTS: reply.content.array_records[P.WEIGHTS],
                                P.METRICS: MetricRecord({P.NUM_EXAMPLES: weight, P.CLIENT_INDEX: client})})


def aggregate(strategy: Strategy, server_round: int, reference: Weights, replies: list[Message]) -> Weights:
    """The strategy's aggregate of ``replies`` (in this order, so the float sums are reproducible), in the
    reference weights' dtypes; tensors that are not floating point (step counters, index buffers) keep the
    reference value instead of being averaged."""
    if is_private(strategy) or isinstance(strategy, TaskStrategy):
        strategy.current_arrays = to_record(reference)  # what each update is clipped against, or combined with
    arrays, _ = strategy.aggregate_train(server_round, replies)
    if arrays is None:
        raise FedP2EFTError(f"round {server_round}: the aggregation strategy returned nothing")
    averaged = from_record(arrays)
    return {name: averaged[name].to(ref.dtype) if ref.is_floating_point() else ref.clone()
            for name, ref in reference.items()}
