"""Training observability: one stdout line per log step, a JSONL log, TensorBoard events.

Only process 0 writes. Throughput is measured between log steps (compilation excluded after the
first interval); MFU = model FLOPs / elapsed / (devices x nominal peak).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax


class MetricsLogger:
    def __init__(self, directory: Path, stage: str, *, tokens_per_step: int, flops_per_step: float,
                 peak_flops: float | None, tensorboard: bool = True):
        self.primary = jax.process_index() == 0
        self.stage, self.tokens_per_step, self.flops_per_step = stage, tokens_per_step, flops_per_step
        self.peak = None if peak_flops is None else peak_flops * jax.device_count()
        self.last_time, self.last_step = time.perf_counter(), None
        self.jsonl = self.writer = None
        if self.primary:
            directory.mkdir(parents=True, exist_ok=True)
            self.jsonl = (directory / "metrics.jsonl").open("a")
            if tensorboard:
                from tensorboardX import SummaryWriter

                self.writer = SummaryWriter(str(directory / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> str:
        """Adds throughput to `metrics`, writes them, returns the printable line."""
        now = time.perf_counter()
        if self.last_step is not None and step > self.last_step:
            seconds = (now - self.last_time) / (step - self.last_step)
            metrics = {**metrics, "sec_per_step": seconds, "tokens_per_sec": self.tokens_per_step / seconds}
            if self.peak:
                metrics["mfu"] = self.flops_per_step / seconds / self.peak
        self.last_time, self.last_step = now, step
        if self.primary:
            self.jsonl.write(json.dumps({"stage": self.stage, "step": step, **metrics}) + "\n")
            self.jsonl.flush()
            if self.writer is not None:
                for key, value in metrics.items():
                    self.writer.add_scalar(f"{self.stage}/{key}", value, step)
        return f"[{self.stage}] step {step}: " + " ".join(
            f"{k}={v:.4g}" for k, v in metrics.items() if k != "finite")

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.writer is not None:
            self.writer.close()
