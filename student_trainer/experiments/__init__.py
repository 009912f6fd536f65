"""Experiment grids of ``distill`` runs: config, runner, report."""
