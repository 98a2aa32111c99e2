"""Jinja2 templates of the compatibility-matrix reports (package data)."""
