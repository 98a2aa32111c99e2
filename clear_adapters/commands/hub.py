"""Hub subcommands: ``push`` (``info`` with a repo id lives in ``core``)."""

from __future__ import annotations


def register(subparsers) -> None:
    """Add this group's subcommands to the CLI."""
    p = subparsers.add_parser(
        "push", help="publish an adapter directory (clear_config.json + weights) on the Hugging Face Hub",
        description="Validate an adapter directory written by clear_adapters.save_adapter, render its model card "
                    "and upload it in one commit. Pushing an unchanged adapter creates no commit.")
    p.add_argument("directory", help="adapter directory (clear_config.json, weights)")
    p.add_argument("repo_id", help="target repository, owner/name (created if missing)")
    p.add_argument("--revision", default=None, help="branch to push to (default: main; created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--token", default=None,
                   help="Hub token (default: HF_TOKEN or `hf auth login`; prefer those: a token on the command "
                        "line is visible to other users of the machine)")
    p.add_argument("--message", default=None, help="commit message")
    p.add_argument("--matrix", default=None, metavar="PATH",
                   help="compatibility-matrix report of `clear-adapters matrix` (matrix.md or its folder) for the card")
    p.add_argument("--allow-replace", action="store_true",
                   help="replace an adapter with a different base model or pattern on this branch")
    p.add_argument("--allow-foreign-matrix", action="store_true",
                   help="publish a --matrix run on another pipeline than the adapter's base model (e.g. tiny); the "
                        "card then says which pipeline, size and hardware produced it")
    p.set_defaults(func=cmd_push)


def cmd_push(args) -> int:
    from ..publish import push

    # bad arguments (repo id, revision) are InvalidArgumentError: the CLI prints one line, status 2
    result = push(args.directory, args.repo_id, revision=args.revision, private=args.private, token=args.token,
                  commit_message=args.message, matrix=args.matrix, allow_replace=args.allow_replace,
                  allow_foreign_matrix=args.allow_foreign_matrix)
    if result.changed:
        print(f"pushed {args.directory} to {result.repo_id}@{result.revision} ({', '.join(result.files)})")
    else:
        print(f"{result.repo_id}@{result.revision} already holds this adapter: no new commit")
    print(result.commit_url)
    return 0
