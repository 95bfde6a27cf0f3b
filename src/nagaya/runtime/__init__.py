"""Running containers: identity, mounts, environment, GPUs, and the launcher with its backends."""
