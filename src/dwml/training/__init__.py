"""The training loop and `Trainer`, checkpoints, run directories, metrics, schedules, runtime."""
