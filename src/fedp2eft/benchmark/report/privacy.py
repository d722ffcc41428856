"""The privacy of the federated stages: DP's (ε, δ) and SecAgg+'s settings, from each stage's metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

from fedp2eft.benchmark.communication import read_rounds


def privacy_spent(run_dir: Path) -> list[dict]:
    """The privacy of every federated stage trained with DP or secure aggregation, from its metrics.jsonl: for DP
    its last round's ``privacy/*`` entries (ε at δ after all its rounds, and the noise, clipping and sampling that
    gave it); for SecAgg+ the shares and threshold, and the largest quantization error bound of a round."""
    entries = []
    for path in sorted(Path(run_dir).glob("base/metrics.jsonl")) + sorted(Path(run_dir).glob("seed*/*/metrics.jsonl")) \
            + sorted(Path(run_dir).glob("seed*/*/x*/metrics.jsonl")):  # a stage trained per grid point
        rows = read_rounds(path)
        private, secure = [row for row in rows if "privacy/epsilon" in row], [row for row in rows if "secagg/shares" in row]
        entry = {"stage": path.parent.relative_to(run_dir).as_posix(), "rounds": rows[-1]["round"] if rows else 0}
        if private:
            entry.update({key.removeprefix("privacy/"): value for key, value in private[-1].items()
                          if key.startswith("privacy/")})
        if secure:
            entry["secagg"] = {"shares": secure[-1]["secagg/shares"], "threshold": secure[-1]["secagg/threshold"],
                               "error_bound": max(row["secagg/error_bound"] for row in secure)}
        if private or secure:
            entries.append(entry)
    return entries


def privacy_markdown(entries: list[dict]) -> str:
    """One table per kind of protection: user-level (ε, δ) of each DP-trained stage after its rounds, and the
    SecAgg+ settings of each securely aggregated stage."""
    private, secure = [e for e in entries if "epsilon" in e], [e for e in entries if "secagg" in e]
    lines = []
    if private:
        lines += ["User-level differential privacy of the federated stages trained with it (DP-FedAvg: each client's "
                  "update clipped to norm C, equal weights, Gaussian noise z·C on the sum; ε from an RDP accountant "
                  "for fixed-size sampling without replacement; docs/federation.md, \"Differential privacy\"). "
                  "Stages not listed were trained without DP.\n",
                  "| stage | rounds | ε | δ | noise multiplier z | clipping norm C | sampling rate |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {e['stage']} | {e['rounds']} | {e['epsilon']:.3g} | {e['delta']:g} | {e['noise_multiplier']:g} "
                  f"| {e['clipping_norm']:g} | {e['sampling_rate']:.3g} |" for e in private]
    if secure:
        lines += [("\n" if lines else "") + "Stages aggregated with SecAgg+ (the server learned only the weighted "
                  "average of each round's updates, and each client's example count and training metrics; "
                  "docs/federation.md, \"Secure aggregation\"):\n",
                  "| stage | rounds | shares | threshold | largest quantization error of an averaged entry |",
                  "|---|---|---|---|---|"]
        lines += [f"| {e['stage']} | {e['rounds']} | {e['secagg']['shares']} | {e['secagg']['threshold']} | "
                  f"{e['secagg']['error_bound']:.2g} |" for e in secure]
    return "\n".join(lines)
