"""hylo_jax: upcycle pretrained Transformer LLMs into long-context MLA + linear-mixer hybrids, in JAX."""

__version__ = "0.1.0"
