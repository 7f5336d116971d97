"""Training curves of finished or running runs: python -m nanoalign.plot out/dpo [out/ipo ...] [--out=curves.png]

Reads each run's metrics.jsonl (one JSON row per logged step) and draws one panel per metric that any run logged,
the important ones first (loss, rewards/margins, rewards/accuracies, kl, objective/scores, eval/...), every run a
line of its own, so runs compare at a glance. Writes <first run>/curves.png unless --out is given. Needs matplotlib
(pip install -e ".[plot]").
"""
import argparse
import json
import math
from pathlib import Path

FIRST = ("loss", "rewards/margins", "rewards/accuracies", "kl", "objective/kl", "objective/scores",
         "objective/rlhf_reward", "nll_loss", "grad_norm")  # the panels a reader looks for first
SKIP = ("step", "lr", "skipped_steps", "no_signal_steps")


def read_metrics(run):
    path = Path(run) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics (is {run} a run folder?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def panels(runs_rows):
    """The metric names to draw: FIRST that were logged, then eval/ ones, then the rest, minus time/ and SKIP."""
    logged = {k for rows in runs_rows for row in rows for k in row if k not in SKIP and not k.startswith("time/")}
    evals = sorted(k for k in logged if k.startswith("eval/"))
    rest = sorted(logged - set(FIRST) - set(evals))
    return [k for k in FIRST if k in logged] + evals + rest


def plot(runs, out=None, max_panels=12):
    import matplotlib  # optional extra
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    runs_rows = [read_metrics(run) for run in runs]
    names = panels(runs_rows)[:max_panels]
    if not names:
        raise ValueError(f"{', '.join(map(str, runs))}: metrics.jsonl holds no metric rows yet")
    cols = min(3, len(names))
    fig, axes = plt.subplots(math.ceil(len(names) / cols), cols, figsize=(4.2 * cols, 2.8 * math.ceil(len(names) / cols)),
                             squeeze=False)
    for ax, name in zip(axes.flat, names):
        for run, rows in zip(runs, runs_rows):
            points = [(r["step"], r[name]) for r in rows if name in r]
            if points:
                ax.plot(*zip(*points), marker="." if len(points) < 30 else None, label=Path(run).name)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    if len(runs) > 1:
        axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    out = Path(out) if out else Path(runs[0]) / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m nanoalign.plot", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="PNG path (default: <first run>/curves.png)")
    args = parser.parse_args(argv)
    print(f"wrote {plot(args.runs, args.out)}")


if __name__ == "__main__":
    main()
