"""The `hylo eval` job: every task of an EvalConfig on one or more (model, tokenizer) pairs."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from hylo_jax.config import to_dict
from hylo_jax.errors import EvalError
from hylo_jax.eval.config import EvalConfig
from hylo_jax.eval.generation import complete
from hylo_jax.eval.gsm8k import evaluate_gsm8k, fewshot_prefix
from hylo_jax.eval.harness import evaluate_mc
from hylo_jax.eval.metrics import METRICS
from hylo_jax.eval.perplexity import sliding_perplexity
from hylo_jax.eval.report import plot_ruler, table, write_json
from hylo_jax.eval.ruler import TASKS, check_tasks, ruler_samples
from hylo_jax.eval.tokens import check_length, encode
from hylo_jax.generate import SamplingConfig

log = logging.getLogger(__name__)
KINDS = ("ruler", "ppl", "mc:FILE.jsonl", "gsm8k:FILE.jsonl")


def check_config(cfg: EvalConfig) -> None:
    """`EvalError` for unknown tasks, missing files or empty lists, before any model is loaded."""
    if not cfg.tasks:
        raise EvalError("eval.tasks is empty")
    for task in cfg.tasks:
        kind, _, arg = task.partition(":")
        if kind in ("ruler", "ppl") and not arg:
            continue
        if kind not in ("mc", "gsm8k") or not arg:
            raise EvalError(f"unknown eval task {task!r}; valid: {', '.join(KINDS)}")
        if not Path(arg).is_file():
            raise EvalError(f"eval task {task}: {arg} does not exist")
    if "ruler" in cfg.tasks:
        check_tasks(cfg.ruler_tasks)
        if not cfg.lengths or min(cfg.lengths) <= 0 or cfg.samples <= 0:
            raise EvalError(f"RULER needs positive lengths and samples, got lengths={list(cfg.lengths)} "
                            f"samples={cfg.samples}")


def _text(path: str | None, split: str) -> str:
    from hylo_jax.data.shakespeare import load_text

    return Path(path).read_text() if path else "\n".join(load_text(split))


def run_ruler(model, tokenizer, cfg: EvalConfig) -> tuple[dict, list[dict]]:
    """({task: {length: score}, "average": {length: mean}}, per-sample records)."""
    stop = [t for t in [tokenizer.eos_token_id] if t is not None]
    text = _text(cfg.haystack, "train") if any(TASKS[t].haystack == "text" for t in cfg.ruler_tasks) else ""
    new = {task: cfg.max_new_tokens or TASKS[task].max_new_tokens for task in cfg.ruler_tasks}
    for task in cfg.ruler_tasks:
        longest = max(cfg.lengths)
        check_length(model, longest + new[task], f"RULER {task} at length {longest} (+{new[task]} generated tokens)")
    scores: dict[str, dict[int, float]] = {}
    records = []
    for length in sorted(cfg.lengths):
        for task in cfg.ruler_tasks:
            samples = ruler_samples(task, tokenizer, length, cfg.samples, seed=cfg.seed, text=text)
            t0 = time.perf_counter()
            outs = complete(model, [s.input_ids for s in samples], SamplingConfig(max_new_tokens=new[task]), stop,
                            cfg.batch_size)
            predictions = [tokenizer.decode(o, skip_special_tokens=True) for o in outs]
            score = METRICS[samples[0].metric](predictions, [s.answers for s in samples])
            scores.setdefault(task, {})[length] = score
            log.info("RULER %s @ %d: %.1f (%.1fs)", task, length, score, time.perf_counter() - t0)
            records += [{"task": task, "length": length, "depth": s.depth, "answers": list(s.answers),
                         "prediction": p} for s, p in zip(samples, predictions)]
    scores["average"] = {n: sum(s[n] for s in scores.values()) / len(scores) for n in sorted(cfg.lengths)}
    return scores, records


def evaluate(model, tokenizer, cfg: EvalConfig) -> dict:
    """Results of every task of `cfg` for one model."""
    out: dict = {}
    for task in cfg.tasks:
        kind, _, arg = task.partition(":")
        if kind == "ruler":
            out["ruler"], out["ruler_samples"] = run_ruler(model, tokenizer, cfg)
        elif kind == "ppl":
            ids = encode(tokenizer, _text(cfg.ppl_text, "heldout"))[: cfg.ppl_max_tokens or None]
            out["ppl"] = sliding_perplexity(model, ids, cfg.ppl_window, cfg.ppl_stride, cfg.batch_size)
        elif kind == "mc":
            out[task] = evaluate_mc(model, tokenizer, arg, cfg.batch_size, cfg.limit)
        else:
            fewshot = fewshot_prefix(cfg.gsm8k_fewshot, cfg.gsm8k_shots) if cfg.gsm8k_fewshot else ""
            out[task] = evaluate_gsm8k(model, tokenizer, arg, fewshot=fewshot, max_new_tokens=cfg.gsm8k_max_new_tokens,
                                       batch_size=cfg.batch_size, limit=cfg.limit)
    return out


def run(cfg: EvalConfig, models: dict[str, tuple]) -> dict:
    """Evaluates each named (model, tokenizer); prints the table, writes OUT/results.json and
    OUT/ruler.png (when RULER ran). Returns {"config", "models": {name: results}}."""
    check_config(cfg)
    results = {name: evaluate(model, tokenizer, cfg) for name, (model, tokenizer) in models.items()}
    out = Path(cfg.out)
    write_json({"config": to_dict(cfg), "models": results}, out / "results.json")
    plotted = plot_ruler(results, out / "ruler.png")
    print(table(results))
    print(f"results: {out / 'results.json'}" + (f", plot: {out / 'ruler.png'}" if plotted else ""))
    return {"config": to_dict(cfg), "models": results}
