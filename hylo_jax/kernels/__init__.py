"""Sequence-mixing algorithms as pure functions (no parameters): SSD, gated delta rule, attention."""
