"""Online algorithms: annotators (LLM judge in both orders), online DPO, RLOO, GRPO, RAFT / best-of-n.

The pure math (rloo_advantages, grpo_advantages, grpo_loss, best_of_n_kl) is tested in tests/test_rl_math.py;
here we test how the adapters use it, the judge's debiasing, best-of-n's KL, and 2-step runs of each algorithm.
"""
import math
import re

import pytest
import torch
import torch.nn as nn

from nanoalign.judge import LLMJudge, ScoreAnnotator, debiased_logodds
from nanoalign.tokenizer import get_tokenizer
from nanoalign.toy.world import sentiment_score

TOKENIZER = get_tokenizer("toy")
PROMPTS = ["the plot was", "i would", "this movie made me"]
GOOD = [" great .", " recommend it .", " laugh ."]
BAD = [" dull .", " not recommend it .", " yawn ."]


class StubJudgeLM(nn.Module):
    """A fake judge language model for the toy tokenizer. At every position its next-token logits put
    `slot_bias + content * (q(A) - q(B))` on the token "A" relative to "B", where q is the toy sentiment score of
    the text after "Response A:" / "Response B:" in the row. content=0 is a judge that only ever prefers slot A."""

    def __init__(self, slot_bias, content):
        super().__init__()
        self.cfg = type("Cfg", (), {"block_size": 512})()
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the module a device
        self.slot_bias, self.content = slot_bias, content
        self.a_id, self.b_id = TOKENIZER.encode("A")[0], TOKENIZER.encode("B")[0]

    def forward(self, idx, attention_mask=None):
        B, T = idx.shape
        logits = torch.zeros(B, T, TOKENIZER.vocab_size)
        for i in range(B):
            text = TOKENIZER.decode(idx[i])
            slot_a, slot_b = re.search(r"Response A:(.*?)\n\nResponse B:(.*?)\n\n", text, re.S).groups()
            logits[i, :, self.a_id] = self.slot_bias + self.content * (sentiment_score(slot_a) - sentiment_score(slot_b))
        return logits


def test_debiased_logodds_by_hand():
    """l(first, second) = 3 + 1 = 4 and l(second, first) = 3 - 1 = 2 (bias 3, content +1 for first):
    d = (4 - 2) / 2 = 1, b = (4 + 2) / 2 = 3."""
    d, b = debiased_logodds(torch.tensor([4.0]), torch.tensor([2.0]))
    assert d.item() == pytest.approx(1.0) and b.item() == pytest.approx(3.0)


def test_judge_with_only_a_position_bias_gives_a_tie():
    judge = LLMJudge(StubJudgeLM(slot_bias=4.0, content=0.0), TOKENIZER, "Which review is more positive?")
    one_order = torch.sigmoid(judge.slot_logodds(PROMPTS, GOOD, BAD))
    assert (one_order > 0.98).all()  # asked once, it always picks slot A
    p = judge.prefer(PROMPTS, GOOD, BAD)
    assert torch.allclose(p, torch.full((3,), 0.5), atol=1e-5)  # both orders: a tie
    assert judge.last_position_bias == pytest.approx(4.0, abs=1e-4)


def test_judge_that_truly_prefers_a_response_keeps_the_preference():
    """slot bias 4 outweighs the content term (|q(good) - q(bad)| <= 3 here), so one order alone would always say
    slot A; both orders recover sigmoid(q(first) - q(second)) whichever slot the better response is put in."""
    judge = LLMJudge(StubJudgeLM(slot_bias=4.0, content=1.0), TOKENIZER, "Which review is more positive?")
    expected = torch.sigmoid(torch.tensor([sentiment_score(g) - sentiment_score(b) for g, b in zip(GOOD, BAD)]))
    good_first, good_second = judge.prefer(PROMPTS, GOOD, BAD), judge.prefer(PROMPTS, BAD, GOOD)
    assert (good_first > 0.5).all() and (good_second < 0.5).all()
    assert torch.allclose(good_first, expected, atol=1e-4)
    assert torch.allclose(good_first + good_second, torch.ones(3), atol=1e-5)  # symmetric in the two responses


def test_position_bias_rate_counts_pairs_whose_two_orders_disagree():
    """Slot bias 4 vs content terms of |q(good) - q(bad)| <= 3: each order alone says "slot A", so every pair's two
    orders disagree (rate 1, none kept). Content weight 3 outweighs the bias: both orders pick the good response."""
    biased = LLMJudge(StubJudgeLM(slot_bias=4.0, content=1.0), TOKENIZER, "Which review is more positive?")
    biased.prefer(PROMPTS, GOOD, BAD)
    assert biased.last_disagreement == 1.0 and not biased.last_agree.any()
    fair = LLMJudge(StubJudgeLM(slot_bias=4.0, content=3.0), TOKENIZER, "Which review is more positive?")
    fair.prefer(PROMPTS, GOOD, BAD)  # l(good, bad) = 4 + 3 m > 0 and l(bad, good) = 4 - 3 m < 0 for m in 2..3
    assert fair.last_agree.all() and fair.last_disagreement == 0.0


def test_calibrated_agreement_reads_both_orders_against_the_mean_slot_bias():
    """Slot bias 4 with content weight 1: raw, every pair's orders disagree (both say slot A); against the mean
    bias b_bar = 4 both orders pick the good response, so every pair agrees. A judge with no content signal stays
    undecided either way: its calibrated log-odds are 0 in both orders, which is no agreement."""
    judge = LLMJudge(StubJudgeLM(slot_bias=4.0, content=1.0), TOKENIZER, "Which review is more positive?",
                     calibrate=True)
    p = judge.prefer(PROMPTS, GOOD, BAD)
    assert judge.last_disagreement == 1.0  # the position-bias rate is still the raw one
    assert judge.last_agree.all() and judge.last_calibrated_disagreement == 0.0 and (p > 0.5).all()
    blind = LLMJudge(StubJudgeLM(slot_bias=4.0, content=0.0), TOKENIZER, "x", calibrate=True)
    blind.prefer(PROMPTS, GOOD, BAD)
    assert not blind.last_agree.any()


def test_judge_labels_must_differ():
    with pytest.raises(ValueError):
        LLMJudge(StubJudgeLM(0.0, 0.0), TOKENIZER, "x", labels=(" A", " A"))


def test_score_annotator_prefers_the_higher_score_and_ties_at_half():
    annotator = ScoreAnnotator(lambda prompts, responses: torch.tensor([sentiment_score(p + r) for p, r in
                                                                         zip(prompts, responses)]))
    p = annotator.prefer(PROMPTS + ["a"], GOOD + [" fine ."], BAD + [" fine ."])
    assert p.tolist() == [1.0, 1.0, 1.0, 0.5]


# ------------------------------------------------------------------------------------------ the adapters
import contextlib
import json
import random

from nanoalign.algos.grpo import GRPO
from nanoalign.algos.online_dpo import OnlineDPO
from nanoalign.algos.raft import RAFT, best_in_groups, best_of_n_sampler
from nanoalign.algos.raft import best_of_n_kl
from nanoalign.algos.rloo import RLOO
from nanoalign.config import load_config
from nanoalign.rollout import Rollout
from nanoalign.loading import build_policy
from nanoalign.trainer import Context
from nanoalign.algos import algo_config
from train import main as train_main

CPU = torch.device("cpu")
WORDS = "the plot was good bad very not really great dull and but acting music".split()


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    rows = [{"prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))} for _ in range(24)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_args(data, out_dir, **kw):
    args = dict(algo="rloo", data=data, out_dir=out_dir, init_from="scratch", tokenizer="toy", n_layer=1, n_head=2,
                n_embd=32, block_size=64, max_len=64, max_new_tokens=8, batch_size=4, micro_batch_size=2, lr=3e-3,
                warmup_steps=1, max_steps=2, log_interval=1, dtype="float32", seed=3, reward_model="gold")
    args.update(kw)
    return [f"--{k}={v}" for k, v in args.items()]


def build(algorithm_cls, args):
    cfg = load_config(args, algo_config)
    torch.manual_seed(cfg.seed)
    policy, tokenizer = build_policy(cfg, CPU)
    ctx = Context(CPU, 0, 1, cfg.micro_batch_size, cfg.batch_size // cfg.micro_batch_size, contextlib.nullcontext)
    return algorithm_cls(cfg, policy, tokenizer, ctx)


def fake_rollout(scores, logprobs, ref_logprobs, R=2):
    """A Rollout of N rows with response length R (all tokens valid) and the given per-token log-probs (N, R)."""
    N = len(scores)
    return Rollout(input_ids=torch.arange(N * (R + 1)).view(N, R + 1), attention_mask=torch.ones(N, R + 1).long(),
                   response_mask=torch.ones(N, R), logprobs=logprobs, ref_logprobs=ref_logprobs,
                   scores=torch.tensor(scores), eos=torch.ones(N, dtype=torch.bool), prompt_index=torch.arange(N),
                   prompts=["p"] * N, responses=[f"r{i}" for i in range(N)])


def test_rloo_adapter_baseline_is_the_mean_of_the_others_kl_penalised_rewards(prompt_file, tmp_path):
    """k = 3, beta = 0.5, scores (1, 2, 6), summed KL sum_t (logp - ref) = (0, 1, 2):
    R = (1, 2 - 0.5, 6 - 1) = (1, 1.5, 5);  A_1 = 1 - (1.5 + 5)/2 = -2.25,  A_2 = 1.5 - (1 + 5)/2 = -1.5,
    A_3 = 5 - (1 + 1.5)/2 = 3.75."""
    algo = build(RLOO, tiny_args(prompt_file, tmp_path, samples_per_prompt=3, batch_size=6, micro_batch_size=3,
                                 kl_coef=0.5))
    logprobs = torch.tensor([[-1.0, -1.0], [-0.5, -0.5], [-1.0, 0.0]])
    ref = torch.tensor([[-1.0, -1.0], [-1.0, -1.0], [-2.0, -1.0]])
    rows = algo.make_rows(fake_rollout([1.0, 2.0, 6.0], logprobs, ref))
    assert torch.allclose(rows["advantages"], torch.tensor([-2.25, -1.5, 3.75]))
    assert algo.rollout_metrics["objective/rlhf_reward"].item() == pytest.approx(7.5 / 3)


def test_rloo_loss_is_reinforce_on_policy(prompt_file, tmp_path):
    """With epochs = 1 the gradient of the loss is -1/B sum_i A_i grad log pi(y_i | x) (the paper's estimator)."""
    algo = build(RLOO, tiny_args(prompt_file, tmp_path, samples_per_prompt=2))
    rollout = algo.make_rows(next_rollout(algo))
    batch = {k: v[:2] for k, v in rollout.items()}
    loss, _ = algo.loss(algo.policy, batch)
    grads = torch.autograd.grad(loss, list(algo.policy.parameters()))
    from nanoalign.rollout import response_logps
    logps = response_logps(algo.policy, batch).sum(1)  # (2,)
    surrogate = -(batch["advantages"] * logps).mean()
    expected = torch.autograd.grad(surrogate, list(algo.policy.parameters()))
    assert all(torch.allclose(g, e, atol=1e-6) for g, e in zip(grads, expected))


def next_rollout(algo):
    """One real rollout of the algorithm's first prompts (the rollout module, tiny scratch policy)."""
    from nanoalign.rollout import generate_rollout
    prompts = [e["prompt_ids"] for e in algo.prompts[:algo.prompts_per_rollout]]
    return generate_rollout(algo.policy, algo.tokenizer, prompts, algo.cfg.samples_per_prompt, 8, algo.scorer,
                            reference=algo.reference, generator=torch.Generator().manual_seed(0),
                            recompute_logprobs=True)


def test_grpo_adapter_group_normalises_and_identical_rewards_give_zero(prompt_file, tmp_path):
    """Groups of 2: (1, 3) -> mean 2, unbiased std sqrt(2) -> (-1, 1)/(sqrt 2 + 1e-4); (5, 5) -> (0, 0)."""
    algo = build(GRPO, tiny_args(prompt_file, tmp_path, algo="grpo", samples_per_prompt=2))
    zeros = torch.zeros(4, 2)
    rows = algo.make_rows(fake_rollout([1.0, 3.0, 5.0, 5.0], zeros, zeros))
    s = math.sqrt(2) + 1e-4
    assert torch.allclose(rows["advantages"], torch.tensor([-1 / s, 1 / s, 0.0, 0.0]))
    assert algo.rollout_metrics["frac_zero_advantage"].item() == 0.5


def test_grpo_first_loss_is_minus_mean_advantage_and_zero_kl(prompt_file, tmp_path):
    """At pi = pi_old = pi_ref the ratio is 1 and D = 0, so the seq-mean loss is -mean_i A_i and kl = 0."""
    algo = build(GRPO, tiny_args(prompt_file, tmp_path, algo="grpo", samples_per_prompt=2, kl_coef=0.5))
    rows = algo.make_rows(next_rollout(algo))
    batch = {k: v[:3] for k, v in rows.items()}
    loss, metrics = algo.loss(algo.policy, batch)
    assert loss.item() == pytest.approx(-batch["advantages"].mean().item(), abs=1e-5)
    assert metrics["kl"].item() == pytest.approx(0.0, abs=1e-5)


def test_online_dpo_pairs_follow_the_annotator_and_ties_weigh_nothing(prompt_file, tmp_path):
    """Pairs (rows 0, 1) and (2, 3) with scores (0.2, 0.9) and (0.7, 0.7): row 1 is chosen over row 0, the second
    pair is a tie. At pi = pi_ref every DPO loss is log 2, so the weighted mean is log 2; a batch of ties gives 0."""
    algo = build(OnlineDPO, tiny_args(prompt_file, tmp_path, algo="online_dpo", batch_size=2))
    rollout = next_rollout(algo)  # 2 samples for each of 2 prompts: real token rows
    rollout.scores = torch.tensor([0.2, 0.9, 0.7, 0.7])
    pairs = algo.make_rows(rollout)
    assert torch.equal(pairs["chosen_input_ids"][0], rollout.input_ids[1])
    assert torch.equal(pairs["rejected_input_ids"][0], rollout.input_ids[0])
    assert pairs["weight"].tolist() == [1.0, 0.0]
    loss, metrics = algo.loss(algo.policy, pairs)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)
    loss, _ = algo.loss(algo.policy, {k: v[1:] for k, v in pairs.items()})  # the tie alone
    assert loss.item() == 0.0


def test_raft_keeps_the_best_sample_of_each_prompt(prompt_file, tmp_path):
    assert best_in_groups(torch.tensor([0.1, 0.9, 0.3, 0.7, 0.7, 0.2]), 3).tolist() == [1, 3]  # tie -> the first
    algo = build(RAFT, tiny_args(prompt_file, tmp_path, algo="raft", samples_per_prompt=3))
    rollout = next_rollout(algo)
    rows = algo.make_rows(rollout)
    best = best_in_groups(rollout.scores, 3)
    assert torch.equal(rows["input_ids"], rollout.input_ids[best]) and len(best) == algo.prompts_per_rollout


def test_best_of_n_kl_matches_the_closed_form():
    """best_of_n_sampler over a 500-outcome categorical p with distinct random rewards: the measured
    KL = mean over M best-of-n draws of log(pi_bon(y) / p(y)), with pi_bon(y) = F(y)^n - F(y-)^n exact, is
    log n - (n - 1)/n within 4 standard errors (plus the tiny gap of the exact KL to the formula for atoms this
    size). Picking a random sample instead of the best would measure ~0."""
    g = torch.Generator().manual_seed(0)
    K, n, M = 500, 8, 4000
    ids = list(range(300, 300 + K))  # toy-tokenizer tokens with distinct texts
    p = torch.rand(K, generator=g, dtype=torch.float64) + 0.5
    p = p / p.sum()
    reward = torch.rand(K, generator=g, dtype=torch.float64)
    by_text = {TOKENIZER.decode([i]): reward[j].item() for j, i in enumerate(ids)}
    assert len(by_text) == K

    def categorical_sampler(prompt_ids, generator):
        return [[ids[j]] for j in torch.multinomial(p, len(prompt_ids), replacement=True, generator=generator).tolist()]

    def scorer(prompts, responses):
        return torch.tensor([by_text[r] for r in responses])

    sample = best_of_n_sampler(categorical_sampler, scorer, TOKENIZER, n)
    picks = torch.tensor([c[0] - 300 for c in sample([[1]] * M, torch.Generator().manual_seed(1))])
    order = torch.argsort(reward)
    cdf = p[order].cumsum(0)
    pmf = torch.empty_like(p)
    pmf[order] = cdf ** n - (cdf - p[order]) ** n
    log_ratio = (pmf[picks] / p[picks]).log()
    measured, se = log_ratio.mean().item(), log_ratio.std().item() / math.sqrt(M)
    exact = (pmf * (pmf / p).log()).sum().item()
    assert abs(measured - best_of_n_kl(n)) < 4 * se + abs(exact - best_of_n_kl(n))


# ------------------------------------------------------------------------------------------ 2-step CLI runs
EXPECTED_METRICS = {
    "rloo": {"objective/scores", "objective/kl", "objective/rlhf_reward", "policy/clipfrac_avg"},
    "grpo": {"objective/scores", "objective/kl", "kl", "policy/clipfrac_avg"},
    "online_dpo": {"objective/scores", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                   "logps/chosen", "logps/rejected"},
    "raft": {"objective/scores", "objective/best_scores", "nll_loss"},
}


@pytest.mark.integration
@pytest.mark.parametrize("algo", sorted(EXPECTED_METRICS))
def test_cli_two_steps(algo, prompt_file, tmp_path):
    k = {} if algo == "online_dpo" else {"samples_per_prompt": 2}  # online DPO always samples a pair
    out = train_main(tiny_args(prompt_file, tmp_path / algo, algo=algo, **k))
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)
    assert EXPECTED_METRICS[algo] <= records[-1].keys()
    assert (out / "ckpt.pt").exists()


def test_cli_online_dpo_with_an_llm_judge(prompt_file, tmp_path):
    """The judge is another model (a 1-step scratch policy's checkpoint); asked in both orders, it runs end to end."""
    judge = train_main(tiny_args(prompt_file, tmp_path / "judge", algo="raft", samples_per_prompt=2, max_steps=1, seed=5))
    out = train_main(tiny_args(prompt_file, tmp_path / "odpo", algo="online_dpo", judge=f"ckpt:{judge}"))
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert len(records) == 2 and all(math.isfinite(r["judge/position_bias"]) for r in records)


def test_online_resume_is_exact_at_rollout_boundaries_and_refused_inside_a_rollout(prompt_file, tmp_path):
    """rollout_batch_size 8 with batch 4: two optimizer steps per rollout. Periodic checkpoints (every step asked)
    land on the boundaries; 4 steps straight == 2 steps + resume + 2 steps; a checkpoint at step 3 is refused."""
    from nanoalign.algos.rloo import RLOO
    from nanoalign.checkpoint import load_checkpoint
    from nanoalign.trainer import train
    args = dict(rollout_batch_size=8, samples_per_prompt=2, max_steps=4, ckpt_interval=1)
    assert build(RLOO, tiny_args(prompt_file, tmp_path / "b", **args)).steps_per_rollout == 2
    straight = train(load_config(tiny_args(prompt_file, tmp_path / "a", **args), algo_config), RLOO)
    halves = tmp_path / "h"
    train(load_config(tiny_args(prompt_file, halves, **args), algo_config), RLOO, stop_after=2)
    train(load_config(tiny_args(prompt_file, halves, resume=True, **args), algo_config), RLOO)
    a, b = load_checkpoint(straight)["model"], load_checkpoint(halves)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    inside = tmp_path / "inside"
    train(load_config(tiny_args(prompt_file, inside, **args), algo_config), RLOO, stop_after=3)
    with pytest.raises(ValueError, match="inside a rollout of 2 steps"):
        train(load_config(tiny_args(prompt_file, inside, resume=True, **args), algo_config), RLOO)
