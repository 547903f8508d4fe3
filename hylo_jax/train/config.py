"""Run and stage configs of distillation training (`hylo train --config run.yaml`)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from hylo_jax.config import RopeConfig, doc, require_positive
from hylo_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One training stage: a loss, a context length, a budget and an optimiser schedule."""

    name: str = doc("stage", "Folder name of the stage under the run's output folder.")
    loss: Literal["ild", "kd"] = doc("kd", "ild: intermediate-layer distillation with teacher "
                                           "forcing (Stage I); kd: forward KL to the teacher (Stage II).")
    steps: int = doc(100, "Optimiser steps.")
    seq_len: int = doc(2048, "Tokens per packed row (the stage's context length).")
    global_batch_size: int = doc(8, "Rows per step over all hosts.")
    grad_accum: int = doc(1, "Microbatches per step: the global batch runs in this many parts one after the "
                             "other inside the step, their gradients summed in fp32 before one optimiser update "
                             "(the whole batch's update, for a batch that does not fit at once).")
    lr: float = doc(2e-4, "Peak learning rate (AdamW).")
    warmup_ratio: float = doc(0.01, "Fraction of the steps spent warming up linearly from 0.")
    min_lr_ratio: float = doc(0.0, "Cosine decays to lr * min_lr_ratio.")
    betas: tuple[float, float] = doc((0.9, 0.95), "AdamW (b1, b2).")
    weight_decay: float = doc(0.0, "AdamW decoupled weight decay.")
    adam_mu_dtype: Literal["float32", "bfloat16"] = doc(
        "float32", "Storage dtype of AdamW's first moment (bfloat16: 2 fewer bytes per parameter read and written "
                   "by the update, which is bound by memory bandwidth; the second moment stays float32).")
    clip_norm: float = doc(1.0, "Global gradient-norm clip (0 = off).")
    trainable: str = doc(r".*", "Regex on parameter paths (e.g. 'model.layers.3.self_attn.q_proj.kernel'); "
                               "parameters that do not match are frozen.")
    temperature: float = doc(1.0, "kd: softmax temperature of the KL.")
    ce_weight: float = doc(0.0, "kd: weight of the student's next-token cross-entropy (HyLo: 0).")
    kl_chunk: int = doc(1024, "kd: tokens per chunk of the logit-free KL; 0 = dense logits.")
    ild_squared: bool = doc(False, "ild: squared L2 distances instead of L2 (sources disagree).")
    mla_rope: RopeConfig | None = doc(None, "RoPE of the MLA layers in this stage (YaRN for long "
                                            "context); None = keep the student's.")
    remat: Literal["none", "full", "dots", "dots_no_batch", "save_attention_out"] | None = doc(
        None, "Activation checkpointing for this stage; None = the model config's.")
    nan_policy: Literal["stop", "skip"] = doc("stop", "On a non-finite loss or gradient: stop the run "
                                                      "naming the term, or skip the update.")
    log_every: int = doc(10, "Steps between log lines (loss terms, tokens/s, MFU).")
    save_every: int = doc(100, "Steps between checkpoints (the last step is always saved).")
    keep_checkpoints: int = doc(2, "Checkpoints kept per stage.")

    def __post_init__(self) -> None:
        require_positive(self, f"stage {self.name}: ", ("steps", "seq_len", "global_batch_size", "grad_accum",
                                                        "log_every", "save_every", "keep_checkpoints"))
        if self.global_batch_size % self.grad_accum:
            raise ConfigError(f"stage {self.name}: global_batch_size={self.global_batch_size} is not divisible by "
                              f"grad_accum={self.grad_accum}")
        if not 0 <= self.warmup_ratio < 1 or self.lr <= 0:
            raise ConfigError(f"stage {self.name}: need lr > 0 and 0 <= warmup_ratio < 1")
        if self.kl_chunk < 0:
            raise ConfigError(f"stage {self.name}: kl_chunk must be >= 0")
