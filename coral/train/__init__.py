"""Training: losses, embedding heads and (next) the Ray Train + DeepSpeed loop."""
