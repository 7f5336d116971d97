"""PPO for language models (RLHF), the way that works: InstructGPT / Ziegler et al. with the implementation details.

Papers: PPO (Schulman et al. 2017, arXiv:1707.06347, Eq. 7 clipped surrogate); GAE (Schulman et al. 2016, Eq. 16);
RLHF with PPO (Ziegler et al. 2019, arXiv:1909.08593, Sec. 2.2; Stiennon et al. 2020, Eq. 2; Ouyang et al. 2022,
arXiv:2203.02155, Eq. 2, its pretraining mix PPO-ptx as the switch ptx_coef); the details (Huang et al. 2022,
"The 37/N implementation details of PPO" and
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
  D2 the EOS is an action like any other token: the response mask covers every token up to AND including the first
     EOS, the KL penalty is taken on all of them, and the score, read by the reward model at the EOS (it saw the
     whole response), lands on the EOS token. A response that never emits EOS within max_new_tokens gets its score
     on its last token, minus `missing_eos_penalty` (N+ detail: otherwise the policy learns to ramble past the
     budget, where the RM score is meaningless; TRL 1.12 has the penalty but off by default). TRL 1.12's
     PPOTrainer differs: with its default stop_token=None nothing stops at EOS and the score lands on the last of
     response_length tokens; with stop_token="eos" the score lands one position after the last non-PAD token,
     outside the policy's loss mask (docs/ppo.md).
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
  D8 several epochs over each rollout in shuffled minibatches, reshuffled every epoch: `epochs`.
  D9 dropout off everywhere (policy, reference, critic): with dropout the rollout's log-probs and the training
     forward disagree even before any update, so the ratio starts != 1. Forced, not a switch.
  D10 the reward model is fixed and scores are normalised (mean 0 / std 1 on reference samples, algos/rm.py), so
     beta is in reward-std units.
  D11 PPO-ptx (InstructGPT, Ouyang et al. 2022, Eq. 2): objective(phi) = E[r(x, y) - beta log(pi(y|x) / pi_ref(y|x))]
     + gamma E_{x ~ D_pretrain}[log pi(x)], i.e. the loss gets + ptx_coef * NLL of a micro-batch of pretraining text
     (`ptx_data`, a {"text"} JSONL; on the toy world its pretraining corpus) next to every rollout micro-batch. It
     counters the "alignment tax", the drop of the policy's language-modelling quality that RLHF causes. ptx_coef
     = 0 (default) is off. `ptx_coef`, `ptx_data`

How it plugs into the one loop: the rollout (prompts, sampling, reference, scores, missing-EOS penalty) is the one
every online algorithm shares (algos/online.py); make_rows adds the critic's values, per-token rewards, GAE and
whitening; `loss()` runs the policy and the critic through the wrapped module's ONE forward (DDP sees one forward
per backward). A trainer step is an OPTIMIZER step: a rollout of `rollout_batch_size` sequences (all ranks) gives
rollout_batch_size / batch_size * epochs of them; rollout time lands in time/data_s, updates in time/update_s.

Departures: the PPO-ptx NLL is the token mean over one micro-batch of micro_batch_size texts per rollout
micro-batch (InstructGPT draws 8x more pretraining than RL examples per batch; ptx_coef absorbs the ratio, and
gamma = 27.8 there is in their units, not ours); the losses are token means over each micro-batch (the trainer
averages micro-batches); the value clip is in score units (TRL) with no value normalisation; entropy is reported as
TRL's sampled estimate sum_t -log pi(y_t) (no entropy bonus); policy/approxkl_avg is a mean over the valid response
tokens (TRL 1.12's is a mean over every position, padding included). Checkpoints fall on rollout boundaries, where
resume is exact (the trainer refuses one from inside a rollout).
Implementation details with pointers, the toy world's reward model and PPO's measured results: docs/ppo.md.
"""
import copy
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.distributed as dist
import torch.nn as nn

from nanoalign.algos.online import OnlineAlgorithm, OnlineConfig
from nanoalign.algos.rl_math import (AdaptiveKLController, FixedKLController, entropy_from_logits, gae, masked_mean,
                                     masked_whiten, ppo_policy_loss, ppo_rewards, ppo_value_loss)
from nanoalign.algos.sft import sft_loss
from nanoalign.config import AT_LEAST_1, FRACTION, NON_NEGATIVE, POSITIVE
from nanoalign.data import micro_batches
from nanoalign.loading import load_reward_model
from nanoalign.logps import batch_logps
from nanoalign.model import RewardModel
from nanoalign.rollout import response_logits_to_logps
from nanoalign.scorers import RewardModelScorer


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

    def forward(self, input_ids, attention_mask, response_len, ptx=None):
        """-> logits (B, R, V) predicting the R response tokens, values (B, R): V_t = V(x, y_<t), read at the
        position before response token t (columns P-1 .. P+R-2), as lm-human-preferences and TRL do. With `ptx`
        (input_ids, loss_mask, attention_mask of pretraining text) a third output: its token-mean NLL under the policy,
        in the same forward (D11), so DDP sees one forward per backward."""
        R = response_len
        hidden = self.policy(input_ids, attention_mask, return_hidden=True)      # (B, P + R, C)
        h = hidden[:, -R - 1:-1]                                                  # (B, R, C) states before y_t
        logits = self.policy.lm_head(h)                                           # (B, R, V)
        if self.critic is None:
            values = self.value_head(h).squeeze(-1).float()                       # (B, R) shared trunk
        else:
            values = self.critic.token_values(input_ids, attention_mask)[:, -R - 1:-1]  # (B, R) separate critic
        if ptx is None:
            return logits, values
        ptx_logps, ptx_counts, _ = batch_logps(self.policy, ptx[0], ptx[1], ptx[2])  # (B_ptx,) summed log pi(x)
        return logits, values, sft_loss(ptx_logps, ptx_counts)  # -E[log pi(x)] per token (D11)

    @torch.no_grad()
    def values(self, input_ids, attention_mask, response_len):
        """Critic values only (the rollout's old values), without the policy's lm_head."""
        R = response_len
        if self.critic is None:
            h = self.policy(input_ids, attention_mask, return_hidden=True)[:, -R - 1:-1]
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
class PPOConfig(OnlineConfig):
    # the shared online keys (algos/online.py) with PPO's defaults: a rollout of 64 sequences, one per prompt,
    # 4 epochs over it in minibatches of batch_size (D8), a penalty for a response without EOS (D2)
    samples_per_prompt: Annotated[int, AT_LEAST_1] = 1
    rollout_batch_size: Annotated[int, NON_NEGATIVE] = 64
    epochs: Annotated[int, AT_LEAST_1] = 4
    missing_eos_penalty: float = 1.0
    generation_batch_size: Annotated[int, AT_LEAST_1] = 64
    # PPO's own
    recompute_logprobs: bool = False  # old log-probs from a full forward instead of generate()'s (D1)
    kl_coef: Annotated[float, NON_NEGATIVE] = 0.05  # beta of the per-token KL penalty (initial value if adaptive) (D3)
    kl_estimator: Literal["k1", "k3"] = "k1"  # per-token KL estimate in the reward (D3)
    adaptive_kl: bool = False  # Ziegler et al.'s proportional controller of beta (D3)
    kl_target: Annotated[float, POSITIVE] = 6.0  # target KL per sequence (nats) of the adaptive controller
    kl_horizon: Annotated[int, AT_LEAST_1] = 10000  # episodes for the controller to move beta by up to 20%
    gamma: Annotated[float, FRACTION] = 1.0  # GAE discount (D5)
    lam: Annotated[float, FRACTION] = 0.95  # GAE lambda (D5)
    whiten_advantages: bool = True  # (D6)
    whiten_rewards: bool = False  # (D6)
    cliprange: Annotated[float, POSITIVE] = 0.2  # policy ratio clip eps (D7)
    cliprange_value: Annotated[float, POSITIVE] = 0.2  # value clip, in reward units (D7)
    vf_coef: Annotated[float, NON_NEGATIVE] = 0.1  # weight of the value loss (D7)
    critic: Literal["separate", "head"] = "separate"  # separate value model or a head on the policy (D4)
    critic_init: Literal["auto", "reward_model", "policy"] = "auto"  # auto: the RM if there is one, else the policy
    ptx_coef: Annotated[float, NON_NEGATIVE] = 0.0  # gamma of PPO-ptx: weight of the pretraining NLL; 0 -> off (D11)
    ptx_data: str = ""  # {"text"} JSONL of pretraining text for ptx_coef > 0 (the toy world fills in its corpus)


class PPO(OnlineAlgorithm):
    name = "ppo"
    Config = PPOConfig
    key_metrics = ("objective/scores", "objective/kl", "time/data_s", "time/update_s")  # data_s: the rollout

    def __init__(self, cfg, policy, tokenizer, ctx):
        super().__init__(cfg, policy, tokenizer, ctx)  # prompts, scorer, monitor, reference (eval mode: D9)
        if cfg.dropout:
            self.log(f"ppo: dropout={cfg.dropout} ignored; PPO runs without dropout (D9)")
        self.module = ActorCritic(policy, self.make_critic(policy) if cfg.critic == "separate" else None)
        no_dropout(self.module)                                                   # D9
        self.kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
                       else FixedKLController(cfg.kl_coef))
        self.ptx_examples = []
        if cfg.ptx_coef:
            if not cfg.ptx_data:
                raise ValueError("ppo: ptx_coef > 0 needs ptx_data, a JSONL of {\"text\"} rows of pretraining text")
            self.ptx_examples = self.load_file(cfg.ptx_data, "text")  # D11

    def batches(self, start_step):
        """The rollout micro-batches; with PPO-ptx each gets a micro-batch of pretraining text as ptx_* fields,
        drawn by data.micro_batches so that a resumed run draws the same texts (D11)."""
        rollout = super().batches(start_step)
        if not self.ptx_examples:
            yield from rollout
            return
        c = self.ctx
        texts = micro_batches(self.ptx_examples, c.micro_batch_size, c.grad_accum, c.rank, c.world_size,
                              self.cfg.seed, start_step, self.collate, bucket=self.cfg.bucket_by_length)
        for batch, ptx in zip(rollout, texts):
            yield {**batch, **{f"ptx_{k}": v for k, v in ptx.items()}}

    @property
    def recompute_logprobs(self):
        return self.cfg.recompute_logprobs  # D1: generate()'s log-probs by default

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

    @torch.no_grad()
    def make_rows(self, r):
        """Critic values, per-token rewards, GAE and whitening for a scored rollout (its missing-EOS penalty already
        applied by OnlineAlgorithm) -> the rows that minibatches are cut from."""
        cfg, mb = self.cfg, self.cfg.generation_batch_size
        R, mask = r.response_mask.shape[1], r.response_mask
        self.module.eval()
        with self.ctx.autocast():
            values = torch.cat([self.module.values(r.input_ids[i:i + mb], r.attention_mask[i:i + mb], R)
                                for i in range(0, len(r), mb)]).float()
        self.module.train()
        t = ppo_targets(r.scores, r.eos, r.logprobs, r.ref_logprobs, values, mask, self.kl_ctl.value,
                        cfg.kl_estimator, 0.0, cfg.gamma, cfg.lam, cfg.whiten_rewards, cfg.whiten_advantages)
        seq_kl = t["kl"].sum(1)                                                    # (N,) per-sequence KL
        self.rollout_metrics.update({
            "objective/kl": seq_kl.mean(), "objective/kl_coef": torch.tensor(self.kl_ctl.value),
            "objective/entropy": (-r.logprobs * mask).sum(1).mean(),               # TRL's sampled estimate
            "objective/non_score_reward": t["non_score_reward"].sum(1).mean(),
            "objective/rlhf_reward": t["scores"].mean() + t["non_score_reward"].sum(1).mean()})
        self.kl_ctl.update(global_mean(seq_kl.mean()), cfg.rollout_batch_size)      # D3 adaptive beta
        return {"input_ids": r.input_ids, "attention_mask": r.attention_mask, "response_mask": mask,
                "logprobs": r.logprobs, "values": values, "advantages": t["advantages"], "returns": t["returns"]}

    def loss(self, model, batch):
        cfg, mask = self.cfg, batch["response_mask"]
        ptx = None if "ptx_input_ids" not in batch else (  # PPO-ptx's pretraining text (D11)
            batch["ptx_input_ids"], batch["ptx_loss_mask"], batch["ptx_attention_mask"])
        logits, values, *ptx_nll = model(batch["input_ids"], batch["attention_mask"], mask.shape[1], ptx)  # one forward
        logp = response_logits_to_logps(logits, batch, cfg.temperature)           # (B, R) D1: same temperature
        pg_loss, clipfrac, approxkl = ppo_policy_loss(logp, batch["logprobs"], batch["advantages"], mask,
                                                      cfg.cliprange)
        vf_loss, vf_clipfrac = ppo_value_loss(values, batch["values"], batch["returns"], mask, cfg.cliprange_value)
        loss = pg_loss + cfg.vf_coef * vf_loss
        extra = {}
        if ptx_nll:  # PPO-ptx: + gamma * (-E_pretrain[log pi(x)]) (D11)
            loss = loss + cfg.ptx_coef * ptx_nll[0]
            extra["ptx/nll_loss"] = ptx_nll[0].detach()
        with torch.no_grad():
            entropy = masked_mean(entropy_from_logits(logits / cfg.temperature), mask)
            ratio = masked_mean(torch.exp(logp - batch["logprobs"]), mask)
        return loss, {**self.rollout_metrics, "policy/approxkl_avg": approxkl, "policy/clipfrac_avg": clipfrac,
                      "policy/entropy_avg": entropy, "loss/policy_avg": pg_loss.detach(),
                      "loss/value_avg": vf_loss.detach(), "val/clipfrac_avg": vf_clipfrac, "val/ratio": ratio, **extra}


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
