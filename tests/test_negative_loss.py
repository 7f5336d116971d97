"""The pure losses of nanoalign.algos.npo (NPO, GA), nanoalign.algos.tdpo (TDPO1/2, sequential KL),
nanoalign.algos.dro (DRO-V) and nanoalign.algos.cringe (CRINGE): hand-derived gradients, the reductions (NPO -> GA
as beta -> 0, TDPO with alpha 0 -> DPO) and bad settings."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoalign.algos.cringe import cringe_loss, sample_positive_tokens
from nanoalign.algos.dpo import preference_loss
from nanoalign.algos.dro import dro_loss
from nanoalign.algos.npo import npo_loss
from nanoalign.algos.tdpo import tdpo_loss, token_level_terms

F64 = torch.float64
LOGP = st.floats(-60.0, -0.01, allow_nan=False, allow_infinity=False)  # summed log-probs


def vector(draw, n, elements=LOGP):
    return torch.tensor(draw(st.lists(elements, min_size=n, max_size=n)), dtype=F64)


# ----------------------------------------------------------------------------------------------- NPO

@settings(max_examples=50, deadline=None)
@given(data=st.data(), n=st.integers(1, 6), beta=st.floats(0.01, 3.0))
def test_npo_gradient_is_twice_sigmoid_of_beta_r_and_the_two_forms_of_eq_3_agree(data, n, beta):
    """L = -(2/beta) log s(-beta r): dL/dr = (2/beta) beta s(beta r) = 2 s(beta r) (d -log s(-z)/dz = s(z)), and
    dL/dlog pi = dL/dr, dL/dlog pi_ref = -dL/dr. Eq. 3's second form (2/beta) log(1 + (pi/pi_ref)^beta) is equal."""
    logps, ref = vector(data.draw, n).requires_grad_(), vector(data.draw, n).requires_grad_()
    losses, rewards = npo_loss(logps, ref, beta=beta)
    losses.sum().backward()
    r = (logps - ref).detach()
    torch.testing.assert_close(logps.grad, 2 * torch.sigmoid(beta * r), rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(ref.grad, -2 * torch.sigmoid(beta * r), rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(losses.detach(), (2 / beta) * torch.log1p(torch.exp(beta * r)), rtol=1e-9, atol=1e-12)
    assert (logps.grad > 0).all() and (logps.grad <= 2).all()  # descent lowers log pi(y), a push of at most 2
    torch.testing.assert_close(rewards, beta * r)


def test_npo_hand_computed_value():
    """log pi = -3, log pi_ref = -2: r = -1; beta 0.5: (2/0.5) log(1 + e^-0.5) = 4 * 0.474077 = 1.896308."""
    losses, rewards = npo_loss(torch.tensor([-3.0], dtype=F64), torch.tensor([-2.0], dtype=F64), beta=0.5)
    assert losses.item() == pytest.approx(1.896308, abs=1e-6) and rewards.item() == -0.5


def test_npo_reduces_to_gradient_ascent_as_beta_goes_to_zero():
    """Proposition 1: L_NPO - (2/beta) log 2 -> r (= L_GA - log pi_ref) and its gradient -> 1 (GA's) as beta -> 0;
    the "ga" loss type is that limit exactly, gradient 1 everywhere."""
    logps = torch.tensor([-5.0, -20.0, -1.0], dtype=F64, requires_grad=True)
    ref = torch.tensor([-4.0, -25.0, -1.0], dtype=F64)
    beta = 1e-6
    npo, _ = npo_loss(logps, ref, beta=beta)
    (grad,) = torch.autograd.grad(npo.sum(), logps)
    torch.testing.assert_close(npo - 2 / beta * math.log(2), logps - ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(grad, torch.ones(3, dtype=F64), rtol=0, atol=1e-5)
    ga, _ = npo_loss(logps, ref, beta=0.1, loss_type="ga")
    (ga_grad,) = torch.autograd.grad(ga.sum(), logps)
    assert torch.equal(ga.detach(), (logps - ref).detach()) and torch.equal(ga_grad, torch.ones(3, dtype=F64))


def test_npo_weight_fades_on_unlearned_answers_where_ga_does_not():
    """The push 2 s(beta r) on an answer already far below the reference (r = -100, beta 0.1) is 2 s(-10) ~ 9e-5;
    GA's stays 1: the brake that prevents GA's collapse."""
    logps = torch.tensor([-120.0], requires_grad=True)
    (grad,) = torch.autograd.grad(npo_loss(logps, torch.tensor([-20.0]), beta=0.1)[0].sum(), logps)
    assert grad.item() == pytest.approx(2 * torch.sigmoid(torch.tensor(-10.0)).item(), rel=1e-5) and grad < 1e-4


def test_npo_empty_forget_batch_and_bad_loss_type():
    losses, rewards = npo_loss(torch.zeros(0), torch.zeros(0))
    assert losses.shape == (0,) and rewards.shape == (0,)
    with pytest.raises(ValueError, match="unknown loss_type 'sigmoid'"):
        npo_loss(torch.zeros(1), torch.zeros(1), loss_type="sigmoid")


# ---------------------------------------------------------------------------------------------- TDPO

@st.composite
def tdpo_batches(draw):
    n = draw(st.integers(1, 5))
    kl = st.floats(0.0, 20.0)
    return dict(c=vector(draw, n, st.floats(-20, 20)), r=vector(draw, n, st.floats(-20, 20)),
                kw=vector(draw, n, kl), kl=vector(draw, n, kl), beta=draw(st.floats(0.01, 2.0)),
                alpha=draw(st.floats(0.0, 2.0)))


@settings(max_examples=50, deadline=None)
@given(b=tdpo_batches(), variant=st.sampled_from(["tdpo1", "tdpo2"]))
def test_tdpo_gradients_match_the_hand_derivation(b, variant):
    """z = beta (h - a (K_l - K_w)) with a = 1 (TDPO1) or alpha (TDPO2), L = -log s(z): dL/dc = -beta s(-z),
    dL/dr = beta s(-z), dL/dK_l = a beta s(-z), dL/dK_w = -a beta s(-z) for TDPO1 and 0 for TDPO2 (stop-gradient)."""
    c, r, kw, kl = (b[k].clone().requires_grad_() for k in ("c", "r", "kw", "kl"))
    losses, chosen_rewards, rejected_rewards = tdpo_loss(c, r, kw, kl, beta=b["beta"], alpha=b["alpha"],
                                                         variant=variant)
    losses.sum().backward()
    a = 1.0 if variant == "tdpo1" else b["alpha"]
    z = b["beta"] * ((b["c"] - b["r"]) - a * (b["kl"] - b["kw"]))
    w = b["beta"] * torch.sigmoid(-z)
    torch.testing.assert_close(losses.detach(), -F.logsigmoid(z), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(c.grad, -w, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(r.grad, w, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(kl.grad, a * w, rtol=1e-9, atol=1e-15)
    if variant == "tdpo1":
        torch.testing.assert_close(kw.grad, -w, rtol=1e-9, atol=1e-15)
    else:
        assert kw.grad is None  # the stop-gradient: no path from the loss to K_w
    torch.testing.assert_close(chosen_rewards, b["beta"] * b["c"])
    torch.testing.assert_close(rejected_rewards, b["beta"] * b["r"])


@settings(max_examples=50, deadline=None)
@given(b=tdpo_batches())
def test_tdpo2_with_alpha_zero_is_dpo(b):
    """alpha = 0 removes the sequential-KL term: TDPO2 == DPO's sigmoid loss (dpo.preference_loss) on the same
    log-ratios, values and gradients."""
    c, r = b["c"].clone().requires_grad_(), b["r"].clone().requires_grad_()
    ours, _, _ = tdpo_loss(c, r, b["kw"], b["kl"], beta=b["beta"], alpha=0.0, variant="tdpo2")
    (gc, gr) = torch.autograd.grad(ours.sum(), (c, r))
    c2, r2 = b["c"].clone().requires_grad_(), b["r"].clone().requires_grad_()
    zero = torch.zeros_like(c2)
    dpo, _, _ = preference_loss(c2, r2, zero, zero, beta=b["beta"])  # log-ratios against a zero reference
    (gc2, gr2) = torch.autograd.grad(dpo.sum(), (c2, r2))
    torch.testing.assert_close(ours, dpo, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((gc, gr), (gc2, gr2), rtol=1e-12, atol=1e-14)


def test_tdpo_hand_computed_value_and_bad_variant():
    """h = (-1) - (-3) = 2, K_w = 0.5, K_l = 1.5, beta 0.5, alpha 0.5:
    TDPO1 z = 0.5 (2 - 1) = 0.5 -> -log s(0.5) = 0.474077; TDPO2 z = 0.5 (2 - 0.5) = 0.75 -> 0.386871."""
    t = lambda v: torch.tensor([v], dtype=F64)
    one, _, _ = tdpo_loss(t(-1.0), t(-3.0), t(0.5), t(1.5), beta=0.5, variant="tdpo1")
    two, _, _ = tdpo_loss(t(-1.0), t(-3.0), t(0.5), t(1.5), beta=0.5, alpha=0.5)
    assert one.item() == pytest.approx(0.474077, abs=1e-6) and two.item() == pytest.approx(0.386871, abs=1e-6)
    with pytest.raises(ValueError, match="unknown tdpo_variant 'tdpo3'"):
        tdpo_loss(t(0), t(0), t(0), t(0), variant="tdpo3")


def test_sequential_kl_sums_forward_kl_at_completion_positions_with_the_softmax_gradient():
    """token_level_terms: D_SeqKL = sum over completion positions t of KL(p_ref,t || p_t) (computed by hand from
    the two softmaxes); it is 0 for equal logits; d/dz_t = softmax(z_t) - p_ref,t at those positions, 0 elsewhere;
    the log-ratio sum equals the sum of log p(y) - log p_ref(y) over the same tokens."""
    g = torch.Generator().manual_seed(0)
    B, T, V = 2, 6, 5
    logits = torch.randn(B, T, V, generator=g, dtype=F64, requires_grad=True)
    ref_logits = torch.randn(B, T, V, generator=g, dtype=F64)
    input_ids = torch.randint(0, V, (B, T), generator=g)
    loss_mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], dtype=F64)  # row 0: right padding
    ratios, seq_kl = token_level_terms(logits, ref_logits, input_ids, loss_mask)
    p, q = logits.detach().softmax(-1), ref_logits.softmax(-1)
    expected_kl, expected_ratio = torch.zeros(B, dtype=F64), torch.zeros(B, dtype=F64)
    for b in range(B):
        for t in range(T - 1):
            if loss_mask[b, t + 1]:
                expected_kl[b] += (q[b, t] * (q[b, t].log() - p[b, t].log())).sum()
                y = input_ids[b, t + 1]
                expected_ratio[b] += p[b, t, y].log() - q[b, t, y].log()
    torch.testing.assert_close(seq_kl.detach(), expected_kl)
    torch.testing.assert_close(ratios.detach(), expected_ratio)
    assert (seq_kl > 0).all()
    (grad,) = torch.autograd.grad(seq_kl.sum(), logits)
    positions = loss_mask[:, 1:, None]  # (B, T-1, 1): position t counts when token t+1 is a completion token
    torch.testing.assert_close(grad[:, :-1], (p[:, :-1] - q[:, :-1]) * positions)
    assert torch.equal(grad[:, -1], torch.zeros(B, V, dtype=F64))  # the last position predicts nothing
    _, zero = token_level_terms(ref_logits, ref_logits, input_ids, loss_mask)
    assert torch.allclose(zero, torch.zeros(B, dtype=F64), atol=1e-12)


# ----------------------------------------------------------------------------------------------- DRO

@settings(max_examples=50, deadline=None)
@given(data=st.data(), n=st.integers(1, 6), tau=st.floats(0.01, 5.0))
def test_dro_gradients_match_the_hand_derivation(data, n, tau):
    """L_pi = -(r - sg(V)) log pi + tau/2 L^2, L_V = 1/2 (r - V - tau sg(L))^2, L = log pi - log pi_ref:
    dL_pi/dlog pi = -(r - V) + tau L, dL_pi/dV = 0; dL_V/dV = V - r + tau L, dL_V/dlog pi = 0; the policy's
    gradient is the gradient of the DRO objective 1/2 (r - V - tau L)^2 divided by tau."""
    logps, ref = vector(data.draw, n).requires_grad_(), vector(data.draw, n)
    values = vector(data.draw, n, st.floats(-2, 2)).requires_grad_()
    rewards = vector(data.draw, n, st.sampled_from([0.0, 1.0]))
    policy_losses, value_losses, residuals = dro_loss(logps, ref, values, rewards, tau=tau)
    L, V = (logps - ref).detach(), values.detach()
    g_logps, g_values = torch.autograd.grad(policy_losses.sum(), (logps, values), allow_unused=True)
    torch.testing.assert_close(g_logps, -(rewards - V) + tau * L, rtol=1e-9, atol=1e-9)
    assert g_values is None  # sg(V) in the policy loss
    g_logps, g_values = torch.autograd.grad(value_losses.sum(), (logps, values), allow_unused=True)
    torch.testing.assert_close(g_values, V - rewards + tau * L, rtol=1e-9, atol=1e-9)
    assert g_logps is None  # sg(L) in the value loss
    torch.testing.assert_close(residuals, rewards - V - tau * L)
    objective = lambda lp: ((rewards - V - tau * (lp - ref)) ** 2 / 2).sum()
    (g_objective,) = torch.autograd.grad(objective(logps), logps)
    torch.testing.assert_close(g_objective / tau, -(rewards - V) + tau * L, rtol=1e-9, atol=1e-9)


def test_dro_optimum_is_a_fixed_point():
    """At r = V + tau L (the optimum's identity) both gradients vanish: r = 1, V = 0.4, tau 0.5, L = 1.2."""
    logps = torch.tensor([-3.8], dtype=F64, requires_grad=True)
    values = torch.tensor([0.4], dtype=F64, requires_grad=True)
    policy_losses, value_losses, residuals = dro_loss(logps, torch.tensor([-5.0], dtype=F64), values,
                                                      torch.tensor([1.0], dtype=F64), tau=0.5)
    (policy_losses + value_losses).sum().backward()
    assert abs(logps.grad.item()) < 1e-12 and abs(values.grad.item()) < 1e-12 and abs(residuals.item()) < 1e-12


# -------------------------------------------------------------------------------------------- CRINGE

@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 5), V=st.integers(3, 9))
def test_cringe_gradient_touches_only_the_two_logits(seed, n, V):
    """L = softplus(s- - s+): dL/ds+ = -s(d), dL/ds- = +s(d), d = s- - s+; every other logit gets 0."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, V, generator=g, dtype=F64, requires_grad=True)
    negatives = torch.randint(0, V, (n,), generator=g)
    positives = (negatives + torch.randint(1, V, (n,), generator=g)) % V  # a different token
    losses = cringe_loss(logits, positives, negatives)
    (grad,) = torch.autograd.grad(losses.sum(), logits)
    rows = torch.arange(n)
    d = (logits[rows, negatives] - logits[rows, positives]).detach()
    torch.testing.assert_close(losses.detach(), F.softplus(d))
    expected = torch.zeros(n, V, dtype=F64)
    expected[rows, positives] = -torch.sigmoid(d)
    expected[rows, negatives] = torch.sigmoid(d)
    torch.testing.assert_close(grad, expected)


def test_cringe_positive_tokens_come_from_the_top_k_without_the_negative_token():
    """Row 0: the negative token 2 is the argmax, so k=1 picks the runner-up 4; with k=2 only {4, 1} occur, in
    proportion softmax((3, 2)) = (0.731, 0.269). Hand value: s+ = 3, s- = 5 -> softplus(2) = 2.126928."""
    logits = torch.tensor([[0.0, 2.0, 5.0, -1.0, 3.0]]).repeat(4000, 1)
    negatives = torch.full((4000,), 2)
    assert (sample_positive_tokens(logits[:5], negatives[:5], k=1) == 4).all()
    drawn = sample_positive_tokens(logits, negatives, k=2, generator=torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {1, 4} and abs((drawn == 4).float().mean().item() - 0.731) < 0.03
    loss = cringe_loss(logits[:1], torch.tensor([4]), torch.tensor([2]))
    assert loss.item() == pytest.approx(2.126928, abs=1e-6)
