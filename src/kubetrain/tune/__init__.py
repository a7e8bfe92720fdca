"""Hyperparameter search: a Katib-shaped search space, run by Optuna locally."""
