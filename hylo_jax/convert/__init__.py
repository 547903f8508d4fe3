"""Weight bridges between Hugging Face / PyTorch checkpoints and hylo_jax parameters."""
