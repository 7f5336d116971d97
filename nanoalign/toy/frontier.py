"""The reward-vs-KL frontier of the toy world: the picture of the DPO paper's Figure 2 (left), in minutes on a CPU.

    python -m nanoalign.toy.frontier --algos=dpo --betas=0.03,0.1,0.3,1.0 [--out=out/frontier] [--max_steps=...]
    python -m nanoalign.toy.frontier --algos=cdpo,hinge,orpo,coh --values=default   # one run each, default settings
    python -m nanoalign.toy.frontier --algos=dpo,ipo --defaults=cdpo,orpo        # sweeps and default runs, one plot

For each algorithm, sweep its KL knob (the table KNOBS below: DPO's beta, ...) with every other setting at its
default, run each point through train.py's main() (the toy world is built once and reused), and collect each run's
eval.json (gold reward and KL(pi || pi_SFT) on held-out prompts) into <out>/frontier.csv and <out>/frontier.json,
plus <out>/frontier.png (gold reward vs KL, one colour and marker per algorithm, the SFT model at KL = 0) when
matplotlib is installed. Any other --key=value goes to every run (e.g. --max_steps=100). Without --values/--betas
each algorithm sweeps the values of its table entry; the value "default" is a run at the algorithm's own defaults,
in <out>/<algo>_default (the default-setting rows of docs/toy-world.md); --defaults=a,b adds such runs next to the --algos sweeps.
An item ending in .toml is a preset (python train.py <preset>): its algorithm at the preset's settings, in
<out>/<preset name>_default, plotted as <preset name> (data/coh_toy.toml: Chain of Hindsight's toy-world recipe).
A finished run is reused, not retrained: when <out>/<algo>_<knob><value>/eval.json exists and the config saved in
its ckpt.pt equals the one this sweep asks for (keys left "" or "auto" are filled at run time and not compared) and
neither its data nor its init checkpoint is newer than its eval.json. --retrain trains every point again.
Departure from the paper: one run per knob value at a fixed step count (the paper also plots several checkpoints
of each run), and KL is per sequence on 256 held-out prompts with 1 sample each.
"""
import argparse
import csv
import itertools
import json
from pathlib import Path

from nanoalign.algos import algo_config
from nanoalign.algos.raft import best_of_n_kl, best_of_n_sampler
from nanoalign.checkpoint import checkpoint_path, load_checkpoint
from nanoalign.config import config_to_dict, load_config
from nanoalign.data import read_jsonl
from nanoalign.loading import model_from_checkpoint
from nanoalign.toy import gold_scorer
from nanoalign.toy.evaluate import evaluate, model_sampler
from nanoalign.toy.pipeline import default_recipe, toy_dir, toy_run

ROOT = Path(__file__).resolve().parents[2]  # the repository root, where train.py lives

# algorithm -> (the config key that sets its KL strength, values swept by default). A larger DPO-family beta
# keeps the policy closer to the reference. Add a line when an algorithm lands.
KNOBS = {
    "dpo": ("beta", (0.03, 0.1, 0.3, 1.0)),
    "cdpo": ("beta", (0.03, 0.1, 0.3, 1.0)),
    "robust": ("beta", (0.03, 0.1, 0.3, 1.0)),
    "hinge": ("beta", (0.03, 0.1, 0.3, 1.0)),
    "rdpo": ("beta", (0.03, 0.1, 0.3, 1.0)),
    "dpop": ("beta", (0.03, 0.1, 0.3, 1.0)),
    "rpo": ("beta", (0.03, 0.1, 0.3, 1.0)),  # beta of its DPO term (the NLL term pulls towards the chosen answers)
    "ipo": ("beta", (0.1, 0.3, 1.0, 3.0)),
    "kto": ("beta", (0.03, 0.1, 0.3, 1.0)),
    # reference-free: no KL term; a larger beta reaches the target margin (gamma / beta) sooner and stops earlier
    "simpo": ("beta", (1.0, 2.0, 5.0, 10.0)),
    "cpo": ("beta", (0.03, 0.1, 0.3, 1.0)),
    "orpo": ("orpo_lambda", (0.05, 0.1, 0.3, 1.0)),  # weight of the odds-ratio term next to the NLL (no reference)
    "coh": ("max_steps", (100, 200, 400)),  # SFT loss, no KL term: the amount of training is the brake
    "ppo": ("kl_coef", (0.01, 0.05, 0.2, 0.5)),  # beta of PPO's per-token KL penalty (RM scores in std units)
    "online_dpo": ("beta", (0.1, 0.3, 1.0, 3.0)),
    "rloo": ("kl_coef", (0.02, 0.05, 0.2, 0.5)),  # beta of the KL penalty in the reward: larger -> closer
    "grpo": ("kl_coef", (0.0, 0.04, 0.2, 1.0)),  # beta of the k3 KL loss term: larger -> closer
    "raft": ("max_steps", (25, 50, 100)),  # no KL term: the amount of training is the brake
    "pro": ("pro_sft_weight", (0.1, 0.3, 1.0, 3.0)),  # reference-free: the NLL of the best answers is the anchor
    "rrhf": ("rrhf_rank_weight", (0.3, 1.0, 3.0, 10.0)),  # reference-free: the ranking hinge's weight next to the NLL
    "lipo": ("beta", (0.03, 0.1, 0.3, 1.0)),
    "npo": ("beta", (0.03, 0.1, 0.3, 1.0)),  # larger -> the push on unlearned answers fades sooner (beta -> 0: GA)
    "tdpo": ("beta", (0.03, 0.1, 0.3, 1.0)),  # beta of the margin and of the sequential KL term
    "dro": ("tau", (0.1, 0.3, 1.0, 3.0)),  # tau of the squared log-ratio (DRO's KL strength): larger -> closer
    "cringe": ("max_steps", (100, 200, 400)),  # no reference, no KL term: the amount of training is the brake
    "sdpo": ("beta", (0.03, 0.1, 0.3, 1.0)),  # DPO's beta at every step (each against the previous step's model)
    "sppo": ("eta", (1.0, 3.0, 10.0, 30.0)),  # Hedge step size: larger -> each iteration moves further (no pi_0 anchor)
    "self_reward": ("beta", (0.1, 0.3, 1.0, 3.0)),  # online DPO's beta (toy world: data/self_reward_toy.toml)
}
COLUMNS = ("algo", "knob", "value", "kl", "kl_se", "gold_reward", "gold_reward_se", "win_rate", "grammatical",
           "length", "out_dir")


def run_training(argv: list[str]) -> None:
    """`python train.py <argv> --overwrite` without --data: a toy-world run, trained and evaluated (pipeline.toy_run);
    the sweep has decided that the run's folder holds nothing worth keeping (an unfinished or stale run)."""
    toy_run(load_config([*argv, "--overwrite"], algo_config))


def requested_config(argv: list[str]) -> dict:
    """The config train.py resolves from `argv` before the toy world fills in its data and init paths."""
    return config_to_dict(load_config(argv, algo_config))


RUN_KEYS = ("out_dir", "overwrite", "resume")  # how a run was started, not what it trained


def finished_run(out_dir: Path, requested: dict) -> bool:
    """True when out_dir holds an evaluated run of the `requested` config that is newer than its inputs."""
    result, ckpt = out_dir / "eval.json", checkpoint_path(out_dir)
    if not (result.exists() and ckpt.exists()):
        return False
    saved = load_checkpoint(out_dir)["config"]
    for key, value in requested.items():  # "" / "auto": the toy world's paths, device, dtype, chosen at run time
        if key not in RUN_KEYS and value not in ("", "auto") and saved.get(key, object()) != value:
            return False
    inputs = [Path(saved.get("data") or "")]  # Path("") is ".", not a file: no data file, nothing to compare
    if saved.get("init_from", "").startswith("ckpt:"):
        inputs.append(checkpoint_path(saved["init_from"]))
    finished = result.stat().st_mtime
    return not any(path.is_file() and path.stat().st_mtime > finished for path in inputs)  # a rebuilt input: stale


def sweep(algos: list[str], values: list[float | None] | None, out: Path, extra: list[str] = (), knobs: dict = KNOBS,
          retrain: bool = False) -> list[dict]:
    """Train and evaluate one run per (algorithm, knob value), or reuse a finished one; a value None is a run at
    the algorithm's defaults in <out>/<algo>_default. Returns the points, SFT first."""
    points = []
    for item in algos:
        preset = [item] if item.endswith(".toml") else []  # a preset file: its algo, at its settings
        algo, name = (requested_config(preset)["algo"], Path(item).stem) if preset else (item, item)
        if algo not in knobs:
            raise SystemExit(f"no KL knob known for {algo!r}; add it to KNOBS in {__file__} (known: {', '.join(knobs)})")
        knob, defaults = knobs[algo]
        for value in values or defaults:
            setting = [] if value is None else [f"--{knob}={value:g}"]  # :g: 2.0 -> "2" for integer knobs
            out_dir = out / (f"{name}_default" if value is None else f"{name}_{knob}{value}")
            argv = [*preset, f"--algo={algo}", *setting, f"--out_dir={out_dir}", *extra]
            requested = requested_config(argv)
            if not retrain and finished_run(out_dir, requested):
                print(f"frontier: reusing {out_dir} (finished, same config)")
            else:
                run_training(argv)
            value = requested[knob] if value is None else value
            result = json.loads((out_dir / "eval.json").read_text())
            if not points:  # every run samples the same SFT reference with the same seed: one point for it
                points.append({"algo": "sft", "knob": "", "value": "", "kl": 0.0, "kl_se": 0.0,
                               "gold_reward": result["ref_gold_reward"], "gold_reward_se": result["ref_gold_reward_se"],
                               "win_rate": 0.5, "grammatical": result["ref_grammatical"],
                               "length": result["ref_length"], "out_dir": ""})
            points.append({"algo": name, "knob": knob, "value": value, "out_dir": str(out_dir),
                           **{k: result[k] for k in COLUMNS if k in result and k not in ("algo", "out_dir")}})
    return points


def best_of_n_points(ns: list[int], seed: int = 0) -> list[dict]:
    """Best-of-n sampling from the SFT model, the best of n by the gold reward (no training; algos/raft.py): one
    point per n on the same held-out prompts and seed as every run's eval.json. Its KL is not sampled but the closed
    form log n - (n - 1)/n, exact for untied rewards and an upper bound here (gold rewards of short reviews tie)."""
    budget = default_recipe().max_new_tokens
    reference, tokenizer = model_from_checkpoint(load_checkpoint(toy_dir() / "sft"))
    prompts = [row["prompt"] for row in read_jsonl(toy_dir() / "corpus" / "eval_prompts.jsonl", "prompt")]
    points = []
    for n in ns:
        sampler = best_of_n_sampler(model_sampler(reference, tokenizer, budget), gold_scorer, tokenizer, n)
        result = evaluate(None, reference, tokenizer, prompts, seed=seed, max_new_tokens=budget, sampler=sampler)
        points.append({"algo": "best_of_n", "knob": "n", "value": n, "out_dir": "",
                       **{k: result[k] for k in COLUMNS if k in result and k not in ("algo", "out_dir")},
                       "kl": best_of_n_kl(n), "kl_se": 0.0})
    return points


def write_points(points: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "frontier.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: p.get(k, "") for k in COLUMNS} for p in points)
    (out / "frontier.json").write_text(json.dumps(points, indent=1) + "\n")


def plot(points: list[dict], path: Path) -> bool:
    """Gold reward vs KL with +-1 standard error bars: one colour and marker per algorithm (a line through its
    sweep, knob values written beside the points), a symlog KL axis (runs span 0.1 to 100 nats), the legend outside
    the axes; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    algos = list(dict.fromkeys(p["algo"] for p in points if p["algo"] != "sft"))
    colours = plt.get_cmap("tab20").colors if len(algos) > 10 else plt.get_cmap("tab10").colors
    styles = zip(itertools.cycle(colours), itertools.cycle("osD^vP*Xhp<>"))  # 12 markers x 10-20 colours
    columns = 1 if len(algos) <= 18 else 2  # a legend of one column holds ~18 entries at this height
    fig, ax = plt.subplots(figsize=(7 + 1.6 * columns, 4.6))
    for algo, (colour, marker) in zip(algos, styles):
        run = sorted((p for p in points if p["algo"] == algo), key=lambda p: p["kl"])
        ax.errorbar([p["kl"] for p in run], [p["gold_reward"] for p in run], xerr=[p["kl_se"] for p in run],
                    yerr=[p["gold_reward_se"] for p in run], fmt=marker + "-", color=colour, markersize=5, capsize=2,
                    elinewidth=0.8, label=f"{algo} ({run[0]['knob']})" if len(run) > 1 else algo)
        for p in (run if len(run) > 1 else []):  # a single default point needs no value label
            ax.annotate(f"{p['value']:g}", (p["kl"], p["gold_reward"]), textcoords="offset points", xytext=(4, -10),
                        fontsize=6, color=colour)
    for p in points:
        if p["algo"] == "sft":
            ax.plot([0.0], [p["gold_reward"]], "k*", markersize=12, label="SFT (reference)")
    ax.set_xscale("symlog", linthresh=1.0)  # linear up to 1 nat (SFT at 0 stays on the axis), logarithmic beyond
    ticks = [t for t in (0, 0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 200) if t <= 1.5 * max(p["kl"] for p in points)]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_xlabel("KL(pi || pi_SFT), nats per sample (linear to 1, log beyond)")
    ax.set_ylabel("gold reward (mean over held-out prompts)")
    ax.set_title("toy controlled sentiment: reward vs KL frontier")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, ncols=columns)  # outside
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algos", default="dpo", help="comma-separated algorithms with an entry in KNOBS")
    parser.add_argument("--values", "--betas", dest="values", default="",
                        help="comma-separated knob values for every algorithm (default: each one's table values); "
                             "'default' is one run at the algorithm's own settings, in <out>/<algo>_default")
    parser.add_argument("--out", default="out/frontier", help="folder for the runs, frontier.csv/.json/.png")
    parser.add_argument("--best_of_n", default="", help="comma-separated n: add best-of-n points (no training)")
    parser.add_argument("--defaults", default="", help="comma-separated algorithms to add at their default settings")
    parser.add_argument("--retrain", action="store_true", help="train every point again, even a finished run")
    args, extra = parser.parse_known_args(argv)
    values = [None if v == "default" else float(v) for v in args.values.split(",")] if args.values else None
    out = Path(args.out)
    points = sweep([a for a in args.algos.split(",") if a], values, out, extra, retrain=args.retrain)
    if args.defaults:
        at_defaults = sweep(args.defaults.split(","), [None], out, extra, retrain=args.retrain)
        points += at_defaults[1:] if points else at_defaults  # one SFT point
    if args.best_of_n:  # after the sweep, which builds the toy world if it is missing
        points += best_of_n_points([int(n) for n in args.best_of_n.split(",")])
    write_points(points, out)
    plotted = plot(points, out / "frontier.png")
    print(f"{'algo':<10}{'knob':>18}{'KL':>9}{'gold reward':>13}{'win rate':>10}{'grammatical':>13}")
    for p in points:
        knob = f"{p['knob']}={p['value']:g}" if p["knob"] else "-"
        print(f"{p['algo']:<10}{knob:>18}{p['kl']:>9.2f}{p['gold_reward']:>13.3f}{p['win_rate']:>10.3f}"
              f"{p['grammatical']:>13.3f}")
    png = f", {out / 'frontier.png'}" if plotted else ' (no PNG: matplotlib is not installed; pip install -e ".[plot]")'
    print(f"wrote {out / 'frontier.csv'}, {out / 'frontier.json'}{png}")
    return points


if __name__ == "__main__":
    main()
