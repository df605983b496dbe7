"""Command-line interface: thin wrappers that parse, call the library and print.

Each command lives in its own module and registers itself on ``app``.
"""

from __future__ import annotations

import importlib

from llamatier.cli.app import app

# Command modules; each registers its commands with @app.command().
_COMMAND_MODULES = [
    "llamatier.cli.trace_cmd",
    "llamatier.cli.kvtypes_cmd",
    "llamatier.cli.profiles_cmd",
    "llamatier.cli.calibrate_cmd",
    "llamatier.cli.quality_cmd",
    "llamatier.cli.replay_cmd",
    "llamatier.cli.sweep_cmd",
    "llamatier.cli.serve_cmd",
    "llamatier.cli.demo_cmd",
    "llamatier.cli.upgrade_cmd",
]

for _name in _COMMAND_MODULES:
    importlib.import_module(_name)


def main() -> None:
    """Console-script entry point."""
    app()


__all__ = ["app", "main"]
