"""Markdown tables of the measured toy-world CSVs in data/, so the docs' tables are generated, not retyped.

    python docs/tables.py frontier          # every point of data/frontier.csv (the frontier plot's data)
    python docs/tables.py overoptimisation  # the final held-out evaluation of each run in data/overoptimisation.csv

Standard library only; run it from the repository root. The CSVs are written by `python -m nanoalign.toy.frontier`
and `python -m nanoalign.toy.overoptimisation` (commands in docs/toy-world.md and docs/ppo.md).
"""
import csv
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data"


def frontier(path=DATA / "frontier.csv"):
    rows = list(csv.DictReader(open(path)))
    out = ["| algo | knob | gold reward (+- se) | KL nats (+- se) | win rate vs SFT | grammatical | length |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        knob = f"{r['knob']}={r['value']}" if r["knob"] else ""
        out.append(f"| {r['algo']} | {knob} | {float(r['gold_reward']):.3f} +- {float(r['gold_reward_se']):.3f} "
                   f"| {float(r['kl']):.3g} +- {float(r['kl_se']):.2g} | {float(r['win_rate']):.3f} "
                   f"| {float(r['grammatical']):.2f} | {float(r['length']):.1f} |")
    return "\n".join(out)


def overoptimisation(path=DATA / "overoptimisation.csv"):
    rows = [r for r in csv.DictReader(open(path)) if r["source"] == "eval"]
    out = ["| run | reward optimised | kl_coef | steps | KL nats | sqrt(KL) | gold reward | gold (SFT std units) |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| `{r['run']}` | {r['reward_model']} | {r['kl_coef']} | {r['step']} | {float(r['kl']):.3g} "
                   f"| {float(r['sqrt_kl']):.2f} | {float(r['gold_reward']):.3f} | {float(r['gold_z']):.2f} |")
    return "\n".join(out)


if __name__ == "__main__":
    tables = {"frontier": frontier, "overoptimisation": overoptimisation}
    if len(sys.argv) != 2 or sys.argv[1] not in tables:
        raise SystemExit(__doc__)
    print(tables[sys.argv[1]]())
