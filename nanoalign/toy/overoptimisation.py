"""Reward-model over-optimisation on the toy world (Gao et al. 2022, "Scaling Laws for Reward Model
Overoptimization", arXiv:2210.10760, Figure 1 and Sec. 3): while PPO optimises a proxy reward model, the proxy score
keeps rising with the distance from the initial policy d = sqrt(KL(pi || pi_init)) (their x-axis), and the gold
reward rises, then flattens or falls. PPO against the gold reward itself is the control.

    python -m nanoalign.toy.overoptimisation [--runs=out/frontier/ppo_kl_coef*,out/overopt/ppo_*]
                                             [--out=out/overopt] [--bin_width=0.5]

Reads finished PPO runs (`train.py --algo=ppo --out_dir=...`; on the toy world the pipeline logs the gold reward of
every rollout as objective/monitor_scores beside the optimised score objective/scores). --runs is comma-separated
folders or glob patterns. Each run's checkpoint config says which reward it optimised (reward_model: "gold", or a
reward model "ckpt:<dir>", a proxy); runs are grouped by it. Writes <out>/overopt.csv (one row per logged step of
every run, plus each run's final held-out evaluation) and, when matplotlib is installed, <out>/overopt.png.

The picture in data/overoptimisation.png: the frontier's PPO runs (out/frontier/ppo_kl_coef{0.01,0.05,0.2,0.5},
200 steps) and, in out/overopt, kl_coef=0 for 400 steps against the pipeline's proxy RM, the gold reward
(--reward_model=gold, also at kl_coef=0.01 for 200 steps) and a weak RM (--algo=rm on the first 1000 of the 8972
annotated pairs, 100 steps: --reward_model=ckpt:out/overopt/rm_weak); the commands and the measured
curves are in docs/toy-world.md.

Units: the proxy RM's scores are normalised to mean 0 / std 1 on reference samples (algos/rm.py); to compare the
gold reward on the same footing, gold_z = (gold - m) / s, with m and s the SFT model's mean and standard deviation
of the gold reward on the held-out prompts (eval.json: ref_gold_reward, ref_gold_reward_se * sqrt(n)).

Departures from the paper: no fitted functional form (their d * (alpha - beta * log d)); the points are the training
rollouts' own statistics (64 samples each, averaged over the log interval), pooled over the runs of a group and
averaged in bins of d, not separate evaluations of saved checkpoints; the final held-out evaluation of each run is
the only point on held-out prompts.
"""
import argparse
import csv
import glob
import json
import math
from pathlib import Path

from nanoalign.checkpoint import load_checkpoint

COLUMNS = ("run", "reward_model", "kl_coef", "source", "step", "kl", "sqrt_kl", "proxy_score", "gold_reward",
           "gold_z")


def expand(patterns: str) -> list[Path]:
    """Comma-separated folders or glob patterns -> the existing folders with a finished run (eval.json), sorted,
    each once."""
    found = []
    for pattern in filter(None, patterns.split(",")):
        found += sorted(glob.glob(pattern)) or [pattern]
    return [Path(p) for p in dict.fromkeys(found) if (Path(p) / "eval.json").exists()]


def read_run(run: Path) -> list[dict]:
    """One run folder -> its rows: one per metrics.jsonl line with rollout statistics (source "rollout"), then the
    final held-out evaluation (source "eval"). A run that optimised a reward model has its score in
    objective/scores (proxy_score) and the gold reward in objective/monitor_scores; a run that optimised "gold" has
    no proxy score."""
    config = load_checkpoint(run)["config"]
    reward_model = config["reward_model"]
    if reward_model != "gold" and config.get("monitor_reward") != "gold":
        raise ValueError(f"{run}: optimised {reward_model} without logging the gold reward; rerun with "
                         "--monitor_reward=gold")
    result = json.loads((run / "eval.json").read_text())
    gold_mean = result["ref_gold_reward"]                                     # the SFT model on held-out prompts
    gold_std = result["ref_gold_reward_se"] * math.sqrt(result["n"])          # se = std / sqrt(n)

    def row(source, step, kl, proxy, gold):
        return {"run": str(run), "reward_model": reward_model, "kl_coef": config["kl_coef"], "source": source,
                "step": step, "kl": kl, "sqrt_kl": math.sqrt(max(kl, 0.0)),  # a sampled k1 KL can dip below 0
                "proxy_score": proxy, "gold_reward": gold, "gold_z": (gold - gold_mean) / gold_std}

    rows = []
    for n, line in enumerate((run / "metrics.jsonl").read_text().splitlines(), 1):
        m = json.loads(line)
        if "objective/kl" not in m:                                           # not a PPO rollout row
            continue
        if "objective/monitor_scores" not in m and reward_model != "gold":
            raise ValueError(f"{run / 'metrics.jsonl'}:{n}: no objective/monitor_scores (the gold reward)")
        # a gold run's objective/scores has the missing-EOS penalty subtracted; its monitor (gold again) has not
        gold = m.get("objective/monitor_scores", m["objective/scores"])
        proxy = "" if reward_model == "gold" else m["objective/scores"]
        rows.append(row("rollout", m["step"], m["objective/kl"], proxy, gold))
    rows.append(row("eval", config["max_steps"], result["kl"], "", result["gold_reward"]))
    return rows


def collect(runs: list[Path]) -> list[dict]:
    return [r for run in runs for r in read_run(run)]


def groups(rows: list[dict]) -> list[str]:
    """The optimised rewards, in order of first appearance."""
    return list(dict.fromkeys(r["reward_model"] for r in rows))


def binned(rows: list[dict], reward_model: str, key: str, width: float, min_count: int = 2) -> list[dict]:
    """Rollout rows of the runs that optimised reward_model, pooled, in bins [k * width, (k + 1) * width) of
    sqrt(KL): per bin its index k, the mean sqrt(KL), the mean of `key` and its standard error (over rows). Bins
    with fewer than min_count rows are left out (a bin of one row has se nan)."""
    bins = {}
    for r in rows:
        if r["reward_model"] == reward_model and r["source"] == "rollout" and r[key] != "":
            bins.setdefault(int(r["sqrt_kl"] // width), []).append(r)
    out = []
    for k in sorted(bins):
        members = bins[k]
        if len(members) < min_count:
            continue
        values = [r[key] for r in members]
        mean = sum(values) / len(values)
        n = len(values)
        var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else math.nan  # unbiased sample variance
        out.append({"bin": k, "sqrt_kl": sum(r["sqrt_kl"] for r in members) / n, "mean": mean,
                    "se": math.sqrt(var / n), "count": n})
    return out


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in COLUMNS} for r in rows)


def plot(rows: list[dict], path: Path, width: float) -> bool:
    """Left: for each reward model optimised, its score and the gold reward (both in SFT-std units) vs sqrt(KL).
    Right: the gold reward vs sqrt(KL) for every optimised reward (gold included), with each run's held-out
    evaluation as a star. Binned training rollouts, +-1 standard error. False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    for i, reward in enumerate(groups(rows)):
        colour, name = f"C{i}", reward.removeprefix("ckpt:")
        if reward != "gold":
            for key, label, style in (("proxy_score", f"{name} score (optimised)", "o--"),
                                      ("gold_z", f"gold reward, standardised ({name} run)", "s-")):
                b = binned(rows, reward, key, width)
                left.errorbar([p["sqrt_kl"] for p in b], [p["mean"] for p in b], yerr=[p["se"] for p in b], fmt=style,
                              color=colour, capsize=2, label=label)
        b = binned(rows, reward, "gold_reward", width)
        right.errorbar([p["sqrt_kl"] for p in b], [p["mean"] for p in b], yerr=[p["se"] for p in b], fmt="o-",
                       color=colour, capsize=2, label=f"PPO on {name} (training rollouts)")
        final = [r for r in rows if r["reward_model"] == reward and r["source"] == "eval"]
        right.plot([r["sqrt_kl"] for r in final], [r["gold_reward"] for r in final], "*", color=colour,
                   markersize=10, label=f"PPO on {name} (held-out eval, end of run)")
    left.set_ylabel("score (std units of the SFT model's samples)")
    left.set_title("optimised proxy score vs gold reward")
    right.set_ylabel("gold reward")
    right.set_title("gold reward by optimised reward")
    for ax, corner in ((left, "upper left"), (right, "lower center")):  # the right panel's upper area holds data
        ax.set_xlabel("sqrt(KL(pi || pi_SFT)), sqrt(nats)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc=corner)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="out/frontier/ppo_kl_coef*,out/overopt/ppo_*",
                        help="comma-separated finished PPO run folders or glob patterns")
    parser.add_argument("--out", default="out/overopt", help="folder for overopt.csv and overopt.png")
    parser.add_argument("--bin_width", type=float, default=0.5, help="bin width in sqrt(KL)")
    args = parser.parse_args(argv)
    runs = expand(args.runs)
    if not runs:
        raise SystemExit(f"no finished runs (with eval.json) match --runs={args.runs}")
    rows = collect(runs)
    out = Path(args.out)
    write_csv(rows, out / "overopt.csv")
    plotted = plot(rows, out / "overopt.png", args.bin_width)
    for reward in groups(rows):
        proxy = {p["bin"]: p for p in binned(rows, reward, "proxy_score", args.bin_width)}
        count = len({r["run"] for r in rows if r["reward_model"] == reward})
        print(f"PPO on {reward}, {count} run(s):")
        print(f"{'sqrt(KL)':>9}{'rows':>6}{'gold reward':>16}{'proxy score':>16}")
        for g in binned(rows, reward, "gold_reward", args.bin_width):
            p = proxy.get(g["bin"])
            shown = f"{p['mean']:>8.3f} +- {p['se']:.3f}" if p else f"{'-':>16}"
            print(f"{g['sqrt_kl']:>9.2f}{g['count']:>6}{g['mean']:>8.3f} +- {g['se']:.3f}{shown}")
    plot_note = (f", {out / 'overopt.png'}" if plotted
                 else ' (no PNG: matplotlib is not installed; pip install -e ".[plot]")')
    print(f"wrote {out / 'overopt.csv'}{plot_note}")
    return rows


if __name__ == "__main__":
    main()
