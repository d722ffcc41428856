"""Per-round observability: a rich progress line and TensorBoard scalars.

``metrics.jsonl`` is written together with the checkpoint (see ``checkpoint.save_round``) so
that it always agrees with the last finished round, also after a resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedp2eft.logs import stderr_console

TENSORBOARD_DIR = "tensorboard"


class RoundReporter:
    """Shows progress over rounds and mirrors every numeric round metric to TensorBoard."""

    def __init__(self, output_dir: Path, total_rounds: int, first_round: int) -> None:
        from torch.utils.tensorboard import SummaryWriter  # slow import; only the server needs it

        self._writer = SummaryWriter(log_dir=str(output_dir / TENSORBOARD_DIR))
        self._console = stderr_console  # silent under --quiet
        self._progress = Progress(
            TextColumn("[bold]federated rounds"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=self._console,
            disable=not self._console.is_terminal,
        )
        self._bar = self._progress.add_task("", total=total_rounds, completed=first_round - 1)
        self._progress.start()

    def round_done(self, row: dict[str, Any]) -> None:
        server_round = int(row["round"])
        for key, value in row.items():
            if key != "round" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(key, value, server_round)
        self._writer.flush()
        train = " ".join(f"{k[6:]}={v:.4g}" for k, v in row.items() if k.startswith("train/"))
        summary = f"round {server_round}: ok {row['successes']}/{row['sampled']} {row['round_time_s']:.2f}s {train}"
        if "privacy/epsilon" in row:
            summary += f" ε={row['privacy/epsilon']:.3g} (δ={row['privacy/delta']:g})"
        self._progress.update(self._bar, advance=1, description=summary)
        self._console.log(summary)

    def close(self) -> None:
        self._progress.stop()
        self._writer.close()
