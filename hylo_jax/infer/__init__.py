"""Inference: batched chunked prefill and jitted decoding over compressed caches."""
