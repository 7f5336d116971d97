"""Reward-model over-optimisation on the toy world (Gao et al. 2022, "Scaling Laws for Reward Model
Overoptimization", arXiv:2210.10760, Figure 1 and Sec. 3): while PPO optimises a proxy reward model, the proxy score
keeps rising with the distance from the initial policy d = sqrt(KL(pi || pi_init)) (their x-axis), and the gold
reward rises, then flattens or falls. PPO against the gold reward itself is the control.

    python -m nanoalign.toy.overoptimisation [--proxy=out/frontier/ppo_kl_coef*] [--gold=out/overopt/ppo_gold_*]
                                             [--out=out/overopt] [--bin_width=0.5]

Reads finished PPO runs (`train.py --algo=ppo --out_dir=...`; on the toy world the pipeline logs the gold reward of
every rollout as objective/monitor_scores beside the optimised score objective/scores) and writes
<out>/overopt.csv (one row per logged step of every run, plus each run's final held-out evaluation) and, when
matplotlib is installed, <out>/overopt.png. --proxy and --gold are comma-separated folders or glob patterns: the
runs that optimised the proxy reward model and the runs that optimised the gold reward (the folder name is not
trusted to say which).

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

COLUMNS = ("run", "optimised", "kl_coef", "source", "step", "kl", "sqrt_kl", "proxy_score", "gold_reward", "gold_z")


def expand(patterns: str) -> list[Path]:
    """Comma-separated folders or glob patterns -> the existing folders, sorted, each once."""
    found = []
    for pattern in filter(None, patterns.split(",")):
        found += sorted(glob.glob(pattern)) or ([pattern] if Path(pattern).is_dir() else [])
    return [Path(p) for p in dict.fromkeys(found) if Path(p).is_dir()]


def read_run(run: Path, optimised: str) -> list[dict]:
    """One run folder -> its rows: one per metrics.jsonl line with rollout statistics (source "rollout"), then the
    final held-out evaluation (source "eval"). optimised: "proxy" (objective/scores is the proxy RM's score and
    objective/monitor_scores the gold reward) or "gold" (the gold reward is the optimised score)."""
    if optimised not in ("proxy", "gold"):
        raise ValueError(f"optimised must be 'proxy' or 'gold', got {optimised!r}")
    result = json.loads((run / "eval.json").read_text())
    gold_mean = result["ref_gold_reward"]                                     # the SFT model on held-out prompts
    gold_std = result["ref_gold_reward_se"] * math.sqrt(result["n"])          # se = std / sqrt(n)
    rows = []

    def row(source, step, kl, kl_coef, proxy, gold):
        return {"run": str(run), "optimised": optimised, "kl_coef": kl_coef, "source": source, "step": step,
                "kl": kl, "sqrt_kl": math.sqrt(max(kl, 0.0)),  # the sampled k1 KL can dip below 0 near the start
                "proxy_score": proxy, "gold_reward": gold, "gold_z": (gold - gold_mean) / gold_std}

    for n, line in enumerate((run / "metrics.jsonl").read_text().splitlines(), 1):
        m = json.loads(line)
        if "objective/kl" not in m:                                           # not a PPO rollout row
            continue
        if optimised == "proxy" and "objective/monitor_scores" not in m:
            raise ValueError(f"{run / 'metrics.jsonl'}:{n}: no objective/monitor_scores (the gold reward); rerun with "
                             "--monitor_reward=gold")
        # a gold run's objective/scores has the missing-EOS penalty subtracted; its monitor (gold again) has not
        gold = m.get("objective/monitor_scores", m["objective/scores"])
        proxy = m["objective/scores"] if optimised == "proxy" else ""
        rows.append(row("rollout", m["step"], m["objective/kl"], m.get("objective/kl_coef", ""), proxy, gold))
    last_coef = rows[-1]["kl_coef"] if rows else ""
    rows.append(row("eval", rows[-1]["step"] if rows else "", result["kl"], last_coef, "", result["gold_reward"]))
    return rows


def collect(proxy_runs: list[Path], gold_runs: list[Path]) -> list[dict]:
    return ([r for run in proxy_runs for r in read_run(run, "proxy")]
            + [r for run in gold_runs for r in read_run(run, "gold")])


def binned(rows: list[dict], optimised: str, key: str, width: float, min_count: int = 2) -> list[dict]:
    """Rollout rows of one group, pooled over runs, in bins [k * width, (k + 1) * width) of sqrt(KL): per bin the
    index k, the mean sqrt(KL), the mean of `key` and its standard error (over rows). Bins with fewer than min_count rows
    are left out (a bin of one row has se nan)."""
    bins = {}
    for r in rows:
        if r["optimised"] == optimised and r["source"] == "rollout" and r[key] != "":
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
    """Left: the proxy-optimised runs, proxy score and gold reward (both in SFT-std units) vs sqrt(KL), binned.
    Right: the gold reward vs sqrt(KL) of PPO on the proxy RM and PPO on the gold reward, binned, with each run's
    held-out evaluation. False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, label, style in (("proxy_score", "proxy RM score (optimised)", "o--"),
                              ("gold_z", "gold reward, standardised", "s-")):
        b = binned(rows, "proxy", key, width)
        left.errorbar([p["sqrt_kl"] for p in b], [p["mean"] for p in b], yerr=[p["se"] for p in b], fmt=style,
                      capsize=2, label=label)
    left.set_ylabel("score (std units of the SFT model's samples)")
    left.set_title("PPO on the proxy reward model")
    for optimised, colour in (("proxy", "C0"), ("gold", "C3")):
        b = binned(rows, optimised, "gold_reward", width)
        right.errorbar([p["sqrt_kl"] for p in b], [p["mean"] for p in b], yerr=[p["se"] for p in b], fmt="o-",
                       color=colour, capsize=2, label=f"PPO on the {optimised} reward (training rollouts)")
        final = [r for r in rows if r["optimised"] == optimised and r["source"] == "eval"]
        right.plot([r["sqrt_kl"] for r in final], [r["gold_reward"] for r in final], "*", color=colour,
                   markersize=10, label=f"PPO on the {optimised} reward (held-out eval, end of run)")
    right.set_ylabel("gold reward")
    right.set_title("gold reward: optimising the proxy vs the gold reward")
    for ax in (left, right):
        ax.set_xlabel("sqrt(KL(pi || pi_SFT)), sqrt(nats)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proxy", default="out/frontier/ppo_kl_coef*", help="runs that optimised the proxy RM")
    parser.add_argument("--gold", default="out/overopt/ppo_gold_*", help="runs that optimised the gold reward")
    parser.add_argument("--out", default="out/overopt", help="folder for overopt.csv and overopt.png")
    parser.add_argument("--bin_width", type=float, default=0.5, help="bin width in sqrt(KL)")
    args = parser.parse_args(argv)
    proxy_runs, gold_runs = expand(args.proxy), expand(args.gold)
    if not proxy_runs and not gold_runs:
        raise SystemExit(f"no run folders match --proxy={args.proxy} or --gold={args.gold}")
    rows = collect(proxy_runs, gold_runs)
    out = Path(args.out)
    write_csv(rows, out / "overopt.csv")
    plotted = plot(rows, out / "overopt.png", args.bin_width)
    for optimised in ("proxy", "gold"):
        proxy, gold = (binned(rows, optimised, key, args.bin_width) for key in ("proxy_score", "gold_reward"))
        if not gold:
            continue
        proxy_at = {p["bin"]: p for p in proxy}
        print(f"PPO on the {optimised} reward ({sum(r['optimised'] == optimised for r in rows)} rows):")
        print(f"{'sqrt(KL)':>9}{'rows':>6}{'gold reward':>16}{'proxy score':>16}")
        for g in gold:
            p = proxy_at.get(g["bin"])
            shown = f"{p['mean']:>8.3f} +- {p['se']:.3f}" if p else f"{'-':>16}"
            print(f"{g['sqrt_kl']:>9.2f}{g['count']:>6}{g['mean']:>8.3f} +- {g['se']:.3f}{shown}")
    print(f"wrote {out / 'overopt.csv'}" + (f", {out / 'overopt.png'}" if plotted else " (no plot: pip install matplotlib)"))
    return rows


if __name__ == "__main__":
    main()
