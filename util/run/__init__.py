"""A run: the one trainer, run set-up, preemption, the folder lock, distributed init, seeds, mixed
precision, logs, the optimizer and lr schedules, and every error and exit status."""
