"""Sweeps: search spaces (YAML), Optuna through Ray Tune, and the sweep runner."""
