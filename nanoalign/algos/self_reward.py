"""Self-Rewarding Language Models (Yuan et al. 2024, arXiv:2401.10020, Sec. 2): the policy is its own judge.

Each iteration M_t -> M_{t+1} of the paper (Sec. 2.3, AI Feedback Training): for each prompt x the current model M_t
samples N candidate responses, M_t itself judges them as an LLM-as-a-Judge, the highest- and the lowest-judged form
a preference pair (y_w, y_l) (a prompt whose candidates all tie gives none), and M_{t+1} is trained on those pairs
with DPO (Rafailov et al. 2023, Eq. 7: dpo.preference_loss, any --loss_type).

Here an iteration is one rollout of the online DPO loop (online_dpo.OnlineDPO: this class is that loop with N
samples and a different annotator, and reuses its loss, reference and metrics): samples_per_prompt = N responses per
prompt from the current policy, judged by the current policy (judge="self": nanoalign/judge.py's LLMJudge backed by
the model being trained, frozen=False, in eval mode for each call), one (best, worst) pair per prompt.

Judging is pairwise, in both orders. Every pair (i, j) of a prompt's N samples is asked with the judge template in
both slot orders (LLMJudge.prefer); with judge_agreement (default on) a verdict counts only when the two orders pick
the same response. judge/disagreement is the share of pairs whose orders disagree: the judge's position-bias rate
(with judge/position_bias, its mean slot-A log-odds), reported every rollout. best_and_worst then ranks the samples by
their number of counted wins (a Copeland count): best = most wins, worst = fewest (the first on ties), and the pair is
kept only when the judge's counted verdict on (best, worst) itself says best beats worst; otherwise the prompt gives
no pair (weight 0, counted in frac_ties).

Who can judge. The toy world's 0.9M-parameter model cannot act as a judge: it was never taught to read a judging
prompt or to answer "A" / "B", so its two orders disagree on most pairs and the few pairs it keeps are noise
(docs/iterative.md measures it). For the toy world judge="" is the scorer fallback: the rollout's scorer decides
(the gold reward there, which train.py fills in as reward_model; a reward model with reward_model="ckpt:<dir>"), the
higher score winning each pair (judge.score_preference; equal scores are no verdict), through the same pairing rule,
as online DPO does with judge="". data/self_reward_toy.toml is that setting (its frontier point). judge="<model
spec>" asks another, frozen LLM instead (online DPO's judge).

This implementation differs from the paper in:
  - the judge is pairwise (which of two responses is better, read from the A/B answer log-probabilities in both
    orders, judge.py), not the paper's pointwise additive 5-point rubric sampled 3 times and averaged; so "highest
    and lowest score" becomes most and fewest agreed pairwise wins;
  - an iteration is one rollout of rollout_batch_size pairs (default one batch), not a dataset of thousands of
    prompts, and the reference pi_ref stays the initial model pi_0 for the whole run (online DPO's), where the
    paper's M_{t+1} is trained with M_t as its reference;
  - there is no instruction-following / evaluation fine-tuning stage (the paper's IFT + EFT seed data that teach M_1
    to judge): the policy judges with whatever ability it starts with;
  - N = samples_per_prompt defaults to 4 (the paper: 4), and the prompts are the run's own, not newly generated.
KL knob: beta.
"""
import dataclasses
import itertools
from dataclasses import dataclass
from typing import Annotated

import torch

from nanoalign.algos.online_dpo import OnlineDPO, OnlineDPOConfig, make_judge, pairs_from_rollout
from nanoalign.config import Range
from nanoalign.judge import ScoreAnnotator, score_preference


@dataclass
class SelfRewardConfig(OnlineDPOConfig):
    samples_per_prompt: Annotated[int, Range(2)] = 4  # N candidates per prompt; every pair of them is judged
    judge: str = "self"  # "self": the policy judges its own samples; "" -> reward_model's scorer; else a model spec
    judge_agreement: bool = True  # a pairwise verdict counts only when both orders pick the same response


def judged_pairs(n):
    """The (i, j), i < j, sample pairs one prompt's n samples are judged on: n=3 -> (0,1), (0,2), (1,2)."""
    return list(itertools.combinations(range(n), 2))


def best_and_worst(p_first, agree, n):
    """The (best, worst) sample of each prompt from its pairwise verdicts.

    p_first (B, M): P(y_i > y_j) for the M = n(n-1)/2 pairs of judged_pairs(n); agree (B, M) bool: the verdict counts.
    V[b, i, j] = +1 when sample i beats j by a counted verdict, -1 when j beats i, 0 for none (disagreeing orders, a
    tie at exactly 1/2). wins = the number of +1 in each row; best = argmax, worst = argmin (the first on ties).
    -> best (B,), worst (B,), keep (B,) bool: V[best, worst] = +1 (so best != worst)."""
    B, pairs = p_first.shape[0], torch.tensor(judged_pairs(n))   # pairs (M, 2)
    verdict = ((p_first > 0.5).float() - (p_first < 0.5).float()) * agree.float()  # +1 / -1 / 0  (B, M)
    V = torch.zeros(B, n, n)
    V[:, pairs[:, 0], pairs[:, 1]] = verdict                      # i vs j
    V[:, pairs[:, 1], pairs[:, 0]] = -verdict                     # j vs i: the same verdict
    wins = (V > 0).sum(2)                                         # counted wins of each sample  (B, n)
    best, worst = wins.argmax(1), wins.argmin(1)                  # the first index on ties
    keep = V[torch.arange(B), best, worst] > 0
    return best, worst, keep


def select_rows(rollout, index):
    """The rollout's rows `index` (LongTensor), tensors and texts alike."""
    rows = {f.name: getattr(rollout, f.name)[index.to(getattr(rollout, f.name).device)]
            for f in dataclasses.fields(rollout) if torch.is_tensor(getattr(rollout, f.name))}
    texts = {name: [getattr(rollout, name)[i] for i in index.tolist()] for name in ("prompts", "responses")}
    return dataclasses.replace(rollout, **rows, **texts)


class SelfReward(OnlineDPO):
    name = "self_reward"
    Config = SelfRewardConfig

    @staticmethod
    def check_samples_per_prompt(cfg):
        pass  # any N >= 2 (the Config's range)

    def make_annotator(self):
        if self.cfg.judge == "self":  # the model being trained, live: neither copied nor cast
            return make_judge(self.policy, self.tokenizer, self.cfg, frozen=False)
        return super().make_annotator()

    def policy_answers_in_fp32(self):
        return self.cfg.judge == "self"  # the self-judge reads the policy in fp32 (judge.py says why)

    def make_rows(self, rollout):
        n = self.cfg.samples_per_prompt
        B, pairs = len(rollout) // n, judged_pairs(n)
        first = torch.tensor([b * n + i for b in range(B) for i, _ in pairs])   # rollout rows of each pair  (B*M,)
        second = torch.tensor([b * n + j for b in range(B) for _, j in pairs])
        if isinstance(self.annotator, ScoreAnnotator):  # the rollout already scored every sample
            scores = rollout.scores.cpu()
            p_first, agree = score_preference(scores[first], scores[second]), torch.ones(len(first), dtype=torch.bool)
        else:  # the LLM judge, both orders (in fp32: see online_dpo.make_rows)
            text = lambda rows, field: [getattr(rollout, field)[r] for r in rows.tolist()]
            p_first = self.annotator.prefer(text(first, "prompts"), text(first, "responses"),
                                            text(second, "responses")).cpu()
            agree = self.annotator.last_agree.cpu() if self.cfg.judge_agreement else torch.ones_like(p_first).bool()
            self.rollout_metrics["judge/position_bias"] = self.annotator.last_position_bias
            self.rollout_metrics["judge/disagreement"] = self.annotator.last_disagreement
        M = len(pairs)
        best, worst, keep = best_and_worst(p_first.view(B, M), agree.view(B, M), n)
        offset = torch.arange(B) * n
        index = torch.stack([offset + best, offset + worst], 1).view(-1)  # best_0, worst_0, best_1, ...  (2B,)
        self.rollout_metrics["frac_ties"] = 1 - keep.float().mean()  # prompts that gave no pair
        weight = keep.float().to(rollout.scores.device)
        return pairs_from_rollout(select_rows(rollout, index), torch.ones_like(weight, dtype=torch.bool), weight)
