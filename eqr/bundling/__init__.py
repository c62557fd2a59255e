"""Bundled models: a finished training run -> eqr/bundled/<name>/ with its measured card
(`card`); the command is `python -m eqr.commands.bundle`."""
