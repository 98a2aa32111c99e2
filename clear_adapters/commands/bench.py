"""`clear-adapters` subcommands of the bench group."""


def register(subparsers) -> None:
    """Add this group's subcommands to the CLI."""
