"""The one log-prob helper every algorithm uses: shift, gather, mask, sum and count of completion tokens."""
import torch
import torch.nn.functional as F


def token_logps(logits, targets):
    """log p(target) per position. logits (B, T, V), targets (B, T) -> (B, T) float32.
    cross_entropy fuses log-softmax and gather, so no separate (B, T, V) log-prob tensor is kept."""
    B, T, V = logits.shape
    return -F.cross_entropy(logits.reshape(B * T, V).float(), targets.reshape(B * T), reduction="none").view(B, T)


def batch_logps(model, input_ids, loss_mask, attention_mask=None, temperature=1.0):
    """Sum and count of completion-token log-probs per row; chosen and rejected rows go through in ONE forward.

    input_ids, loss_mask: (B, T), loss_mask[:, t] = 1 where token t is a completion token (EOS included).
    Returns logps (B,), counts (B,), token_logps (B, T-1) where token_logps[:, t] = log p(input_ids[:, t+1]),
    zero where masked. A fully masked row gives logps = 0 and counts = 0 (average with counts.clamp(min=1): no NaN).
    """
    logits = model(input_ids, attention_mask)[:, :-1]          # (B, T-1, V): position t predicts token t+1
    if temperature != 1.0:
        logits = logits / temperature                          # the sampling distribution of a rollout
    mask = loss_mask[:, 1:].float()                            # (B, T-1)
    per_token = token_logps(logits, input_ids[:, 1:]) * mask   # (B, T-1)
    return per_token.sum(-1), mask.sum(-1), per_token
