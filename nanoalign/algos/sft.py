"""Supervised fine-tuning and plain language-model training.

SFT (as in InstructGPT, Ouyang et al. 2022, step 1): maximise log pi(y | x) on demonstration pairs
{"prompt","completion"}: loss = -sum_t log pi(y_t | x, y_<t) / (number of completion tokens), with the prompt
masked out of the loss. Rows {"text"} have no prompt: every token is a target, which is plain language-model
pretraining (how the toy world's base model is made).
Departure / choice: the loss is the token mean over each micro-batch (TRL's default), not over the whole
accumulated batch, so long and short micro-batches weigh the same.
"""
from nanoalign.logps import batch_logps
from nanoalign.trainer import Algorithm


def sft_loss(logps, counts):
    """Token-mean negative log-likelihood: -sum(logps) / sum(counts). logps, counts: (B,)."""
    return -logps.sum() / counts.sum().clamp(min=1)


class SFT(Algorithm):
    name = "sft"
    data_format = "sft"
    key_metrics = ("nll_loss",)

    def __init__(self, cfg, policy, tokenizer, ctx):
        super().__init__(cfg, policy, tokenizer, ctx)
        self.examples, self.eval_examples = self.load_data("sft")

    def loss(self, model, batch):
        logps, counts, _ = batch_logps(model, batch["input_ids"], batch["loss_mask"], fused=self.cfg.fused_logps)
        loss = sft_loss(logps, counts)
        return loss, {"nll_loss": loss.detach(), "num_tokens": counts.sum()}

    def evaluate(self, model):
        if not self.eval_examples:
            return {}
        total, tokens = 0.0, 0.0
        n = self.ctx.micro_batch_size
        for i in range(0, min(len(self.eval_examples), n * self.cfg.eval_batches), n):
            batch = self.collate(self.eval_examples[i:i + n])
            logps, counts, _ = batch_logps(model, batch["input_ids"].to(self.ctx.device),
                                           batch["loss_mask"].to(self.ctx.device))
            total, tokens = total - float(logps.sum()), tokens + float(counts.sum())
        return {"eval/nll_loss": total / max(tokens, 1.0)}
