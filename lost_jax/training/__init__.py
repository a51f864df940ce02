"""The trainer and what every run shares: state on a mesh, steps, optimizers, checkpoints,
metrics, accounting, the run's start-up and workdir."""
