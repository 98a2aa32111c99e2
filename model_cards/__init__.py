"""Jinja templates of the model cards written by ``clear_adapters.push`` (package data)."""
