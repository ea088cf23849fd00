"""Shared fixtures: tiny in-process models for unit tests, the embedded model for integration tests."""

from __future__ import annotations

import sys

import pytest

from trajalign.testing import tiny_handle


@pytest.fixture(scope="session")
def tiny():
    return tiny_handle("chatml")


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2 model, pulled into the cache on first use."""
    from trajalign.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    from trajalign.cli import main

    def run(*args: str):
        monkeypatch.setattr(sys, "argv", ["trajalign", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
