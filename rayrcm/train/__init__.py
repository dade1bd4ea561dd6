"""Training without Ray: optimizer groups, per-step schedules, checkpoints, the step loop."""
