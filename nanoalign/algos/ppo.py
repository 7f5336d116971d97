"""PPO for language models (RLHF), the way that works: InstructGPT / Ziegler et al. with the implementation details.

Papers: PPO (Schulman et al. 2017, arXiv:1707.06347, Eq. 7 clipped surrogate); GAE (Schulman et al. 2016, Eq. 16);
RLHF with PPO (Ziegler et al. 2019, arXiv:1909.08593, Sec. 2.2; Stiennon et al. 2020, Eq. 2; Ouyang et al. 2022,
Eq. 2 without the pretraining mix); the details (Huang et al. 2022, "The 37/N implementation details of PPO" and
"The N implementation details of RLHF with PPO"; Huang et al. 2024, "The N+ implementation details of RLHF with PPO:
a case study on TL;DR summarization", arXiv:2403.17031). The math is in nanoalign/algos/rl_math.py; this file is the
adapter: rollout -> per-token rewards -> GAE -> minibatch epochs of the clipped losses.

Objective (Stiennon et al. Eq. 2):  R(x, y) = r(x, y) - beta * log(pi(y|x) / pi_ref(y|x)), maximised with PPO, where
the KL term is spread over the tokens and the score lands on the last one:
    r_t = -beta * kl_t  (+ r(x, y) at the EOS token),   kl_t = log pi_old(y_t) - log pi_ref(y_t)   (k1; k3 optional)
    delta_t = r_t + gamma V_{t+1} - V_t,   A_t = delta_t + gamma lam A_{t+1},   returns_t = A_t + V_t
    L = -mean_t min(rho_t A_t, clip(rho_t, 1 +- eps) A_t)  +  vf_coef * 0.5 mean_t max((V - R)^2, (V_clip - R)^2)

The details, each switchable in Config where one would ablate it (D-numbers are ours):
  D1 rollout from prompt-only data with the KV cache (nanoalign/rollout.py); log-probs of the sampling distribution
     softmax(logits / temperature), in the rollout AND in training (forgetting the temperature in training makes the
     first ratio != 1).  `temperature`, `recompute_logprobs`
  D2 the score is read at the EOS token (the reward model saw the whole response); a response that never emits EOS
     within max_new_tokens gets `missing_eos_penalty` subtracted from its score (N+ detail: otherwise the policy
     learns to ramble past the budget, where the RM score is meaningless).
  D3 per-token KL penalty with the score added at the last token (rl_math.ppo_rewards); k1 (the papers' log-ratio)
     by default, k3 selectable: `kl_estimator`. Fixed beta or the adaptive controller of Ziegler et al.:
     `kl_coef`, `adaptive_kl`, `kl_target`, `kl_horizon`.
  D4 the critic: a SEPARATE value model (default) initialised from the reward model when the reward is a reward model
     checkpoint, or from the policy (fresh head) when the reward is "gold"; or a value head on the policy (`critic=
     "head"`). Default separate, as lm-human-preferences, TRL and the N+ paper: a shared trunk lets the value loss'
     gradient (another scale, another target) pull the policy's features, and the RM init gives a critic that already
     knows what scores well (N+ detail). The cost is a second network's memory and forward.
  D5 GAE with gamma = 1 (the episode is one response; no discounting) and lambda = 0.95: `gamma`, `lam`.
  D6 advantages whitened over the valid tokens of the whole rollout, across ranks (rl_math.masked_whiten with
     all_reduce): `whiten_advantages`. Rewards are not whitened by default (TRL's default): `whiten_rewards`.
  D7 the clipped surrogate (eps 0.2) and the clipped value loss (eps_v 0.2, in reward units): `cliprange`,
     `cliprange_value`, `vf_coef`.
  D8 several epochs over each rollout in shuffled minibatches, reshuffled every epoch: `ppo_epochs`.
  D9 dropout off everywhere (policy, reference, critic): with dropout the rollout's log-probs and the training
     forward disagree even before any update, so the ratio starts != 1. Forced, not a switch.
  D10 the reward model is fixed and scores are normalised (mean 0 / std 1 on reference samples, algos/rm.py), so
     beta is in reward-std units.

How it plugs into the one loop: `batches()` runs a rollout phase (generate with the unwrapped policy under no_grad,
score, reference and critic forwards, rewards, GAE, whitening), then yields the rollout's micro-batches for
`ppo_epochs` epochs; `loss()` runs the policy and the critic through the wrapped module's ONE forward (DDP sees one
forward per backward). The trainer's "step" is an OPTIMIZER step: each rollout of `rollout_batch_size` sequences
(all ranks) gives rollout_batch_size / batch_size * ppo_epochs steps, so max_steps counts minibatch updates, not
rollouts. Rollout time lands in the trainer's time/data_s (it happens inside next(batches)), updates in
time/update_s; time/rollout_s is the mean duration of one rollout phase.

Departures: no pretraining-gradient mix (PPO-ptx); the losses are token means over each micro-batch (the trainer
averages micro-batches); the value clip is in score units (TRL) with no value normalisation; entropy is reported as
TRL's sampled estimate sum_t -log pi(y_t) (no entropy bonus); resuming mid-rollout starts a new rollout (the rest
of the interrupted one is not replayed; checkpoint at multiples of the rollout's steps to resume exactly).
"""
import copy
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn as nn

from nanoalign.algos.rl_math import (AdaptiveKLController, FixedKLController, entropy_from_logits, gae, masked_mean,
                                     masked_whiten, ppo_policy_loss, ppo_rewards, ppo_value_loss)
from nanoalign.data import load_examples, micro_batches
from nanoalign.loading import load_reward_model
from nanoalign.model import RewardModel
from nanoalign.reference import Reference
from nanoalign.rollout import generate_rollout, minibatches, response_logits_to_logps
from nanoalign.scorers import RewardModelScorer, get_scorer
from nanoalign.trainer import Algorithm


class ActorCritic(nn.Module):
    """The trained module: the policy and its critic. One forward gives both, for the response positions only.
    critic: a RewardModel (a separate value network) or None (a value head on the policy's hidden states)."""

    def __init__(self, policy, critic=None):
        super().__init__()
        self.policy, self.critic = policy, critic
        if critic is None:
            d = policy.cfg.n_embd
            self.value_head = nn.Linear(d, 1)
            nn.init.normal_(self.value_head.weight, std=1 / (d + 1) ** 0.5)
            nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask, response_len):
        """-> logits (B, R, V) predicting the R response tokens, values (B, R): V_t = V(x, y_<t), read at the
        position before response token t (columns P-1 .. P+R-2), as lm-human-preferences and TRL do."""
        R = response_len
        hidden = self.policy.hidden_states(input_ids, attention_mask)            # (B, P + R, C)
        h = hidden[:, -R - 1:-1]                                                  # (B, R, C) states before y_t
        logits = self.policy.lm_head(h)                                           # (B, R, V)
        if self.critic is None:
            values = self.value_head(h).squeeze(-1).float()                       # (B, R) shared trunk
        else:
            values = self.critic.token_values(input_ids, attention_mask)[:, -R - 1:-1]  # (B, R) separate critic
        return logits, values

    @torch.no_grad()
    def values(self, input_ids, attention_mask, response_len):
        """Critic values only (the rollout's old values), without the policy's lm_head."""
        R = response_len
        if self.critic is None:
            h = self.policy.hidden_states(input_ids, attention_mask)[:, -R - 1:-1]
            return self.value_head(h).squeeze(-1).float()
        return self.critic.token_values(input_ids, attention_mask)[:, -R - 1:-1]


def ppo_targets(scores, eos, logprobs, ref_logprobs, values, mask, kl_coef, kl_estimator="k1",
                missing_eos_penalty=0.0, gamma=1.0, lam=0.95, whiten_rewards=False, whiten_advantages=True):
    """Rollout tensors -> per-token rewards, advantages, returns (all (N, R), 0 on padding) and the scores used.
    scores (N,), eos (N,) bool, logprobs / ref_logprobs / values / mask (N, R). D2, D3, D5, D6 of the docstring."""
    scores = torch.where(eos, scores, scores - missing_eos_penalty)            # D2: no EOS -> penalty
    rewards, non_score_reward, kl = ppo_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, kl_estimator)  # D3
    if whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False, all_reduce=True)
    values = values * mask
    advantages, returns = gae(rewards, values, mask, gamma, lam)                # D5
    if whiten_advantages:
        advantages = masked_whiten(advantages, mask, all_reduce=True)          # D6, over all ranks' tokens
    return {"rewards": rewards, "non_score_reward": non_score_reward, "kl": kl, "advantages": advantages,
            "returns": returns, "scores": scores}


@dataclass
class Config:
    reward_model: str = ""  # "gold" (toy world only) | "ckpt:<dir>" of --algo=rm; "" -> the toy world's proxy RM
    monitor_reward: str = ""  # a second reward logged as objective/monitor_scores, not optimised ("gold" on the toy)
    rollout_batch_size: int = 64  # sequences per rollout over all ranks (prompts x samples_per_prompt)
    samples_per_prompt: int = 1  # responses per prompt in a rollout
    ppo_epochs: int = 4  # passes over each rollout (D8)
    max_new_tokens: int = 40  # response budget; longer responses are cut and have no EOS (D2)
    temperature: float = 1.0  # sampling temperature, also applied to the training log-probs (D1)
    top_k: int = 0  # 0 -> off; note that top-k/top-p make the sampled KL estimate biased
    top_p: float = 1.0  # 1 -> off
    recompute_logprobs: bool = False  # old log-probs from a full forward instead of generate()'s (D1)
    rollout_micro_batch: int = 64  # rows per generate / no-grad forward call in the rollout
    kl_coef: float = 0.05  # beta of the per-token KL penalty (initial value if adaptive) (D3)
    kl_estimator: Literal["k1", "k3"] = "k1"  # per-token KL estimate in the reward (D3)
    adaptive_kl: bool = False  # Ziegler et al.'s proportional controller of beta (D3)
    kl_target: float = 6.0  # target KL per sequence (nats) of the adaptive controller
    kl_horizon: int = 10000  # episodes for the controller to move beta by up to 20%
    missing_eos_penalty: float = 1.0  # subtracted from the score of a response without EOS; 0 -> off (D2)
    gamma: float = 1.0  # GAE discount (D5)
    lam: float = 0.95  # GAE lambda (D5)
    whiten_advantages: bool = True  # (D6)
    whiten_rewards: bool = False  # (D6)
    cliprange: float = 0.2  # policy ratio clip eps (D7)
    cliprange_value: float = 0.2  # value clip, in reward units (D7)
    vf_coef: float = 0.1  # weight of the value loss (D7)
    critic: Literal["separate", "head"] = "separate"  # separate value model or a head on the policy (D4)
    critic_init: Literal["auto", "reward_model", "policy"] = "auto"  # auto: the RM if there is one, else the policy


class PPO(Algorithm):
    name = "ppo"
    Config = Config
    data_format = "prompt"
    key_metrics = ("objective/scores", "objective/kl", "time/data_s", "time/update_s")  # data_s: the rollout

    def __init__(self, cfg, policy, tokenizer, ctx):
        super().__init__(cfg, policy, tokenizer, ctx)
        if cfg.rollout_batch_size % cfg.batch_size:
            raise ValueError(f"rollout_batch_size={cfg.rollout_batch_size} must be a multiple of batch_size="
                             f"{cfg.batch_size} (each rollout is cut into optimizer minibatches of batch_size)")
        if cfg.rollout_batch_size % (ctx.world_size * cfg.samples_per_prompt):
            raise ValueError("rollout_batch_size must be a multiple of world_size * samples_per_prompt")
        if not cfg.reward_model:
            raise ValueError('reward_model is empty: give "gold" or "ckpt:<reward model dir>" (train.py fills in the '
                             "toy world's proxy reward model when no --data is given)")
        self.steps_per_rollout = cfg.rollout_batch_size // cfg.batch_size * cfg.ppo_epochs
        if ctx.master and cfg.dropout:
            print(f"ppo: dropout={cfg.dropout} ignored; PPO runs without dropout (D9)")
        self.scorer = get_scorer(cfg.reward_model, ctx.device)
        self.monitor = get_scorer(cfg.monitor_reward, ctx.device) if cfg.monitor_reward else None
        # a frozen copy (eval mode: D9, no dropout), or under LoRA adapters off
        self.reference = Reference(policy, fused=cfg.fused_logps)
        self.module = ActorCritic(policy, self.make_critic(policy) if cfg.critic == "separate" else None)
        no_dropout(self.module)                                                   # D9
        max_prompt_len = cfg.max_len - cfg.max_new_tokens
        if max_prompt_len < 1:
            raise ValueError(f"max_len={cfg.max_len} leaves no room for a prompt after max_new_tokens={cfg.max_new_tokens}")
        self.prompts = load_examples(cfg.data, "prompt", tokenizer, cfg.max_len, max_prompt_len, log=self.log)
        self.kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
                       else FixedKLController(cfg.kl_coef))

    def make_critic(self, policy):
        """D4: a RewardModel used as a value network, from the reward model or from the policy's weights."""
        cfg = self.cfg
        from_rm = cfg.critic_init == "reward_model" or (cfg.critic_init == "auto" and cfg.reward_model != "gold")
        if not from_rm:
            return RewardModel(copy.deepcopy(policy))                             # fresh head on the SFT trunk
        if isinstance(self.scorer, RewardModelScorer):
            critic = copy.deepcopy(self.scorer.model)
        else:
            critic = load_reward_model(cfg.reward_model, self.ctx.device)[0]
        critic.fold_normalisation()  # values in normalised score units, trained as such
        critic.backbone.reward_model_spec = cfg.reward_model  # under LoRA, a merge rebuilds the trunk from the RM
        return critic.train().requires_grad_(True)

    def state_dict(self):
        return {"policy_prefix": "policy.", "kl_coef": self.kl_ctl.value}

    def load_state_dict(self, ckpt):
        self.kl_ctl.value = ckpt.get("kl_coef", self.kl_ctl.value)  # the adaptive beta is state too

    def prompt_batches(self, start_rollout):
        """This rank's prompts of each rollout, in a seeded order shared by all ranks (data.micro_batches)."""
        c, cfg = self.ctx, self.cfg
        per_rank = cfg.rollout_batch_size // c.world_size // cfg.samples_per_prompt
        return micro_batches(self.prompts, per_rank, 1, c.rank, c.world_size, cfg.seed, start_rollout,
                             lambda examples: [e["prompt_ids"] for e in examples], bucket=False)

    def batches(self, start_step):
        start_rollout = -(-start_step // self.steps_per_rollout)                   # ceil: a new rollout on resume
        for prompt_ids in self.prompt_batches(start_rollout):
            rows, stats = self.rollout(prompt_ids)
            for mb in minibatches(rows, self.ctx.micro_batch_size, self.cfg.ppo_epochs):  # D8
                yield {**mb, **stats}

    @torch.no_grad()
    def rollout(self, prompt_ids):
        """Generate, score, reference, value; rewards, GAE, whitening. -> (per-row tensors, per-rollout stats)."""
        cfg, ctx, start = self.cfg, self.ctx, time.perf_counter()
        r = generate_rollout(self.policy, self.tokenizer, prompt_ids, cfg.samples_per_prompt, cfg.max_new_tokens,
                             self.scorer, cfg.temperature, cfg.top_k, cfg.top_p, self.reference,
                             cfg.rollout_micro_batch, autocast=ctx.autocast, recompute_logprobs=cfg.recompute_logprobs,
                             fused=cfg.fused_logps)
        R, mask = r.response_mask.shape[1], r.response_mask
        self.module.eval()
        with ctx.autocast():
            values = torch.cat([self.module.values(r.input_ids[i:i + cfg.rollout_micro_batch],
                                                   r.attention_mask[i:i + cfg.rollout_micro_batch], R)
                                for i in range(0, len(r), cfg.rollout_micro_batch)]).float()
        self.module.train()
        t = ppo_targets(r.scores, r.eos, r.logprobs, r.ref_logprobs, values, mask, self.kl_ctl.value,
                        cfg.kl_estimator, cfg.missing_eos_penalty, cfg.gamma, cfg.lam, cfg.whiten_rewards,
                        cfg.whiten_advantages)
        seq_kl = t["kl"].sum(1)                                                    # (N,) per-sequence KL
        stats = {"objective/kl": seq_kl.mean(), "objective/kl_coef": self.kl_ctl.value,
                 "objective/entropy": (-r.logprobs * mask).sum(1).mean(),           # TRL's sampled estimate
                 "objective/non_score_reward": t["non_score_reward"].sum(1).mean(),
                 "objective/rlhf_reward": t["scores"].mean() + t["non_score_reward"].sum(1).mean(),
                 "objective/scores": t["scores"].mean(),
                 "val/num_eos_tokens": r.eos.float().sum(), "val/response_length": mask.sum(1).mean()}
        if self.monitor is not None:
            stats["objective/monitor_scores"] = self.monitor(r.prompts, r.responses).mean()
        self.kl_ctl.update(global_mean(seq_kl.mean()), cfg.rollout_batch_size)      # D3 adaptive beta
        stats["time/rollout_s"] = time.perf_counter() - start
        stats = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in stats.items()}
        rows = {"input_ids": r.input_ids, "attention_mask": r.attention_mask, "response_mask": mask,
                "logprobs": r.logprobs, "values": values, "advantages": t["advantages"], "returns": t["returns"]}
        return rows, stats

    def loss(self, model, batch):
        cfg, mask = self.cfg, batch["response_mask"]
        logits, values = model(batch["input_ids"], batch["attention_mask"], mask.shape[1])  # one forward, both nets
        logp = response_logits_to_logps(logits, batch, cfg.temperature)           # (B, R) D1: same temperature
        pg_loss, clipfrac, approxkl = ppo_policy_loss(logp, batch["logprobs"], batch["advantages"], mask,
                                                      cfg.cliprange)
        vf_loss, vf_clipfrac = ppo_value_loss(values, batch["values"], batch["returns"], mask, cfg.cliprange_value)
        loss = pg_loss + cfg.vf_coef * vf_loss
        with torch.no_grad():
            entropy = masked_mean(entropy_from_logits(logits / cfg.temperature), mask)
            ratio = masked_mean(torch.exp(logp - batch["logprobs"]), mask)
        rollout_stats = {k: v for k, v in batch.items() if v.dim() == 0}
        return loss, {**rollout_stats, "policy/approxkl_avg": approxkl, "policy/clipfrac_avg": clipfrac,
                      "policy/entropy_avg": entropy, "loss/policy_avg": pg_loss.detach(),
                      "loss/value_avg": vf_loss.detach(), "val/clipfrac_avg": vf_clipfrac, "val/ratio": ratio}


def no_dropout(module):
    """D9: zero every dropout probability (nn.Dropout modules and the attention dropout in each GPT config)."""
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if hasattr(m, "cfg") and hasattr(m.cfg, "dropout"):
            m.cfg.dropout = 0.0
    return module


def global_mean(x):
    """Mean of a scalar over DDP ranks (itself without DDP), as a float."""
    x = x.detach().float().clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return float(x)
