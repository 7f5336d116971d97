"""The listwise algorithms end to end: LiPO's cached reference equals the live one (first loss = sum Delta log 2),
two steps of each on a small file, and (integration) the toy world's listwise stage and `train.py --algo=...` on it."""
import contextlib
import json
import math
import random
from pathlib import Path

import pytest
import torch

from nanoalign.algos import algo_config, get_algorithm
from nanoalign.algos.lipo import LiPO, lambda_weights
from nanoalign.algos.pro import PRO, pro_loss
from nanoalign.algos.rrhf import RRHF, rrhf_loss
from nanoalign.config import load_config
from nanoalign.data import read_jsonl
from nanoalign.logps import batch_logps
from nanoalign.loading import build_policy
from nanoalign.toy.pipeline import RECIPES, prepare
from nanoalign.trainer import Context
from train import main as train_main

CPU = torch.device("cpu")
WORDS = "the a film plot was good bad very not really great dull and but acting music".split()
LISTWISE = ("pro", "rrhf", "lipo")


@pytest.fixture(scope="module")
def list_file(tmp_path_factory):
    """21 lists of 2-4 distinct completions with random scores (some tied, none fully tied)."""
    rng = random.Random(0)
    rows = []
    while len(rows) < 21:
        k = rng.randint(2, 4)
        completions = list(dict.fromkeys(" " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
                                         for _ in range(k)))
        scores = [rng.choice([0.0, 0.5, 1.0]) for _ in completions]
        if len(completions) >= 2 and len(set(scores)) > 1:
            rows.append({"prompt": rng.choice(WORDS), "completions": completions, "scores": scores})
    path = tmp_path_factory.mktemp("data") / "lists.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_args(data, out_dir, **kw):
    args = dict(algo="lipo", data=data, out_dir=out_dir, init_from="scratch", tokenizer="bytes", n_layer=1, n_head=2,
                n_embd=32, block_size=96, max_len=80, batch_size=8, micro_batch_size=4, lr=3e-3, warmup_steps=1,
                max_steps=2, log_interval=1, dtype="float32", dropout=0.0, seed=3)
    args.update(kw)
    return [f"--{k}={v}" for k, v in args.items()]


def build(algorithm_cls, *args):
    cfg = load_config(list(args), algo_config)
    torch.manual_seed(cfg.seed)
    policy, tokenizer = build_policy(cfg, CPU)
    ctx = Context(CPU, 0, 1, cfg.micro_batch_size, 1, contextlib.nullcontext)
    return algorithm_cls(cfg, policy, tokenizer, ctx), policy


def test_lipo_precomputed_reference_equals_live_and_first_loss_is_sum_delta_log_2(list_file, tmp_path):
    cached, policy = build(LiPO, *tiny_args(list_file, tmp_path))
    live, _ = build(LiPO, *tiny_args(list_file, tmp_path, ref_logps="live"))
    assert cached.reference is None and live.reference.frozen is not None
    batch = cached.collate(cached.examples[:4])
    live_ref = live.reference_logps(live.collate(live.examples[:4]))
    for name in cached.ref_names:
        torch.testing.assert_close(batch[name], live_ref[name], rtol=1e-6, atol=1e-5)
    loss, metrics = cached.loss(policy, batch)  # pi = pi_ref: every s = 0, each ordered pair costs Delta log 2
    scores, valid = batch["scores"], batch["valid"]
    delta = lambda_weights(torch.zeros_like(scores), scores, valid)
    better = (scores[:, :, None] > scores[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    expected = (delta * better).sum((-2, -1)).mean() * math.log(2)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5) and metrics["rewards/margins"] == 0
    assert live.loss(live.policy, live.collate(live.examples[:4]))[0].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("algorithm_cls, weights, ranking", [
    (PRO, dict(pro_sft_weight=0.3, pro_temperature="reward_difference"),
     lambda r, s, v: pro_loss(r, s, v, temperature="reward_difference")),
    (RRHF, dict(rrhf_rank_weight=2.5), lambda r, s, v: 2.5 * rrhf_loss(r, s, v))])
def test_pro_and_rrhf_weigh_their_ranking_and_best_completion_nll_as_their_papers(algorithm_cls, weights, ranking,
                                                                                 list_file, tmp_path):
    """PRO: L_PRO + beta L_SFT; RRHF (Eq. 4): w L_rank + L_ft; both on r = log pi / |y| and the token-mean NLL of the
    top-scored completion(s), computed here row by row from the policy's per-completion log-probs."""
    algo, policy = build(algorithm_cls, *tiny_args(list_file, tmp_path, algo=algorithm_cls.name, **weights))
    batch = algo.collate(algo.examples[:4])
    loss, metrics = algo.loss(policy, batch)
    logps, counts, _ = batch_logps(policy, batch["input_ids"], batch["loss_mask"])  # (N,) one row per completion
    scores, valid = batch["scores"], batch["valid"]
    rows = iter(range(len(logps)))
    avg, best_logps, best_counts = torch.zeros(scores.shape), [], []
    for b in range(scores.shape[0]):
        top = max(scores[b, j] for j in range(scores.shape[1]) if valid[b, j])
        for j in range(scores.shape[1]):
            if valid[b, j]:
                n = next(rows)
                avg[b, j] = logps[n] / counts[n]
                if scores[b, j] == top:
                    best_logps.append(logps[n]), best_counts.append(counts[n])
    nll = -sum(best_logps) / sum(best_counts)  # token mean over every top-scored completion
    sft_weight = weights.get("pro_sft_weight", 1.0)
    expected = ranking(avg, scores, valid).mean() + sft_weight * nll
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["nll_loss"].item() == pytest.approx(nll.item(), rel=1e-5)


@pytest.mark.parametrize("algo", LISTWISE)
def test_every_listwise_algorithm_runs_two_steps_and_logs_its_metrics(algo, list_file, tmp_path):
    out = train_main(tiny_args(list_file, tmp_path / algo, algo=algo, eval_data=list_file, eval_interval=2,
                               eval_batches=2))
    records = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)
    expected = {"rewards/accuracies", "rewards/margins", "rewards/best", "rewards/worst", "logps/best", "logps/worst"}
    expected |= {"nll_loss", "ranking_loss"} if algo != "lipo" else set()
    assert expected <= records[-1].keys() and {f"eval/{k}" for k in expected} <= records[-1].keys()


@pytest.mark.integration
def test_the_listwise_stage_is_built_only_for_listwise_runs_and_reuses_the_annotation_samples(tmp_path, monkeypatch):
    """On the tiny world: a DPO run builds no listwise/; a PRO run builds lists.jsonl from the annotation prompts
    (listwise_k samples each, the same samples as annotations/ when listwise_k = completions_per_prompt), and
    train.py --algo=pro/rrhf/lipo trains on it and writes eval.json."""
    monkeypatch.setenv("NANOALIGN_TOY_DIR", str(tmp_path / "toy"))
    monkeypatch.setenv("NANOALIGN_TOY_RECIPE", "tiny")
    tiny = RECIPES["tiny"]
    _, timings = prepare(load_config(["--algo=dpo", "--dtype=float32"], algo_config), get_algorithm("dpo"), tiny)
    assert "listwise" not in timings and not (tmp_path / "toy/listwise").exists()
    cfg, timings = prepare(load_config(["--algo=pro", "--dtype=float32"], algo_config), LiPO, tiny)
    assert timings["listwise"] is not None and cfg.data == str(tmp_path / "toy/listwise/lists.jsonl")
    rows = read_jsonl(cfg.data, "listwise")
    prompts = [r["prompt"] for r in read_jsonl(tmp_path / "toy/annotations/prompts.jsonl", "prompt")]
    assert [r["prompt"] for r in rows] == [p for p in prompts if p in {r["prompt"] for r in rows}]
    assert all(2 <= len(r["completions"]) <= tiny.listwise_k for r in rows)
    answers = {(r["prompt"], c) for r in read_jsonl(tmp_path / "toy/annotations/binary.jsonl", "binary")
               for c in [r["completion"]]}
    assert {(r["prompt"], c) for r in rows for c in r["completions"]} <= answers  # k = 3 = completions_per_prompt
    stamp = json.loads((tmp_path / "toy/listwise/stamp.json").read_text())
    assert stamp["lists"] == len(rows) and stamp["completions"] == sum(len(r["completions"]) for r in rows)
    for algo in LISTWISE:
        out = train_main([f"--algo={algo}", "--max_steps=2", "--batch_size=8", "--micro_batch_size=8",
                          "--dtype=float32", f"--out_dir={tmp_path / algo}"])
        result = json.loads((Path(out) / "eval.json").read_text())
        assert result["algo"] == algo and result["n"] == tiny.n_eval and isinstance(result["kl"], float)
    assert prepare(load_config(["--algo=lipo", "--dtype=float32"], algo_config), LiPO, tiny)[1]["listwise"] is None
