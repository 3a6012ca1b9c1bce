"""Hyperparameter sweeps on Optuna: a spec (spec), its study (study), trial processes (trial), the
worker that runs them (runner), and what a sweep leaves behind (results)."""
