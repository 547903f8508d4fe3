"""What `hylo eval` runs: tasks, RULER lengths and samples, perplexity windows, batch sizes."""

from __future__ import annotations

import dataclasses

from hylo_jax.config import doc
from hylo_jax.eval.ruler import TASKS


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluation tasks and their settings (section `eval`)."""

    tasks: tuple[str, ...] = doc(("ruler", "ppl"), "Tasks: ruler, ppl, mc:FILE.jsonl, gsm8k:FILE.jsonl.")
    lengths: tuple[int, ...] = doc((4096, 8192), "RULER prompt lengths in tokens.")
    samples: int = doc(10, "RULER samples per task and length.")
    ruler_tasks: tuple[str, ...] = doc(tuple(TASKS), "RULER tasks to run.")
    haystack: str | None = doc(None, "Text file of the RULER text haystack; None = Shakespeare (not Hamlet).")
    max_new_tokens: int = doc(0, "Tokens generated per RULER answer; 0 = each task's RULER default.")
    ppl_text: str | None = doc(None, "Text file for perplexity; None = Hamlet (held out from training).")
    ppl_window: int = doc(2048, "Perplexity window W: each token sees up to W-1 tokens of context.")
    ppl_stride: int = doc(1024, "Perplexity stride S between windows (1 <= S < W).")
    ppl_max_tokens: int = doc(0, "Score only the first this many tokens of the text; 0 = all.")
    gsm8k_fewshot: str | None = doc(None, "GSM8K jsonl file whose first `gsm8k_shots` documents prefix each prompt.")
    gsm8k_shots: int = doc(5, "Few-shot examples taken from gsm8k_fewshot.")
    gsm8k_max_new_tokens: int = doc(256, "Tokens generated per GSM8K answer.")
    limit: int = doc(0, "Documents per mc/gsm8k file; 0 = all.")
    batch_size: int = doc(8, "Rows per forward (multiple choice, perplexity) and prompts per generate call.")
    seed: int = doc(0, "Seed of the RULER samples.")
    out: str = doc("runs/eval", "Output folder: results.json and ruler.png.")
