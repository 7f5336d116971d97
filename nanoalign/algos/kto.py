"""Kahneman-Tversky Optimization (KTO) as pure loss functions.

Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", arXiv:2402.01306.
KTO learns from unpaired binary feedback: each (x, y) is desirable (label True) or undesirable
(label False). With the implied reward r(x, y) = log pi(y|x) / pi_ref(y|x) and a reference point
z0 = KL(pi(y'|x) || pi_ref(y'|x)), the loss is (Eq. 8)

    L_KTO = E_{x,y}[ lambda_y - v(x, y) ],
    v(x, y) = lambda_D sigmoid(beta (r(x, y) - z0))   if y is desirable,
              lambda_U sigmoid(beta (z0 - r(x, y)))   if y is undesirable,

so a desirable example costs lambda_D (1 - s(beta (r - z0))) and an undesirable one
lambda_U (1 - s(beta (z0 - r))) (s = sigmoid). The paper estimates z0 from mismatched pairs: each
prompt x_i is paired with another example's completion y'_j, and
z0 = max(0, mean_j log pi(y'_j|x_i) / pi_ref(y'_j|x_i)), with no gradient through z0. The paper
advises lambda_D n_D / (lambda_U n_U) in [1, 4/3] (n_D, n_U: counts of each label).

Gradients (derived by hand; tests/test_kto_orpo_loss.py checks them against autograd), with
r the log-ratio of the example and s' = s(1 - s):
  desirable    dL/dlog pi(y|x) = -lambda_D beta s'(beta (r - z0))   < 0: descent raises r
  undesirable  dL/dlog pi(y|x) = +lambda_U beta s'(beta (z0 - r))   > 0: descent lowers r
  z0           dL/dkl_logps = 0 (detached, as in the paper and TRL)

This implementation differs from the paper in:
  - z0 is estimated on whatever mismatched pairs the caller passes (the adapter uses its own
    micro-batch), not across all ranks' micro-batches as TRL's gather does; with small micro-batches
    the estimate is noisier. Like the paper and TRL it is clamped at 0 and detached.
  - the data must hold both labels: `check_labels` raises a clear error instead of training on
    one-sided feedback (and instead of the NaN that a mean over an empty side gives).
"""
import torch


def kto_loss(chosen_logps, rejected_logps, kl_logps, ref_chosen_logps, ref_rejected_logps, ref_kl_logps, *,
             beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
    """KTO losses (N_D + N_U,), detached rewards (N_D,), (N_U,) and the detached scalar z0.

    chosen_logps: (N_D,) summed log pi(y|x) of desirable examples; rejected_logps: (N_U,) of
    undesirable ones; kl_logps: (M,) summed log pi(y'|x) of mismatched (prompt, completion) pairs;
    ref_*: the same three under pi_ref. Either of N_D, N_U may be 0.
    """
    kl = (kl_logps - ref_kl_logps).mean().clamp(min=0).detach()  # z0 = max(0, mean log pi/pi_ref (y'|x))
    chosen_logratios = chosen_logps - ref_chosen_logps  # r(x, y) for desirable y, (N_D,)
    rejected_logratios = rejected_logps - ref_rejected_logps  # r(x, y) for undesirable y, (N_U,)
    chosen_losses = 1 - torch.sigmoid(beta * (chosen_logratios - kl))  # 1 - s(beta (r - z0))
    rejected_losses = 1 - torch.sigmoid(beta * (kl - rejected_logratios))  # 1 - s(beta (z0 - r))
    losses = torch.cat([desirable_weight * chosen_losses, undesirable_weight * rejected_losses])
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach(), kl


def check_labels(labels, where="dataset"):
    """Return (n_desirable, n_undesirable) of boolean `labels`; raise ValueError if a label is missing.

    `where` names what the labels come from ("dataset", "micro-batch 3", ...) for the message.
    """
    labels = torch.as_tensor(labels).bool()
    n_desirable = int(labels.sum())
    n_undesirable = labels.numel() - n_desirable
    if n_desirable == 0 or n_undesirable == 0:
        raise ValueError(
            f"KTO needs both desirable (label true) and undesirable (label false) examples, but the "
            f"{where} has {n_desirable} desirable and {n_undesirable} undesirable; with one label the "
            f"loss has nothing to contrast against (and its per-label metrics would be NaN)")
    return n_desirable, n_undesirable


# --- Algorithm adapter (phase 2): batch -> log-probs (incl. mismatched KL pairs) -> kto_loss ---
