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

# Node config / reply keys.
PARTITION_ID = "partition-id"
NUM_EXAMPLES = "num-examples"
CLIENT_TIME = "client-time-s"
