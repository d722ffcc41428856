"""Secure aggregation of the federated stages with SecAgg+ (Bell et al., CCS 2020), run by Flower's own
``SecAggPlusWorkflow`` on the server and ``secaggplus_mod`` on the clients (docs/federation.md, "Secure
aggregation").

Each sampled client sends its update (its trained weights minus the round's global weights) quantized, weighted by
its example count and masked with pairwise and private masks; the server sums the masked vectors, recovers the masks
of the clients that answered (and of those that dropped out, from the shares of their neighbours) and learns only
the weighted average. What the server still sees of a client: its example count and its scalar training metrics
(loss, time), never a tensor of its update.

The workflow speaks Flower's legacy records (``FitIns``/``FitRes``): ``RoundAdapter`` is the legacy strategy that
hands it the round's sampled clients and takes back the average, and ``encode_update``/``decode_instructions`` are
the client side of that format.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

from fedp2eft.errors import FedP2EFTError
from fedp2eft.fl import protocol as P
from fedp2eft.fl.weights import Weights, update_problem

FITINS_CONFIG = "fitins.config"  # the legacy record a secure round's training instructions travel in


@dataclass(frozen=True)
class SecAggConfig:
    """SecAgg+ settings. ``num_shares``: how many clients (a count, or a fraction of the round's sample) hold a
    share of each client's secrets; ``reconstruction_threshold``: how many shares rebuild one (a count, or a
    fraction of ``num_shares``), so it is also the fewest clients of a neighbourhood that must reach the last stage.
    Every entry of a client's update must lie within ±``clipping_range``; ``quantization_range`` levels span that
    interval, and a client's update is scaled by its example count over ``max_weight`` (its weight, at most 1)
    before it is quantized, so an entry of the average is off by at most ``error_bound`` (stochastic rounding).
    Updates of one round move weights by far less than 1, so the defaults (range ±1, 2**24 levels) keep that
    error near 1e-7 x max_weight / mean example count; a client whose update leaves the range fails with a
    message rather than being clipped."""

    num_shares: int | float = 1.0
    reconstruction_threshold: int | float = 0.5
    clipping_range: float = 1.0
    quantization_range: int = 2**24
    max_weight: float = 1000.0

    def __post_init__(self) -> None:
        for name in ("num_shares", "reconstruction_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise FedP2EFTError(f"privacy.secagg.{name} must be a positive count or a fraction, got {value!r}")
        if isinstance(self.num_shares, float) and self.num_shares > 1:
            raise FedP2EFTError(f"privacy.secagg.num_shares as a fraction must be at most 1, got {self.num_shares}")
        if isinstance(self.num_shares, int) and self.num_shares < 3:
            raise FedP2EFTError(f"privacy.secagg.num_shares as a count must be at least 3 (or a fraction such as "
                                f"1.0: every sampled client), got {self.num_shares}")
        if isinstance(self.reconstruction_threshold, float) and self.reconstruction_threshold > 1:
            raise FedP2EFTError("privacy.secagg.reconstruction_threshold as a fraction must be at most 1, got "
                                f"{self.reconstruction_threshold}")
        if isinstance(self.reconstruction_threshold, int) and isinstance(self.num_shares, int) \
                and not 2 <= self.reconstruction_threshold < self.num_shares:
            raise FedP2EFTError(f"privacy.secagg.reconstruction_threshold ({self.reconstruction_threshold}) must be "
                                f"at least 2 and below num_shares ({self.num_shares})")
        for name in ("clipping_range", "max_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise FedP2EFTError(f"privacy.secagg.{name} must be a positive number, got {value!r}")
        if isinstance(self.quantization_range, bool) or not isinstance(self.quantization_range, int) \
                or not 2 <= self.quantization_range < 2**32:
            raise FedP2EFTError("privacy.secagg.quantization_range must be a whole number between 2 and 2**32 "
                                f"(the masks live modulo 2**32), got {self.quantization_range!r}")

    @classmethod
    def from_dict(cls, raw: dict) -> SecAggConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise FedP2EFTError(f"privacy.secagg: unknown key(s) {unknown}; known: {', '.join(sorted(known))}")
        return cls(**raw)

    def shares_and_threshold(self, sample: int) -> tuple[int, int]:
        """The number of shares and the threshold for a round of ``sample`` clients (the workflow's own rule)."""
        if isinstance(self.num_shares, float):
            shares = round(self.num_shares * sample)
            shares += shares < sample and shares % 2 == 0
            shares = sample if shares <= 2 else shares
        else:
            shares = self.num_shares
        if isinstance(self.reconstruction_threshold, float):
            return shares, max(2, round(self.reconstruction_threshold * shares))
        return shares, self.reconstruction_threshold

    def error_bound(self, example_counts: list[int]) -> float:
        """The largest error of one entry of the average over clients with these example counts: each masked
        sum term rounds to a step of 2·clipping_range / quantization_range, and the sum is divided by the total
        weight Σ n_i / max_weight."""
        step = 2 * self.clipping_range / self.quantization_range
        return len(example_counts) * step * self.max_weight / sum(example_counts)

    def check_sample(self, clients_per_round: int, min_clients: int) -> None:
        """Refuse, before any round, a sample the protocol cannot run with."""
        if clients_per_round < 3:
            raise FedP2EFTError(f"privacy.secagg needs at least 3 clients per round (with 2, each learns the other's "
                                f"update from the sum), got clients_per_round={clients_per_round}")
        shares, threshold = self.shares_and_threshold(clients_per_round)
        if shares > clients_per_round:
            raise FedP2EFTError(f"privacy.secagg.num_shares ({shares}) exceeds clients_per_round "
                                f"({clients_per_round}); give a fraction such as 1.0 or sample more clients")
        if threshold > clients_per_round or threshold > shares:
            raise FedP2EFTError(f"privacy.secagg.reconstruction_threshold ({threshold}) exceeds the {shares} shares "
                                f"of a round of {clients_per_round} clients; lower it")
        if clients_per_round * self.quantization_range >= 2**32:
            raise FedP2EFTError(f"privacy.secagg.quantization_range ({self.quantization_range}) x clients_per_round "
                                f"({clients_per_round}) reaches 2**32, where the masked sum wraps around; lower "
                                "quantization_range")
        if min_clients < threshold:
            raise FedP2EFTError(f"min_clients ({min_clients}) is below the SecAgg+ threshold ({threshold}): a round "
                                "with fewer survivors cannot be unmasked; raise min_clients or lower the threshold")


# ------------------------------------------------------------------------------------------------------- server


def weight_spec(weights: Weights) -> str:
    """Names and dtypes of the weights, in the order of the legacy ``Parameters`` list (which has no names)."""
    return json.dumps([[name, str(tensor.dtype).removeprefix("torch.")] for name, tensor in weights.items()])


def instructions(weights: Weights, config: ConfigRecord, secagg: SecAggConfig) -> FitIns:
    """One client's training instructions in the legacy format: the global weights and the round's config, plus
    what the client needs to check its own update before it is masked."""
    arrays = [tensor.detach().cpu().float().numpy() if tensor.is_floating_point() else tensor.cpu().numpy()
              for tensor in weights.values()]
    settings = {**dict(config), P.WEIGHT_SPEC: weight_spec(weights), P.SECAGG_CLIPPING: float(secagg.clipping_range),
                P.SECAGG_MAX_WEIGHT: float(secagg.max_weight)}
    return FitIns(ndarrays_to_parameters(arrays), settings)


@dataclass
class RoundAdapter(LegacyStrategy):
    """The legacy strategy the workflow drives for one round: it returns the prepared instructions for the
    sampled clients and keeps what the workflow hands back after unmasking: the average update, and each client's
    example count and metrics."""

    sampled: list[tuple[ClientProxy, FitIns]]
    average: list[np.ndarray] | None = None
    results: dict[int, tuple[int, dict[str, float]]] = field(default_factory=dict)

    def initialize_parameters(self, client_manager: Any) -> Parameters | None:
        return None

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> list:
        return self.sampled

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple[Parameters | None, dict]:
        if results:  # the workflow put the unmasked average into every result
            self.average = parameters_to_ndarrays(results[0][1].parameters)
        self.results = {proxy.node_id: (res.num_examples, dict(res.metrics)) for proxy, res in results}
        return (results[0][1].parameters if results else None), {}

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: Any) -> list:
        return []

    def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> tuple[None, dict]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        return None


class CountingGrid:
    """The grid the workflow talks through: it counts each node's bytes both ways over the protocol's four
    exchanges (tensors and the masked vectors, which travel as bytes in config records) and keeps each node's
    first error, so failures are reported per client."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.sent: dict[int, int] = {}
        self.received: dict[int, int] = {}
        self.errors: dict[int, str] = {}

    def send_and_receive(self, messages: list[Message], *, timeout: float | None = None) -> list[Message]:
        for message in messages:
            node = message.metadata.dst_node_id
            self.sent[node] = self.sent.get(node, 0) + message_bytes(message.content)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.errors.setdefault(node, reply.error.reason)
            elif reply.has_content():
                self.received[node] = self.received.get(node, 0) + message_bytes(reply.content)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)


def message_bytes(content: RecordDict) -> int:
    """Tensor bytes (as ``server_app.payload_bytes``) plus the bytes values of config records, where SecAgg+
    carries keys, key shares and the masked vectors."""
    tensors = sum(record.count_bytes() for record in content.array_records.values())
    blobs = sum(len(item) for record in content.config_records.values() for value in record.values()
                for item in (value if isinstance(value, list) else [value]) if isinstance(item, bytes))
    return tensors + blobs


@dataclass
class SecureRoundResult:
    """What a secure round gives the server loop: the new global weights (None when the protocol halted), each
    surviving client's example count and metrics, the failures per node, and the bytes per node."""

    weights: Weights | None
    results: dict[int, tuple[int, dict[str, float]]]
    errors: dict[int, str]
    sent: dict[int, int]
    received: dict[int, int]


def secure_round(grid: Grid, secagg: SecAggConfig, server_round: int, weights: Weights,
                 configs: dict[int, ConfigRecord], timeout: float) -> SecureRoundResult:
    """One round of SecAgg+ over the nodes in ``configs`` (node id -> that client's round config)."""
    counting = CountingGrid(grid)
    proxies = [(GridClientProxy(node, grid, run_id=0), instructions(weights, config, secagg))
               for node, config in configs.items()]
    adapter = RoundAdapter(proxies)
    shares, threshold = secagg.shares_and_threshold(len(configs))
    workflow = SecAggPlusWorkflow(shares, threshold, max_weight=secagg.max_weight,
                                  clipping_range=secagg.clipping_range, quantization_range=secagg.quantization_range,
                                  modulus_range=2**32, timeout=timeout)
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            config=ServerConfig(num_rounds=server_round), strategy=adapter)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: server_round})
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters([]), keep_input=True)
    workflow(counting, context)
    new = None if adapter.average is None else apply_average(weights, adapter.average)
    for node in configs:
        if node not in adapter.results and node not in counting.errors:
            counting.errors[node] = "no reply before the round timeout, or left out when secure aggregation halted"
    return SecureRoundResult(new, adapter.results, counting.errors, counting.sent, counting.received)


def apply_average(weights: Weights, average: list[np.ndarray]) -> Weights:
    """The global weights moved by the average update; tensors that are not floating point keep their value."""
    if len(average) != len(weights):
        raise FedP2EFTError(f"secure aggregation returned {len(average)} tensors for {len(weights)} weights")
    return {name: (ref.float() + torch.from_numpy(np.asarray(delta, dtype=np.float32)).reshape(ref.shape)).to(ref.dtype)
            if ref.is_floating_point() else ref.clone() for (name, ref), delta in zip(weights.items(), average)}


# ------------------------------------------------------------------------------------------------------- client


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """ClientApp mod: the stages of a secure round (they carry SecAgg+'s config record) go through Flower's
    ``secaggplus_mod``; every other message passes untouched."""
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def is_secure(content: RecordDict) -> bool:
    return FITINS_CONFIG in content.config_records


def decode_instructions(content: RecordDict) -> tuple[Weights, ConfigRecord]:
    """The global weights (with their names and dtypes) and the round config of a secure round's instructions."""
    fitins = compat.recorddict_to_fitins(content, keep_input=True)
    config = ConfigRecord(dict(fitins.config))
    spec = json.loads(str(config[P.WEIGHT_SPEC]))
    arrays = parameters_to_ndarrays(fitins.parameters)
    weights = {name: torch.from_numpy(np.array(array)).to(getattr(torch, dtype))
               for (name, dtype), array in zip(spec, arrays, strict=True)}
    return weights, config


def encode_update(reference: Weights, update: Weights, num_examples: int, metrics: dict[str, float],
                  config: ConfigRecord) -> RecordDict:
    """The client's reply in the legacy format ``secaggplus_mod`` masks: its update (weights minus the global ones;
    zeros for tensors that are not averaged), checked first, because after masking nobody can."""
    clipping, max_weight = float(config[P.SECAGG_CLIPPING]), float(config[P.SECAGG_MAX_WEIGHT])
    if num_examples > max_weight:
        raise FedP2EFTError(f"this client trained on {num_examples} examples, more than privacy.secagg.max_weight="
                            f"{max_weight:g}; raise max_weight to at least the largest client's example count")
    problem = update_problem(reference, update)  # the server's own check of a plain reply, run here instead
    if problem:
        raise FedP2EFTError(f"this client's update cannot enter a secure sum: {problem}")
    deltas = []
    for name, ref in reference.items():
        if not ref.is_floating_point():
            deltas.append(np.zeros(tuple(ref.shape), dtype=np.float32))
            continue
        delta = (update[name].detach().cpu().float() - ref.float()).numpy()
        largest = float(np.abs(delta).max(initial=0.0))
        if largest > clipping:
            raise FedP2EFTError(f"update tensor {name!r} moved by {largest:.3g}, beyond privacy.secagg.clipping_range="
                                f"{clipping:g} (it would be clipped silently); raise clipping_range")
        deltas.append(delta)
    scalars = {k: float(v) for k, v in metrics.items()}
    result = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(deltas), int(num_examples), scalars)
    return compat.fitres_to_recorddict(result, keep_input=True)
