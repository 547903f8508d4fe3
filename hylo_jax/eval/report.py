"""Results of `hylo eval` as a text table, JSON, and a plot of RULER accuracy vs context length."""

from __future__ import annotations

import json
from pathlib import Path


def table(results: dict[str, dict]) -> str:
    """One block per model: RULER task x length (and the average), then the other tasks."""
    lines = []
    for name, res in results.items():
        lines.append(f"== {name}")
        ruler = res.get("ruler")
        if ruler:
            lengths = list(ruler["average"])
            lines.append(f"{'RULER':<18}" + "".join(f"{n:>9}" for n in lengths))
            for task, scores in ruler.items():
                lines.append(f"{task:<18}" + "".join(f"{scores[n]:>9.1f}" for n in lengths))
        if "ppl" in res:
            p = res["ppl"]
            lines.append(f"perplexity {p['ppl']:.3f} over {p['tokens']} tokens")
        for task, r in res.items():
            if task.startswith("mc:"):
                lines.append(f"{task}: acc {r['acc']:.4f} acc_norm {r['acc_norm']:.4f} ({r['docs']} docs)")
            elif task.startswith("gsm8k:"):
                lines.append(f"{task}: exact_match {r['exact_match']:.4f} ({r['docs']} docs)")
    return "\n".join(lines)


def write_json(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))


def plot_ruler(results: dict[str, dict], path: Path) -> bool:
    """RULER average (solid) and per-task (faint) accuracy vs length, one colour per model; False
    when no model has RULER results."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = {name: res["ruler"] for name, res in results.items() if res.get("ruler")}
    if not models:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, (name, ruler) in enumerate(models.items()):
        color = f"C{k}"
        for task, scores in ruler.items():
            xs = [int(n) for n in scores]
            if task == "average":
                ax.plot(xs, list(scores.values()), "o-", color=color, lw=2.5, label=f"{name} (average)")
            else:
                ax.plot(xs, list(scores.values()), "-", color=color, lw=0.8, alpha=0.35)
    lengths = sorted({int(n) for ruler in models.values() for n in ruler["average"]})
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths])
    ax.minorticks_off()
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("RULER accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
