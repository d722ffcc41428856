"""Names shared by ServerApp and ClientApp: message types and record keys.

One place for them so the two sides cannot drift apart.
"""

from __future__ import annotations

# Message types (``<category>.<action>`` routes to the matching ClientApp handler).
TRAIN = "train"
PARTITION_QUERY = "query.partition"
STATISTICS_QUERY = "query.statistics"

# RecordDict keys.
WEIGHTS = "weights"
CONFIG = "config"
METRICS = "metrics"
STATISTICS = "statistics"

# ConfigRecord keys sent to clients; the task config travels with every message, so a
# ClientApp needs no run_config and can rebuild its task in any process.
TASK = "task"
TASK_CONFIG = "task-config"
SERVER_ROUND = "server-round"
CLIENT_INDEX = "client-index"
STATE_ROUND = "state-round"  # the last round whose update the server accepted from this client (0: none yet)
STATE_DIR = "state-dir"  # where clients keep their own state when the node names none (simulation)
# Secure rounds only (``secure_aggregation.py``): the weights' names and dtypes, and the bounds a client checks.
WEIGHT_SPEC = "weight-spec"
SECAGG_CLIPPING = "secagg-clipping-range"
SECAGG_MAX_WEIGHT = "secagg-max-weight"

# Node config / reply keys.
PARTITION_ID = "partition-id"
NODE_STATE_DIR = "state-dir"  # a SuperNode's own folder for client state (wins over the job's STATE_DIR)
NUM_EXAMPLES = "num-examples"
CLIENT_TIME = "client-time-s"
TASK_REUSED = "task-reused"  # 1 when the ClientApp process served the message with a task (model) it had built

# Context.state keys of a stateful task's client (the newest state, and the round it came from).
CLIENT_STATE = "client-state"
CLIENT_STATE_ROUND = "client-state-round"

# In a simulated run's output folder: the virtual nodes' own state (stateful tasks), one folder per client.
CLIENT_STATE_FOLDER = "clients"
