"""What a finished run prints on the terminal: the main table and the budget verdict."""

from __future__ import annotations

from collections.abc import Mapping

from rich.console import Console
from rich.table import Table

from fedp2eft.benchmark.report.budget import budget_verdict
from fedp2eft.benchmark.report.formatting import _cell
from fedp2eft.benchmark.report.records import Setting, _at, _budgets, _pools, _table_methods
from fedp2eft.benchmark.report.tables import best_per_budget


def print_main_table(summary: Mapping[Setting, dict], config: dict, label: str = "accuracy") -> None:
    """The main table on the terminal, best per budget in bold."""
    console = Console()
    budgets, methods = _budgets(config, summary), _table_methods(config, summary)
    for pool in _pools(config, summary):
        best = best_per_budget(summary, pool, methods, budgets)
        table = Table(title=f"{config['name']}: {pool} clients, {label} % (languages averaged, ± 95% CI half-width)")
        table.add_column("method")
        for budget in budgets:
            table.add_column(f"r={budget}", justify="right")
        for method in methods:
            cells = []
            for budget in budgets:
                entry = _at(summary, pool, method, budget)
                bold = entry is not None and entry["mean"] == best.get(budget)
                cells.append(f"[bold]{_cell(entry)}[/bold]" if bold else _cell(entry))
            table.add_row(method, *cells)
        console.print(table)


def print_budget_verdict(effects: list[dict]) -> None:
    """The budget verdict on the terminal, without markdown's bold marks."""
    Console().print(budget_verdict(effects).replace("**", ""))
