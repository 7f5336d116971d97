"""What the listwise algorithms (PRO, RRHF, LiPO: algos/pro.py, rrhf.py, lipo.py) share: the data and one forward.

A listwise example is one prompt with k >= 2 completions and a score each (data.py's "listwise" format; higher is
better, ties allowed). A micro-batch of B lists is collated into N = sum_b k_b rows that go through ONE forward
(batch_logps), then back into (B, K) slots: `valid[b, j]` says slot j of list b holds a completion (lists may have
different k; K is the largest). Every loss is then written on (B, K) tensors, with the order given by the scores
through `better_pairs`, so no loss depends on the order the completions were listed in.

Ties: `better_pairs[b, i, j]` is True only when s_i > s_j strictly, so tied completions are never compared with
each other; "the best" of a list (the answer the SFT terms of PRO and RRHF train on) is every completion with the
top score, averaged as one token-mean NLL.
"""

from nanoalign.algos.sft import sft_loss
from nanoalign.logps import batch_logps
from nanoalign.trainer import Algorithm


def to_slots(values, valid):
    """(N,) per-row values -> (B, K), row n in the n-th True slot of `valid` (row-major), 0 in the empty slots."""
    return values.new_zeros(valid.shape).index_put((valid,), values)


def better_pairs(scores, valid):
    """(B, K, K) bool: [b, i, j] = completion i of list b has a strictly higher score than completion j, both real."""
    pairs = scores[:, :, None] > scores[:, None, :]  # (B, K, K): s_i > s_j
    return pairs & valid[:, :, None] & valid[:, None, :]


def best_slots(scores, valid):
    """(B, K) bool: the completions with the top score of their list (every one of them when the top ties)."""
    top = scores.masked_fill(~valid, float("-inf")).amax(-1, keepdim=True)  # (B, 1)
    return valid & (scores == top)


def worst_slots(scores, valid):
    """(B, K) bool: the completions with the lowest score of their list."""
    low = scores.masked_fill(~valid, float("inf")).amin(-1, keepdim=True)  # (B, 1)
    return valid & (scores == low)


def ranking_metrics(rewards, logps, scores, valid):
    """TRL-style metrics of a listwise batch: over all ordered pairs (i better than j), the fraction the implicit
    reward orders the same way and the mean reward margin; mean reward and summed log-prob of the best and worst."""
    better = better_pairs(scores, valid)  # (B, K, K)
    margins = (rewards[:, :, None] - rewards[:, None, :])[better]  # (P,) r_i - r_j over the better pairs
    best, worst = best_slots(scores, valid), worst_slots(scores, valid)
    return {"rewards/accuracies": (margins > 0).float().mean(), "rewards/margins": margins.mean(),
            "rewards/best": rewards[best].mean(), "rewards/worst": rewards[worst].mean(),
            "logps/best": logps[best].mean(), "logps/worst": logps[worst].mean()}


class ListwiseAlgorithm(Algorithm):
    """An offline algorithm on listwise data: self.examples are tokenised lists; `list_logps` runs the policy."""
    data_format = "listwise"
    key_metrics = ("rewards/accuracies", "rewards/margins")

    def __init__(self, cfg, policy, tokenizer, ctx):
        super().__init__(cfg, policy, tokenizer, ctx)
        self.examples, self.eval_examples = self.load_data("listwise")
        sizes = [len(e["scores"]) for e in self.examples]
        self.log(f"{cfg.algo}: {len(sizes)} lists of {min(sizes)}-{max(sizes)} completions "
                 f"({sum(sizes) / len(sizes):.2f} on average)")

    def list_logps(self, model, batch):
        """Summed log pi(y|x) and completion lengths of every completion, as (B, K) slots (0 where not valid)."""
        logps, counts, _ = batch_logps(model, batch["input_ids"], batch["loss_mask"],  # one forward, (N,)
                                       fused=self.cfg.fused_logps)
        return to_slots(logps, batch["valid"]), to_slots(counts, batch["valid"])  # (B, K), (B, K)

    def ranking_plus_sft(self, model, batch, ranking_loss, *, rank_weight=1.0, sft_weight=1.0):
        """The objective PRO and RRHF share: rank_weight * ranking_loss(r, scores, valid) averaged over the lists, on
        the length-normalised log-likelihoods r = log pi(y|x) / |y|, plus sft_weight * the token-mean NLL of the best
        completion(s) of each list (algos/sft.py). Returns (loss, metrics)."""
        logps, counts = self.list_logps(model, batch)  # (B, K) summed log pi, lengths
        scores, valid = batch["scores"], batch["valid"]
        avg = logps / counts.clamp(min=1)  # r(x, y): length-normalised log-likelihood, (B, K)
        ranking = ranking_loss(avg, scores, valid).mean()
        best = best_slots(scores, valid)  # (B, K)
        nll = sft_loss(logps[best], counts[best])  # token-mean NLL of the best completion(s)
        loss = rank_weight * ranking + sft_weight * nll
        return loss, {"ranking_loss": ranking.detach(), "nll_loss": nll.detach(),
                      **ranking_metrics(avg.detach(), logps.detach(), scores, valid)}
