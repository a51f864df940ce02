"""Experiments: thin command lines over lost_jax, run as `python -m experiments.NAME`."""
