"""Subcommand groups of the ``clear-adapters`` CLI; each module has ``register(subparsers)``."""
