"""Evaluation: RULER-style long-context tasks, sliding-window perplexity, lm-eval-harness-style
multiple choice and GSM8K exact match, all offline.

  tokens.py      text pieces -> token ids (no special tokens), the model's length bound
  scoring.py     masked next-token NLL of padded rows: the one scoring core
  perplexity.py  packed-row and sliding-window perplexity
  generation.py  greedy completions through `hylo_jax.generate`, stop strings
  words.py       seeded pseudo-words, numbers and UUIDs
  ruler.py       RULER task generators (exact token length)
  metrics.py     string_match_all / string_match_part
  harness.py     log-likelihood multiple choice over jsonl files
  gsm8k.py       GSM8K-style exact match
  config.py      EvalConfig;  runner.py  the `hylo eval` job;  report.py  table, JSON, plot
"""
