"""Text sources, tokenisation and packing."""
