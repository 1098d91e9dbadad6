"""Training: one optimisation step, the EMA, the run's state and checkpoints, what a run writes, preemption,
data parallelism and clusters, console and W&B logging."""
