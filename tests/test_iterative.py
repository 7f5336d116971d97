"""Iterative and self-play algorithms: sDPO (stepwise reference), SPPO (square loss on win rates), self-rewarding
(the policy judges its own samples). Hand-derived values and gradients of the pure functions, the adapters on fake
and real rollouts, exact resume across an sDPO boundary, and CLI runs (tiny models; the tiny toy world)."""
import contextlib
import json
import math
import random
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from nanoalign.algos import algo_config
from nanoalign.algos.sdpo import SDPO, chunk_bounds, easy_to_hard
from nanoalign.algos.self_reward import SelfReward, best_and_worst, judged_pairs
from nanoalign.algos.sppo import SPPO, bt_preferences, sppo_loss, win_rates
from nanoalign.checkpoint import load_checkpoint
from nanoalign.config import load_config
from nanoalign.judge import LLMJudge, ScoreAnnotator
from nanoalign.loading import build_policy
from nanoalign.logps import batch_logps
from nanoalign.rollout import Rollout, generate_rollout
from nanoalign.trainer import Context, train
from train import main as train_main

CPU = torch.device("cpu")
F64 = torch.float64
WORDS = "the plot was good bad very not really great dull and but acting music".split()
ROOT = Path(__file__).resolve().parents[1]


def phrase(rng):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    rng, d = random.Random(0), tmp_path_factory.mktemp("data")
    (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": phrase(rng)}) + "\n" for _ in range(24)))
    (d / "prefs.jsonl").write_text("".join(json.dumps({"prompt": phrase(rng), "chosen": " " + phrase(rng),
                                                       "rejected": " " + phrase(rng)}) + "\n" for _ in range(40)))
    return d


def tiny_args(data, out_dir, **kw):
    args = dict(algo="sdpo", data=data, out_dir=out_dir, init_from="scratch", tokenizer="toy", n_layer=1, n_head=2,
                n_embd=32, block_size=64, max_len=64, batch_size=4, micro_batch_size=2, lr=3e-3,
                warmup_steps=1, max_steps=4, log_interval=1, dtype="float32", dropout=0.0, seed=3)
    args.update(kw)
    if args["algo"] not in ("dpo", "sdpo"):
        args.setdefault("max_new_tokens", 8)
    return [f"--{k}={v}" for k, v in args.items()]


def build(algorithm_cls, args):
    cfg = load_config(args, algo_config)
    torch.manual_seed(cfg.seed)
    policy, tokenizer = build_policy(cfg, CPU)
    ctx = Context(CPU, 0, 1, cfg.micro_batch_size, cfg.batch_size // cfg.micro_batch_size, contextlib.nullcontext)
    return algorithm_cls(cfg, policy, tokenizer, ctx)


def policy_logps(model, examples, collate):
    """(chosen, rejected) summed log-probs (n,), (n,) of preference examples under `model` in eval mode."""
    batch = collate(examples)
    model.eval()
    with torch.no_grad():
        logps = batch_logps(model, batch["input_ids"], batch["loss_mask"])[0]
    model.train()
    return logps[:len(examples)], logps[len(examples):]


def shift_weights(model, amount=0.05):
    """Stand-in for training: move every weight (seeded), so the current policy differs from its start."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(amount * torch.randn(p.shape, generator=g))


# ================================================================================================== sDPO
def test_chunk_bounds_and_easy_to_hard_order():
    assert chunk_bounds(10, 3) == [(0, 3), (3, 6), (6, 10)] and chunk_bounds(4, 1) == [(0, 4)]
    rows = [{"ref_chosen_logps": c, "ref_rejected_logps": r, "i": i} for i, (c, r) in
            enumerate([(-5, -4), (-1, -9), (-3, -3), (-2, -2), (-6, -1)])]  # margins -1, 8, 0, 0, -5
    assert [e["i"] for e in easy_to_hard(rows)] == [1, 2, 3, 0, 4]  # largest margin first, ties keep their order


@pytest.mark.integration  # two training runs
def test_sdpo_with_one_chunk_is_dpo(files, tmp_path):
    dpo = train_main(tiny_args(files / "prefs.jsonl", tmp_path / "dpo", algo="dpo"))
    sdpo = train_main(tiny_args(files / "prefs.jsonl", tmp_path / "sdpo", sdpo_chunks=1))
    losses = [[json.loads(line)["loss"] for line in open(Path(d) / "metrics.jsonl")] for d in (dpo, sdpo)]
    assert len(losses[0]) == 4 and losses[0] == losses[1]


@pytest.mark.parametrize("mode", ["precompute", "live"])
def test_sdpo_boundary_makes_the_current_policy_the_reference(files, tmp_path, mode):
    """max_steps 4, 2 chunks of 20 pairs: steps 0-1 train on chunk 0 against M_0, steps 2-3 on chunk 1. At the first
    micro-batch of step 2 the reference becomes the (shifted) current policy: its log-probs are the policy's, not
    the initial ones, and the DPO loss there is log 2 (policy == reference); chunk 0's batches hold only chunk 0."""
    algo = build(SDPO, tiny_args(files / "prefs.jsonl", tmp_path, ref_logps=mode))
    assert [len(c) for c in algo.chunks] == [20, 20] and algo.step_bounds == [0, 2, 4]
    initial = policy_logps(algo.policy, algo.chunks[1], algo.collate)
    stream = algo.batches(0)
    chunk0 = {tuple(e["chosen_ids"]) for e in algo.chunks[0]} | {tuple(e["rejected_ids"]) for e in algo.chunks[0]}
    for _ in range(2 * algo.ctx.grad_accum):  # steps 0 and 1
        batch = next(stream)
        rows = [tuple(row[:int(m.sum())].tolist()) for row, m in zip(batch["input_ids"], batch["attention_mask"])]
        assert all(row in chunk0 for row in rows)
        assert algo.ref_chunk == 0
    shift_weights(algo.policy)
    batch = next(stream)  # step 2: the boundary
    assert algo.ref_chunk == 1
    current = policy_logps(algo.policy, algo.chunks[1], algo.collate)
    assert not torch.allclose(current[0], initial[0], atol=1e-3)
    if mode == "precompute":
        stored = torch.tensor([[e["ref_chosen_logps"], e["ref_rejected_logps"]] for e in algo.chunks[1]])
        assert torch.allclose(stored, torch.stack(current, 1), atol=1e-5)
    else:
        assert algo.reference.frozen is not algo.policy
        for a, b in zip(algo.reference.frozen.parameters(), algo.policy.parameters()):
            assert torch.equal(a, b) and not a.requires_grad
    loss, metrics = algo.loss(algo.policy, batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5) and metrics["sdpo/chunk"] == 1.0


def test_sdpo_easy_to_hard_puts_the_reference_s_best_ranked_pairs_first(files, tmp_path):
    algo = build(SDPO, tiny_args(files / "prefs.jsonl", tmp_path, sdpo_order="easy_to_hard"))
    margins = [e["ref_chosen_logps"] - e["ref_rejected_logps"] for e in algo.examples]
    assert margins == sorted(margins, reverse=True) and min(margins[:20]) >= max(margins[20:])
    live = build(SDPO, tiny_args(files / "prefs.jsonl", tmp_path, sdpo_order="easy_to_hard", ref_logps="live"))
    assert "ref_chosen_logps" not in live.examples[0]  # the live run reads its reference model, not cached values
    assert [e["chosen_ids"] for e in live.examples] == [e["chosen_ids"] for e in algo.examples]


@pytest.fixture(scope="module")
def base(files, tmp_path_factory):
    """A 1-step scratch policy's checkpoint: LoRA adapts a pretrained model."""
    return train_main(tiny_args(files / "prefs.jsonl", tmp_path_factory.mktemp("base"), algo="dpo", max_steps=1))


def test_sdpo_refuses_what_it_cannot_do(files, base, tmp_path):
    prefs = files / "prefs.jsonl"
    with pytest.raises(ValueError, match="ref_logps=live under LoRA"):
        build(SDPO, tiny_args(prefs, tmp_path, ref_logps="live", lora_rank=2, lora_alpha=4, init_from=f"ckpt:{base}"))
    with pytest.raises(ValueError, match="loss_type='simpo' has none"):
        build(SDPO, tiny_args(prefs, tmp_path, loss_type="simpo"))
    with pytest.raises(ValueError, match="max_steps=2 is fewer than sdpo_chunks=3"):
        build(SDPO, tiny_args(prefs, tmp_path, max_steps=2, sdpo_chunks=3))
    with pytest.raises(ValueError, match="fewer than one batch of 4"):
        build(SDPO, tiny_args(prefs, tmp_path, sdpo_chunks=20, max_steps=20))


def test_sdpo_under_lora_precomputes_the_reference_with_the_adapters_on(files, base, tmp_path):
    algo = build(SDPO, tiny_args(files / "prefs.jsonl", tmp_path, lora_rank=2, lora_alpha=4, init_from=f"ckpt:{base}"))
    stream = algo.batches(0)
    for _ in range(2 * algo.ctx.grad_accum):
        next(stream)
    with torch.no_grad():  # move the adapters only (what LoRA training changes)
        for name, p in algo.policy.named_parameters():
            if "lora_" in name:
                p.add_(0.3)
    next(stream)
    stored = torch.tensor([e["ref_chosen_logps"] for e in algo.chunks[1]])
    assert torch.allclose(stored, policy_logps(algo.policy, algo.chunks[1], algo.collate)[0], atol=1e-5)


@pytest.mark.integration  # training runs, stopped and resumed
@pytest.mark.parametrize("mode,stop", [("precompute", 3), ("precompute", 2), ("live", 3)])
def test_sdpo_resume_is_exact_across_a_boundary(files, tmp_path, mode, stop):
    """5 steps, 2 chunks (boundary at step 2): straight == stop at `stop` + resume. Stopping at 3 resumes inside
    chunk 1, whose reference (M_1's log-probs or weights) must come from the checkpoint; stopping at 2 resumes at
    the boundary, where the reference is rebuilt from the resumed weights."""
    args = dict(ref_logps=mode, max_steps=5)
    prefs = files / "prefs.jsonl"
    straight = train(load_config(tiny_args(prefs, tmp_path / "a", **args), algo_config), SDPO)
    halves = tmp_path / "h"
    train(load_config(tiny_args(prefs, halves, **args), algo_config), SDPO, stop_after=stop)
    saved = load_checkpoint(halves)
    assert saved["sdpo_chunk"] == (1 if stop == 3 else 0)
    if stop == 3:
        assert ("sdpo_reference" if mode == "live" else "sdpo_ref_logps") in saved
    train(load_config(tiny_args(prefs, halves, resume=True, **args), algo_config), SDPO)
    a, b = load_checkpoint(straight)["model"], load_checkpoint(halves)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# ================================================================================================== SPPO
def test_bt_preferences_and_win_rates_by_hand():
    """Rewards (0, 1, 3), tau 1: P(i > j) = sigmoid(r_i - r_j); P_hat_i = 1/3 sum_j P_ij with P_ii = 1/2:
    P_hat_0 = (1/2 + s(-1) + s(-3)) / 3, P_hat_2 = (s(3) + s(2) + 1/2) / 3. tau = 2 halves every difference."""
    s = lambda x: 1 / (1 + math.exp(-x))
    P = bt_preferences(torch.tensor([0.0, 1.0, 3.0], dtype=F64), 3)
    assert P.shape == (1, 3, 3) and P[0, 0, 1].item() == pytest.approx(s(-1)) and P[0, 1, 1].item() == 0.5
    rates = win_rates(P)[0]
    assert rates[0].item() == pytest.approx((0.5 + s(-1) + s(-3)) / 3)
    assert rates[2].item() == pytest.approx((s(3) + s(2) + 0.5) / 3)
    assert bt_preferences(torch.tensor([0.0, 2.0]), 2, tau=2.0)[0, 1, 0].item() == pytest.approx(s(1))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=6, max_size=6), st.floats(0.1, 3.0))
def test_win_rates_average_one_half_per_prompt(rewards, tau):
    """P_ij + P_ji = 1, so the K win rates of a prompt sum to K/2: pi_t beats itself half the time (why log Z_t is
    approximated by eta/2); a better reward never has a lower win rate."""
    r = torch.tensor(rewards, dtype=F64)
    rates = win_rates(bt_preferences(r, 3, tau))                      # (2, 3)
    assert torch.allclose(rates.mean(1), torch.full((2,), 0.5, dtype=F64))
    order = r.view(2, 3).argsort(1)
    assert (rates.gather(1, order).diff(dim=1) >= -1e-12).all()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(-30, -1), st.floats(-30, -1), st.floats(0, 1)), min_size=1, max_size=6),
       st.floats(0.5, 100))
def test_sppo_gradient_is_twice_the_residual(rows, eta):
    """L = 1/B sum_i (s_i - g_i)^2 with s_i = logp_i - old_i, g_i = eta (P_i - 1/2): dL/dlogp_i = 2 (s_i - g_i) / B;
    at logp = old (the first step of an iteration) that is -2 eta (P_i - 1/2) / B, REINFORCE with advantage P - 1/2."""
    logp, old, p = (torch.tensor(c, dtype=F64) for c in zip(*rows))
    logp.requires_grad_()
    loss, log_ratio, target = sppo_loss(logp, old, p, eta)
    loss.backward()
    B = len(rows)
    torch.testing.assert_close(logp.grad, 2 * ((logp.detach() - old) - eta * (p - 0.5)) / B)
    at_start = old.clone().requires_grad_()
    sppo_loss(at_start, old, p, eta)[0].backward()
    torch.testing.assert_close(at_start.grad, -2 * eta * (p - 0.5) / B)
    fitted = (old + eta * (p - 0.5)).requires_grad_()  # at the target the loss and its gradient vanish
    fit_loss = sppo_loss(fitted, old, p, eta)[0]
    fit_loss.backward()
    assert fit_loss.item() < 1e-18 and fitted.grad.abs().max().item() < 1e-9


def fake_rollout(scores, R=2, texts=None):
    N = len(scores)
    return Rollout(input_ids=torch.arange(N * (R + 1)).view(N, R + 1), attention_mask=torch.ones(N, R + 1).long(),
                   response_mask=torch.ones(N, R), logprobs=-torch.arange(N * R, dtype=torch.float).view(N, R),
                   ref_logprobs=torch.zeros(N, R), scores=torch.tensor(scores), eos=torch.ones(N, dtype=torch.bool),
                   prompt_index=torch.arange(N), prompts=["p"] * N, responses=texts or [f"r{i}" for i in range(N)])


def test_sppo_rows_keep_the_best_and_worst_win_rate_with_pi_t_log_probs(files, tmp_path):
    """K = 3, two prompts, scores (0.2, 0.9, 0.5) and (0.4, 0.4, 0.1): best/worst rows (1, 0) and (3, 5) (a tie
    for best -> the first); old_logps = the rollout's summed log-probs; "all" keeps the 6 rows in order."""
    algo = build(SPPO, tiny_args(files / "prompts.jsonl", tmp_path, algo="sppo", samples_per_prompt=3,
                                 reward_model="gold", batch_size=4))
    rollout = fake_rollout([0.2, 0.9, 0.5, 0.4, 0.4, 0.1])
    rows = algo.make_rows(rollout)
    assert rows["input_ids"][:, 0].tolist() == [3, 0, 9, 15]  # rows 1, 0, 3, 5 (3 columns each)
    expected = win_rates(bt_preferences(rollout.scores, 3)).view(-1)
    assert torch.allclose(rows["win_rate"], expected[[1, 0, 3, 5]])
    assert torch.equal(rows["old_logps"], rollout.logprobs.sum(1)[[1, 0, 3, 5]])
    every = build(SPPO, tiny_args(files / "prompts.jsonl", tmp_path, algo="sppo", samples_per_prompt=3,
                                  reward_model="gold", batch_size=6, sppo_rows="all"))
    assert torch.equal(every.make_rows(rollout)["input_ids"], rollout.input_ids)


def test_sppo_first_loss_of_an_iteration_is_the_mean_squared_target(files, tmp_path):
    """On a real rollout pi = pi_t before any update (recomputed log-probs): log pi/pi_t = 0 and the loss is
    mean (eta (P_hat - 1/2))^2."""
    algo = build(SPPO, tiny_args(files / "prompts.jsonl", tmp_path, algo="sppo", samples_per_prompt=3,
                                 reward_model="gold", eta=10))
    assert algo.reference is None
    prompts = [e["prompt_ids"] for e in algo.prompts[:algo.prompts_per_rollout]]
    rollout = generate_rollout(algo.policy, algo.tokenizer, prompts, 3, 8, algo.scorer,
                               generator=torch.Generator().manual_seed(0), recompute_logprobs=True)
    rows = algo.make_rows(rollout)
    loss, metrics = algo.loss(algo.policy, {k: v[:2] for k, v in rows.items()})
    assert metrics["sppo/log_ratio_abs"].item() < 1e-5
    assert loss.item() == pytest.approx((10 * (rows["win_rate"][:2] - 0.5)).pow(2).mean().item(), rel=1e-4)


# ========================================================================================== self-rewarding
def test_best_and_worst_by_hand():
    """3 samples, pairs (0,1), (0,2), (1,2).
    prompt 0: 1 beats 0, 2 beats 0, 1 beats 2, all agreed -> wins (0, 2, 1): best 1, worst 0, kept.
    prompt 1: the same verdicts but (0,1)'s orders disagree -> wins (0, 1, 1): best 1 (first), worst 0; the verdict
      on (1, 0) does not count -> not kept.
    prompt 2: every pair a tie (1/2) -> wins all 0: best = worst = 0 -> not kept."""
    assert judged_pairs(3) == [(0, 1), (0, 2), (1, 2)]
    p = torch.tensor([[0.2, 0.3, 0.9], [0.2, 0.3, 0.9], [0.5, 0.5, 0.5]])
    agree = torch.tensor([[True, True, True], [False, True, True], [True, True, True]])
    best, worst, keep = best_and_worst(p, agree, 3)
    assert best.tolist() == [1, 1, 0] and worst.tolist() == [0, 0, 0] and keep.tolist() == [True, False, False]


class FakeJudge:
    """An LLM judge's interface with a known answer: P(first better) = the table's value for (first, second), and
    the two orders agree unless the pair is listed in `disagree`."""

    def __init__(self, quality, disagree=()):
        self.quality, self.disagree = quality, set(disagree)

    def prefer(self, prompts, first, second):
        p = torch.tensor([1.0 if self.quality[a] > self.quality[b] else 0.0 if self.quality[a] < self.quality[b]
                          else 0.5 for a, b in zip(first, second)])
        self.last_agree = torch.tensor([(a, b) not in self.disagree for a, b in zip(first, second)])
        self.last_disagreement = 1 - self.last_agree.float().mean().item()
        self.last_position_bias = 0.0
        return p


def test_self_reward_pairs_follow_the_judge_and_drop_disagreements(files, tmp_path):
    """N = 3, two prompts. Prompt 0 (responses a, b, c with judge quality 1, 3, 2): chosen b, rejected a. Prompt 1
    (d, e, f with quality 2, 1, 3) but the judge's orders disagree on (d, f) and (e, f): only d > e counts, so f has
    no counted win: wins (1, 0, 0): best d, worst e (first of the tied), kept. The same prompt with (d, e) disagreeing
    too has no counted verdict: no pair. At pi = pi_ref the DPO loss of the kept pairs is log 2."""
    algo = build(SelfReward, tiny_args(files / "prompts.jsonl", tmp_path, algo="self_reward", samples_per_prompt=3,
                                       reward_model="gold", batch_size=2))
    texts = ["a", "b", "c", "d", "e", "f"]
    rollout = fake_rollout([0.0] * 6, texts=texts)
    algo.annotator = FakeJudge(dict(zip(texts, (1, 3, 2, 2, 1, 3))), disagree={("d", "f"), ("e", "f")})
    pairs = algo.make_rows(rollout)
    assert pairs["chosen_input_ids"][:, 0].tolist() == [3, 9] and pairs["rejected_input_ids"][:, 0].tolist() == [0, 12]
    assert pairs["weight"].tolist() == [1.0, 1.0] and algo.rollout_metrics["judge/disagreement"] == pytest.approx(2 / 6)
    algo.annotator.disagree.add(("d", "e"))
    pairs = algo.make_rows(rollout)
    assert pairs["weight"].tolist() == [1.0, 0.0] and algo.rollout_metrics["frac_ties"].item() == 0.5
    assert algo.has_signal(pairs)
    algo.annotator.disagree.update({("a", "b"), ("a", "c"), ("b", "c")})  # no verdict counts: the step is not taken
    assert not algo.has_signal(algo.make_rows(rollout))
    no_rule = build(SelfReward, tiny_args(files / "prompts.jsonl", tmp_path, algo="self_reward", samples_per_prompt=3,
                                          reward_model="gold", batch_size=2, judge_agreement=False))
    no_rule.annotator = algo.annotator  # without judge_agreement every verdict counts: prompt 1 -> f over e
    assert no_rule.make_rows(rollout)["chosen_input_ids"][1, 0].item() == 15


def test_self_reward_scorer_fallback_picks_max_and_min_score_and_drops_all_ties(files, tmp_path):
    algo = build(SelfReward, tiny_args(files / "prompts.jsonl", tmp_path, algo="self_reward", judge="",
                                       samples_per_prompt=3, reward_model="gold", batch_size=2))
    assert isinstance(algo.annotator, ScoreAnnotator)
    pairs = algo.make_rows(fake_rollout([0.2, 0.9, 0.5, 0.4, 0.4, 0.4]))
    assert pairs["chosen_input_ids"][0, 0].item() == 3 and pairs["rejected_input_ids"][0, 0].item() == 0
    assert pairs["weight"].tolist() == [1.0, 0.0]
    loss, _ = algo.loss(algo.policy, pairs)  # the tied prompt weighs nothing: the loss of the first pair alone
    assert loss.item() == pytest.approx(algo.loss(algo.policy, {k: v[:1] for k, v in pairs.items()})[0].item())


def test_self_judging_with_a_tiny_random_policy_counts_agreements(files, tmp_path):
    """judge="self": the judge IS the policy (no copy, still trainable, back in train mode after judging), and the
    kept pairs are exactly those where both orders of the policy's own A/B log-odds agree, recomputed here by hand
    from LLMJudge.slot_logodds."""
    algo = build(SelfReward, tiny_args(files / "prompts.jsonl", tmp_path, algo="self_reward", samples_per_prompt=3,
                                       reward_model="gold", batch_size=4, dropout=0.1))
    judge = algo.annotator
    assert isinstance(judge, LLMJudge) and judge.model is algo.policy
    assert all(p.requires_grad for p in algo.policy.parameters())
    prompts = [e["prompt_ids"] for e in algo.prompts[:4]]
    rollout = generate_rollout(algo.policy, algo.tokenizer, prompts, 3, 8, algo.scorer, reference=algo.reference,
                               generator=torch.Generator().manual_seed(1), recompute_logprobs=True)
    algo.policy.train()
    pairs = algo.make_rows(rollout)
    assert algo.policy.training
    first = [b * 3 + i for b in range(4) for i, _ in judged_pairs(3)]
    second = [b * 3 + j for b in range(4) for _, j in judged_pairs(3)]
    P = [rollout.prompts[i] for i in first]
    ab = judge.slot_logodds(P, [rollout.responses[i] for i in first], [rollout.responses[j] for j in second])
    ba = judge.slot_logodds(P, [rollout.responses[j] for j in second], [rollout.responses[i] for i in first])
    agree = (ab > 0) == (ba < 0)
    assert algo.rollout_metrics["judge/disagreement"] == pytest.approx(1 - agree.float().mean().item())
    _, _, keep = best_and_worst(torch.sigmoid((ab - ba) / 2).view(4, 3), agree.view(4, 3), 3)
    assert pairs["weight"].tolist() == keep.float().tolist()


# ========================================================================================== CLI runs
@pytest.mark.integration
@pytest.mark.parametrize("algo,extra", [("sdpo", {}), ("sdpo", {"ref_logps": "live", "sdpo_order": "easy_to_hard"}),
                                        ("sppo", {"samples_per_prompt": 3}), ("self_reward", {"batch_size": 2}),
                                        ("self_reward", {"batch_size": 2, "judge": ""})])
def test_cli_runs(algo, extra, files, tmp_path):
    data = files / ("prefs.jsonl" if algo == "sdpo" else "prompts.jsonl")
    kw = {} if algo == "sdpo" else {"reward_model": "gold"}
    out = train_main(tiny_args(data, tmp_path / algo, algo=algo, **kw, **extra))
    records = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in records)
    expected = {"sdpo": {"sdpo/chunk", "rewards/margins"}, "sppo": {"sppo/log_ratio", "sppo/win_rate_best"},
                "self_reward": {"frac_ties", "rewards/margins"} | ({"judge/disagreement"} if extra.get("judge") != ""
                                                                   else set())}[algo]
    assert expected <= records[-1].keys()


@pytest.mark.integration
@pytest.mark.parametrize("argv", [["--algo=sdpo"], ["--algo=sppo"], [str(ROOT / "data" / "self_reward_toy.toml")],
                                  ["--algo=self_reward"]])
def test_train_py_on_the_tiny_toy_world(argv, tiny_toy, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOALIGN_TOY_DIR", str(tiny_toy))
    monkeypatch.setenv("NANOALIGN_TOY_RECIPE", "tiny")
    out = train_main([*argv, "--max_steps=2", "--batch_size=8", "--micro_batch_size=8", "--dtype=float32",
                      f"--out_dir={tmp_path / 'run'}"])
    result = json.loads((Path(out) / "eval.json").read_text())
    assert isinstance(result["gold_reward"], float) and isinstance(result["kl"], float)
