"""Online DPO with AI feedback (OAIF: Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback",
arXiv:2402.04792, Algorithm 1).

Each rollout samples TWO responses per prompt from the CURRENT policy, an annotator says which is better, and the
pair is trained on at once with a DPO-family loss (algos/dpo.py preference_loss, any loss_type; OAIF uses DPO, IPO
and SLiC). pi_ref is the initial policy; its log-probs come from the rollout. Offline DPO learns from pairs sampled
once from pi_ref; here the pairs follow the policy, so the preference data stays on-policy (the paper's claim is
that this beats offline DPO).

Annotators (nanoalign/judge.py): with judge="" the rollout's scorer decides -- reward_model="gold" (the toy world's
gold reward, the default) or "ckpt:<dir>" (a reward model from --algo=rm) -- and the higher score wins; with
judge="<model spec>" an LLM judge (any nanoalign-loadable LM, a different model from the policy) is asked with
judge_instruction, in both orders (with judge_agreement, a pair counts only when both orders pick the same response;
judge/disagreement is how often they do not); a chat model judges in its own chat template. reward_model then only
provides objective/scores for monitoring ("" for none).

This implementation differs from the paper in:
  - the annotator's choice is hard (P > 0.5) as in OAIF, but a TIE (equal scores, identical responses, a judge at
    exactly 0.5) gets weight 0 instead of a coin flip: the loss is the mean over the untied pairs of the micro-batch;
  - the paper's annotator is a large LLM prompted to choose (a generated "1" or "2"); ours reads the answer
    log-probabilities and swaps the order to cancel position bias (judge.py);
  - the policy and reference log-probs are of the sampling distribution at `temperature` (1.0 by default: the
    plain model), summed over tokens as in algos/dpo.py.
KL knob: beta. Metric names follow TRL's OnlineDPOTrainer (rewards/*, logps/*, objective/scores).
"""
from dataclasses import dataclass

import torch

from nanoalign.algos.dpo import REFERENCE_FREE, PreferenceLossConfig, preference_loss, preference_loss_kwargs
from nanoalign.algos.online import OnlineAlgorithm, OnlineConfig, sequence_logps
from nanoalign.chat import chat_template_for
from nanoalign.loading import load_model
from nanoalign.judge import DEFAULT_TEMPLATE, LLMJudge, ScoreAnnotator, score_preference


@dataclass
class OnlineDPOConfig(OnlineConfig, PreferenceLossConfig):  # the preference-loss keys are offline DPO's
    judge: str = ""  # "" -> the scorer of reward_model decides; else an LLM judge: "ckpt:<dir>" | "hf:<dir>"
    judge_instruction: str = "Which review is more positive?"  # what the judge is asked to prefer
    judge_template: str = DEFAULT_TEMPLATE  # {instruction} {prompt} {first} {second}; slots A and B
    judge_labels: str = "A,B"  # the two answers, scored after the template (with a leading space unless in chat form)
    judge_agreement: bool = False  # keep a pair only when the judge picks the same response in both orders
    judge_calibration: bool = False  # ... the orders read against the batch's mean slot bias (judge.py: calibrate)


def make_judge(model, tokenizer, cfg, frozen=True):
    """An LLMJudge of `model` with cfg's judge_instruction, judge_template and judge_labels; a chat model judges in
    its own chat template (then the labels have no leading space)."""
    chat = chat_template_for(tokenizer.spec)
    chat = None if chat == "plain" else chat
    labels = tuple(("" if chat else " ") + label.strip() for label in cfg.judge_labels.split(","))
    return LLMJudge(model, tokenizer, cfg.judge_instruction, cfg.judge_template, labels, chat_template=chat,
                    calibrate=cfg.judge_calibration, frozen=frozen)


def pairs_from_rollout(rollout, first_wins, weight):
    """Rows of a 2-per-prompt rollout (samples 2i and 2i+1) -> pair rows: chosen_* / rejected_* tensors,
    reference log-probs summed over each response, and the pair's weight. first_wins, weight: (N/2,)."""
    ref = rollout.ref_logprobs if rollout.ref_logprobs is not None else torch.zeros_like(rollout.logprobs)  # simpo/cpo
    ref_logps = (ref * rollout.response_mask).sum(1)  # log pi_ref(y | x)  (N,)
    per_row = {"input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask,
               "response_mask": rollout.response_mask, "ref_logps": ref_logps}
    pairs = {"weight": weight}
    for name, value in per_row.items():
        first, second = value[0::2], value[1::2]                    # (N/2, ...) each
        pick = first_wins.view(-1, *[1] * (value.dim() - 1))        # broadcast over the row's columns
        pairs[f"chosen_{name}"] = torch.where(pick, first, second)
        pairs[f"rejected_{name}"] = torch.where(pick, second, first)
    return pairs


class OnlineDPO(OnlineAlgorithm):
    name = "online_dpo"
    Config = OnlineDPOConfig
    key_metrics = ("objective/scores", "rewards/margins")
    rows_per_prompt = 1  # one training row = one pair

    def __init__(self, cfg, policy, tokenizer, ctx):
        self.check_samples_per_prompt(cfg)
        self.uses_reference = cfg.loss_type not in REFERENCE_FREE  # simpo / cpo need no pi_ref
        self.needs_reward = not cfg.judge  # an LLM judge decides instead of a scorer
        super().__init__(cfg, policy, tokenizer, ctx)
        self.loss_kwargs = preference_loss_kwargs(cfg)
        self.annotator = self.make_annotator()

    @staticmethod
    def check_samples_per_prompt(cfg):
        if cfg.samples_per_prompt != 2:
            raise ValueError(f"online_dpo samples a pair per prompt: samples_per_prompt must be 2, got "
                             f"{cfg.samples_per_prompt}")

    def make_annotator(self):
        """The LLM judge of cfg.judge (another model, frozen), or the scorer's ScoreAnnotator with judge=""."""
        if not self.cfg.judge:
            return ScoreAnnotator(self.scorer)
        judge_model, judge_tokenizer = load_model(self.cfg.judge, self.ctx.device)
        return make_judge(judge_model, judge_tokenizer, self.cfg)

    def make_rows(self, rollout):
        prompts, first, second = rollout.prompts[0::2], rollout.responses[0::2], rollout.responses[1::2]
        if isinstance(self.annotator, ScoreAnnotator):  # the rollout already scored both: same rule, no second call
            p_first = score_preference(rollout.scores[0::2], rollout.scores[1::2])
        else:
            # in fp32, not autocast, even in a bf16 run (LLMJudge's docstring says why)
            p_first = self.annotator.prefer(prompts, first, second).to(rollout.scores.device)
            self.rollout_metrics["judge/position_bias"] = self.annotator.last_position_bias
            self.rollout_metrics["judge/disagreement"] = self.annotator.last_disagreement
            if self.annotator.calibrate:
                self.rollout_metrics["judge/calibrated_disagreement"] = self.annotator.last_calibrated_disagreement
        weight = (p_first != 0.5).float()  # a tie carries no preference
        if self.cfg.judge_agreement and not isinstance(self.annotator, ScoreAnnotator):
            weight *= self.annotator.last_agree.to(weight.device).float()  # the two orders disagree: no label
        self.rollout_metrics["frac_ties"] = 1 - weight.mean()
        return pairs_from_rollout(rollout, p_first > 0.5, weight)

    def has_signal(self, batch):
        return bool(batch["weight"].any())  # every pair a tie or a disagreement: nothing to learn from

    def loss(self, model, batch):
        both = {k: torch.cat([batch[f"chosen_{k}"], batch[f"rejected_{k}"]])  # one forward for chosen + rejected
                for k in ("input_ids", "attention_mask", "response_mask")}
        _, logps, counts = sequence_logps(model, both, self.cfg.temperature, self.cfg.fused_logps)  # (2B,)
        B = logps.shape[0] // 2
        chosen, rejected = logps[:B], logps[B:]
        reference_free = self.cfg.loss_type in REFERENCE_FREE
        losses, chosen_rewards, rejected_rewards = preference_loss(
            chosen, rejected, None if reference_free else batch["chosen_ref_logps"],
            None if reference_free else batch["rejected_ref_logps"], chosen_counts=counts[:B],
            rejected_counts=counts[B:], **self.loss_kwargs)
        weight = batch["weight"]
        loss = (losses * weight).sum() / weight.sum().clamp(min=1)  # mean over the untied pairs
        return loss, {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
                      "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
                      "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
                      "logps/chosen": chosen.detach().mean(), "logps/rejected": rejected.detach().mean(),
                      **self.rollout_metrics}
