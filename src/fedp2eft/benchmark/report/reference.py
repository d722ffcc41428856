"""This run against another run's folder (``report.reference_run``): what a change of setting costs each method,
paired on the same seeds and clients."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from fedp2eft.benchmark.report.formatting import _signed
from fedp2eft.benchmark.report.records import Setting, Units, client_units, method_order
from fedp2eft.benchmark.report.stats import paired_bootstrap
from fedp2eft.errors import FedP2EFTError


def reference_rows(config: dict, metric_name: str, units: Mapping[Setting, Units]) -> list[dict]:
    """The comparison with ``report.reference_run`` (another run's folder), if the config names one."""
    reference = config.get("report", {}).get("reference_run")
    if not reference:
        return []
    path = Path(reference) / "personalize.jsonl"
    if not path.is_file():
        raise FedP2EFTError(f"report.reference_run: {path} does not exist; name a finished run's folder")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return against_reference(units, client_units(records, metric_name))


def against_reference(units: Mapping[Setting, Units], reference: Mapping[Setting, Units]) -> list[dict]:
    """This run minus the reference run for every (pool, method, budget) both have, paired on the same (seed,
    client) units: what a change of setting (e.g. DP on the PS generator) costs each method."""
    rows = []
    for setting in sorted(set(units) & set(reference)):
        interval = paired_bootstrap(units[setting], reference[setting])
        if interval is not None:
            pool, method, budget = setting
            rows.append({"pool": pool, "method": method, "budget": budget, "difference": interval.mean,
                         "ci_low": interval.low, "ci_high": interval.high, "outcome": interval.outcome})
    return rows


def reference_markdown(rows: list[dict], reference: str, label: str) -> str:
    """Rows = method, columns = pool and budget, cells = this run minus the reference with the paired interval."""
    settings = sorted({(r["pool"], r["budget"]) for r in rows})
    cells = {(r["method"], r["pool"], r["budget"]): r for r in rows}
    lines = [f"This run minus the reference run `{reference}` ({label} points; paired on the same seeds and clients, "
             "95% interval; 'loss' = this run is worse beyond noise).\n",
             "| method | " + " | ".join(f"{p} r={b}" for p, b in settings) + " |", "|---|" + "---|" * len(settings)]
    for method in method_order({r["method"] for r in rows}):
        row = ["–" if (c := cells.get((method, p, b))) is None else
               f"{_signed(c['difference'])} [{_signed(c['ci_low'])}, {_signed(c['ci_high'])}] {c['outcome']}"
               for p, b in settings]
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return "\n".join(lines)
