"""`clear-adapters` subcommands of the matrix group."""


def register(subparsers) -> None:
    """Add this group's subcommands to the CLI."""
