"""Distillation training: losses, train step, stages."""
