"""``fedp2eft data describe NAME``: languages, clients per pool, examples and label distribution."""

from __future__ import annotations

import argparse
from collections import Counter

from rich.console import Console
from rich.table import Table

from fedp2eft.data.registry import dataset_names, load_dataset
from fedp2eft.data.types import FederatedDataset

OPTIONS = {  # CLI flag -> (type, help); only the flags given are passed to the loader, which has its own defaults
    "seed": (int, "seed of the client partition"),
    "clients_per_language": (int, "clients per language and pool"),
    "train_size": (int, "training examples per client"),
    "test_size": (int, "test examples per client"),
    "alpha": (float, "Dirichlet concentration of the clients' label skew (smaller: more skewed)"),
    "languages": (str, "comma-separated language codes to keep, e.g. en,hi"),
    "min_examples": (int, "fewest distinct training sentences a language needs to be kept (intents)"),
    "path": (str, "folder of a local copy (xnli, masakhanews, fed-aya)"),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="inspect federated datasets", description="Inspect federated datasets.")
    commands = parser.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    describe = commands.add_parser(
        "describe", help="languages, client ids per pool, examples and labels of a dataset",
        description="Languages, client ids per pool (what `fedp2eft personalize --client` takes), examples and the "
                    "label distribution of a dataset.",
    )
    describe.add_argument("name", help=f"{', '.join(dataset_names())} or a file/folder path")
    for flag, (kind, text) in OPTIONS.items():
        describe.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=kind, default=None,
                              help=f"{text} (default: the dataset's own)")
    describe.set_defaults(func=run_describe)


def run_describe(args: argparse.Namespace) -> int:
    options = {k: getattr(args, k) for k in OPTIONS if getattr(args, k) is not None}
    describe(load_dataset(args.name, **options), Console())
    return 0


def describe(dataset: FederatedDataset, console: Console) -> None:
    """Per-language table plus overall label distribution."""
    console.print(f"[bold]{dataset.name}[/bold] ({dataset.task}), {len(dataset.labels)} labels, "
                  f"{len(dataset.seen)} seen + {len(dataset.unseen)} unseen clients")
    table = Table(title="per language")
    for column in ("language", "seen clients", "unseen clients", "train", "test", "labels"):
        table.add_column(column, justify="left" if column == "language" else "right")
    languages = sorted({c.language for c in dataset.seen + dataset.unseen})
    for language in languages:
        clients = {p: [c for c in dataset.pool(p) if c.language == language] for p in ("seen", "unseen")}
        everyone = clients["seen"] + clients["unseen"]
        labels = {e["label"] for c in everyone for e in c.train if "label" in e}
        table.add_row(language, str(len(clients["seen"])), str(len(clients["unseen"])),
                      str(sum(len(c.train) for c in everyone)), str(sum(len(c.test) for c in everyone)),
                      str(len(labels)) if labels else "-")
    console.print(table)
    console.print(client_table(dataset, languages))
    if dataset.task == "classification":
        counts = Counter(e["label"] for c in dataset.seen + dataset.unseen for e in c.train)
        labels = Table(title="label distribution (train, all clients)")
        labels.add_column("label")
        labels.add_column("examples", justify="right")
        labels.add_column("languages", justify="right")
        languages_of: dict[int, set[str]] = {}
        for client in dataset.seen + dataset.unseen:
            for example in client.train:
                languages_of.setdefault(example["label"], set()).add(client.language)
        for index, name in enumerate(dataset.labels):
            labels.add_row(name, str(counts.get(index, 0)), str(len(languages_of.get(index, ()))))
        console.print(labels)


def client_table(dataset: FederatedDataset, languages: list[str]) -> Table:
    """The client ids per language and pool, which ``fedp2eft personalize --client`` takes."""
    table = Table(title="client ids (fedp2eft personalize --client ID)")
    for column in ("language", "seen", "unseen"):
        table.add_column(column)
    for language in languages:
        table.add_row(language, *(" ".join(c.client_id for c in dataset.pool(pool) if c.language == language)
                                  for pool in ("seen", "unseen")))
    return table
