"""Converters: checkpoints in -> MLX model folders."""
