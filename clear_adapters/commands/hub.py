"""`clear-adapters` subcommands of the hub group."""


def register(subparsers) -> None:
    """Add this group's subcommands to the CLI."""
