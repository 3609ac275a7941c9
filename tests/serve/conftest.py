"""The serve tests' fixtures; they live in serve_support.py, which the test modules import by that
name (a module named `conftest` is a different file in each test directory)."""

from serve_support import client, refs, serve, serve_files, server  # noqa: F401
