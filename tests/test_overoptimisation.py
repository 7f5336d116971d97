"""nanoalign/toy/overoptimisation.py: rows from run folders, the gold reward's standardisation, grouping by the
optimised reward, binning and the CSV, on tiny synthetic run folders (metrics.jsonl, eval.json and a ckpt.pt that
holds only the config; no training)."""
import csv
import json

import pytest
import torch

from nanoalign.toy import overoptimisation as oo

# the SFT model's held-out gold reward: mean 0.5, std 0.2 (se 0.05 over n = 16)
EVAL = {"n": 16, "ref_gold_reward": 0.5, "ref_gold_reward_se": 0.05, "kl": 2.25, "gold_reward": 0.8}
PROXY = "ckpt:out/toy/rm"


def make_run(root, name, rollouts, reward_model=PROXY, monitor_reward="gold", kl_coef=0.05, extra_rows=()):
    """rollouts: (step, kl, scores, monitor or None) -> a run folder with metrics.jsonl, eval.json and ckpt.pt."""
    run = root / name
    run.mkdir()
    lines = [json.dumps(row) for row in extra_rows]
    for step, kl, scores, monitor in rollouts:
        m = {"step": step, "loss": 0.1, "objective/kl": kl, "objective/scores": scores}
        if monitor is not None:
            m["objective/monitor_scores"] = monitor
        lines.append(json.dumps(m))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run / "eval.json").write_text(json.dumps(EVAL))
    config = {"reward_model": reward_model, "monitor_reward": monitor_reward, "kl_coef": kl_coef,
              "max_steps": rollouts[-1][0] if rollouts else 0}
    torch.save({"config": config}, run / "ckpt.pt")
    return run


def test_proxy_run_rows_read_proxy_from_scores_and_gold_from_the_monitor(tmp_path):
    run = make_run(tmp_path, "p", [(10, -0.01, -0.2, 0.5), (20, 4.0, 1.5, 0.7)],
                   extra_rows=[{"step": 5, "loss": 0.3}])                     # a row without rollout stats: skipped
    rows = oo.read_run(run)
    assert [r["source"] for r in rows] == ["rollout", "rollout", "eval"]
    first, second, final = rows
    assert first["sqrt_kl"] == 0.0 and first["kl"] == -0.01                    # negative sampled KL clamps to 0
    assert second["sqrt_kl"] == 2.0 and second["proxy_score"] == 1.5 and second["gold_reward"] == 0.7
    assert second["gold_z"] == pytest.approx((0.7 - 0.5) / 0.2)               # std = se * sqrt(n)
    assert second["kl_coef"] == 0.05 and second["reward_model"] == PROXY and second["run"] == str(run)
    assert final["step"] == 20 and final["kl"] == 2.25 and final["sqrt_kl"] == 1.5 and final["proxy_score"] == ""
    assert final["gold_reward"] == 0.8 and final["gold_z"] == pytest.approx(1.5)


def test_gold_run_has_no_proxy_and_prefers_the_monitor_without_eos_penalty(tmp_path):
    with_monitor = make_run(tmp_path, "g1", [(10, 1.0, 0.4, 0.9)], reward_model="gold")  # scores: minus a penalty
    without = make_run(tmp_path, "g2", [(10, 1.0, 0.4, None)], reward_model="gold", monitor_reward="")
    assert oo.read_run(with_monitor)[0]["gold_reward"] == 0.9 and oo.read_run(with_monitor)[0]["proxy_score"] == ""
    assert oo.read_run(without)[0]["gold_reward"] == 0.4


def test_proxy_run_without_the_gold_monitor_is_an_error(tmp_path):
    no_monitor = make_run(tmp_path, "p1", [(10, 1.0, 0.4, None)], monitor_reward="")
    with pytest.raises(ValueError, match="without logging the gold reward"):
        oo.read_run(no_monitor)
    missing_row = make_run(tmp_path, "p2", [(10, 1.0, 0.4, 0.6), (20, 2.0, 0.5, None)])
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: no objective/monitor_scores"):
        oo.read_run(missing_row)


def test_binning_pools_the_runs_of_one_optimised_reward_by_sqrt_kl(tmp_path):
    a = make_run(tmp_path, "a", [(10, 0.01, 0.1, 0.50), (20, 0.36, 0.5, 0.60), (30, 1.21, 1.0, 0.70)])
    b = make_run(tmp_path, "b", [(10, 0.04, 0.3, 0.54), (20, 0.49, 0.7, 0.64)])
    g = make_run(tmp_path, "g", [(10, 0.09, 0.9, 0.9), (20, 0.16, 0.9, 0.9)], reward_model="gold")  # never pooled
    rows = oo.collect([a, g, b])
    assert oo.groups(rows) == [PROXY, "gold"]
    gold = oo.binned(rows, PROXY, "gold_reward", width=0.5)                   # sqrt(KL): 0.1, 0.2 | 0.6, 0.7 | 1.1
    assert [p["bin"] for p in gold] == [0, 1] and [p["count"] for p in gold] == [2, 2]  # bin 2 has one row: dropped
    assert gold[0]["sqrt_kl"] == pytest.approx(0.15) and gold[0]["mean"] == pytest.approx(0.52)
    assert gold[0]["se"] == pytest.approx(0.02)                              # values 0.50, 0.54: sd 0.0283 / sqrt(2)
    proxy = oo.binned(rows, PROXY, "proxy_score", width=0.5, min_count=1)
    assert [p["mean"] for p in proxy] == pytest.approx([0.2, 0.6, 1.0]) and proxy[2]["se"] != proxy[2]["se"]  # nan
    assert oo.binned(rows, "gold", "proxy_score", width=0.5) == []            # gold runs have no proxy score
    assert [p["mean"] for p in oo.binned(rows, "gold", "gold_reward", width=0.5)] == pytest.approx([0.9])


def test_main_writes_the_csv_from_glob_patterns(tmp_path, capsys):
    for name, kl in (("ppo_kl_coef0.01", 4.0), ("ppo_kl_coef0.2", 1.0)):
        make_run(tmp_path, name, [(10, kl / 4, 0.2, 0.55), (20, kl, 0.9, 0.75)])
    make_run(tmp_path, "gold_run", [(10, 1.0, 0.6, 0.6)], reward_model="gold")
    (tmp_path / "ppo_kl_coef0.5").mkdir()                                     # unfinished (no eval.json): skipped
    out = tmp_path / "overopt"
    rows = oo.main([f"--runs={tmp_path}/ppo_kl_coef*,{tmp_path}/gold_run", f"--out={out}"])
    assert len(rows) == 2 * 3 + 2
    with open(out / "overopt.csv") as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == oo.COLUMNS and len(table) == len(rows)
    assert [r["run"].rsplit("/", 1)[-1] for r in table[::3][:2]] == ["ppo_kl_coef0.01", "ppo_kl_coef0.2"]
    assert float(table[1]["sqrt_kl"]) == 2.0 and table[-1]["reward_model"] == "gold"
    assert "PPO on gold, 1 run(s)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no finished runs"):
        oo.main([f"--runs={tmp_path}/nothing*", f"--out={out}"])
