"""CLI subcommands. Each module exposes ``register(subparsers)`` that adds its parser and sets ``func``."""
