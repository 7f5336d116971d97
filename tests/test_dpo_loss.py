"""Property tests of nanoalign.algos.dpo.preference_loss: gradients, implicit reward, optima, hand values."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from nanoalign.algos.dpo import LOSS_TYPES, preference_loss

F64 = torch.float64


def analytic_grads(loss_type, c, r, c0, r0, n_w, n_l, beta, eps=0.0, alpha=0.0, lam=0.0, gamma=0.0):
    """(dL/dc, dL/dr) as derived by hand in the dpo.py docstring; c, r summed log-probs, (B,)."""
    s = torch.sigmoid
    if loss_type in ("simpo", "cpo"):  # reference-free
        c0, r0 = torch.zeros_like(c), torch.zeros_like(r)
    if loss_type in ("ipo", "simpo"):  # per-token log-ratios
        h = (c - c0) / n_w - (r - r0) / n_l
    else:
        h = (c - c0) - (r - r0)
    if loss_type == "sigmoid":
        dh = -beta * ((1 - eps) * s(-beta * h) - eps * s(beta * h))
    elif loss_type == "robust":
        dh = -beta * ((1 - eps) * s(-beta * h) + eps * s(beta * h)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        dh = -beta * (1 - beta * h > 0).to(h.dtype)
    elif loss_type == "rdpo":
        dh = -beta * s(-(beta * h + alpha * (n_w - n_l)))
    elif loss_type == "cpo":
        dh = -beta * s(-beta * h)
    elif loss_type == "ipo":
        dh = 2 * (h - 1 / (2 * beta))
        return dh / n_w, -dh / n_l
    elif loss_type == "simpo":
        dh = -beta * s(-(beta * h - gamma))
        return dh / n_w, -dh / n_l
    else:  # dpop: the penalty lambda * max(0, c0 - c) also depends on c
        weight = beta * s(-beta * (h - lam * torch.relu(c0 - c)))
        return -weight * (1 + lam * (c < c0).to(h.dtype)), weight
    return dh, -dh


@st.composite
def preference_batches(draw):
    """A batch of 1-4 pairs: summed log-probs in [-60, 0), lengths 1..30, and hyperparameters."""
    size = draw(st.integers(1, 4))
    logp = st.floats(-60.0, -0.01, allow_nan=False, allow_infinity=False)

    def vector(elements, dtype):
        return torch.tensor(draw(st.lists(elements, min_size=size, max_size=size)), dtype=dtype)

    return dict(c=vector(logp, F64), r=vector(logp, F64), c0=vector(logp, F64), r0=vector(logp, F64),
                n_w=vector(st.integers(1, 30), torch.long), n_l=vector(st.integers(1, 30), torch.long),
                beta=draw(st.floats(0.01, 3.0)), eps=draw(st.floats(0.0, 0.45)), alpha=draw(st.floats(0.0, 1.0)),
                lam=draw(st.floats(0.0, 100.0)), gamma=draw(st.floats(0.0, 2.0)))


def run_loss(loss_type, b, c, r):
    eps = b["eps"] if loss_type in ("sigmoid", "robust") else 0.0
    return preference_loss(c, r, b["c0"], b["r0"], loss_type=loss_type, beta=b["beta"], label_smoothing=eps,
                           chosen_counts=b["n_w"], rejected_counts=b["n_l"], rdpo_alpha=b["alpha"],
                           dpop_lambda=b["lam"], simpo_gamma=b["gamma"])


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@settings(max_examples=50, deadline=None)
@given(b=preference_batches())
def test_autograd_matches_analytic_gradient(loss_type, b):
    """Autograd's dL/dc, dL/dr equal the hand-derived gradients of the docstring, pair by pair."""
    c, r = b["c"].clone().requires_grad_(), b["r"].clone().requires_grad_()
    losses, _, _ = run_loss(loss_type, b, c, r)
    losses.sum().backward()
    eps = b["eps"] if loss_type in ("sigmoid", "robust") else 0.0
    dc, dr = analytic_grads(loss_type, b["c"], b["r"], b["c0"], b["r0"], b["n_w"], b["n_l"], b["beta"],
                            eps, b["alpha"], b["lam"], b["gamma"])
    torch.testing.assert_close(c.grad, dc, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(r.grad, dr, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradcheck_float64(loss_type):
    """Finite differences agree with autograd for every loss type (inputs away from hinge/DPOP kinks)."""
    g = torch.Generator().manual_seed(0)
    c0, r0 = -20 * torch.rand(6, generator=g, dtype=F64), -20 * torch.rand(6, generator=g, dtype=F64)
    c = (c0 + torch.tensor([-2.0, -1.0, -0.5, 0.5, 1.0, 2.0], dtype=F64)).requires_grad_()  # both DPOP branches
    r = (r0 + 3 * torch.randn(6, generator=g, dtype=F64)).requires_grad_()
    n_w, n_l = torch.randint(1, 20, (6,), generator=g), torch.randint(1, 20, (6,), generator=g)
    kwargs = dict(loss_type=loss_type, beta=0.3, chosen_counts=n_w, rejected_counts=n_l, rdpo_alpha=0.05,
                  dpop_lambda=5.0, simpo_gamma=0.7, label_smoothing=0.2 if loss_type in ("sigmoid", "robust") else 0.0)
    if loss_type == "hinge":  # keep every pair off the kink beta * h = 1
        h = (c - c0) - (r - r0)
        assert ((0.3 * h - 1).abs() > 1e-3).all()
    assert torch.autograd.gradcheck(lambda c, r: preference_loss(c, r, c0, r0, **kwargs)[0], (c, r))


def test_dpo_is_bradley_terry_loss_of_implicit_reward():
    """DPO loss == -log sigmoid(r_w - r_l) with r = beta log pi/pi_ref, and the returned rewards are r."""
    g = torch.Generator().manual_seed(1)
    c, r, c0, r0 = (-30 * torch.rand(64, generator=g, dtype=F64) for _ in range(4))
    beta = 0.2
    losses, chosen_rewards, rejected_rewards = preference_loss(c, r, c0, r0, beta=beta)
    implicit_w, implicit_l = beta * (c - c0), beta * (r - r0)
    torch.testing.assert_close(chosen_rewards, implicit_w)
    torch.testing.assert_close(rejected_rewards, implicit_l)
    torch.testing.assert_close(losses, -F.logsigmoid(implicit_w - implicit_l))


def expected_bandit_loss(theta, ref_logp, true_reward, beta, loss_type="sigmoid"):
    """Exact expected pair loss on a one-prompt bandit: all ordered pairs (i, j), i != j, weighted by
    the Bradley-Terry probability sigmoid(r*_i - r*_j) that y_i is the chosen one; each unordered
    pair has total weight 1 (pairs drawn uniformly)."""
    K = theta.numel()
    i, j = (idx.flatten() for idx in torch.meshgrid(torch.arange(K), torch.arange(K), indexing="ij"))
    i, j = i[i != j], j[i != j]
    logp = torch.log_softmax(theta, dim=-1)  # log pi(y), (K,)
    ones = torch.ones_like(i)  # one "token" per response, so per-token and summed log-probs agree
    losses, _, _ = preference_loss(logp[i], logp[j], ref_logp[i], ref_logp[j], loss_type=loss_type, beta=beta,
                                   chosen_counts=ones, rejected_counts=ones)
    p_i_wins = torch.sigmoid(true_reward[i] - true_reward[j])  # BT preference probability, (K(K-1),)
    return (p_i_wins * losses).sum() / (K * (K - 1) / 2)


def minimise(loss_fn, theta0):
    theta = theta0.clone().requires_grad_()
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn(theta)
        loss.backward()
        return loss
    opt.step(closure)
    return theta.detach()


@pytest.mark.parametrize("K", [4, 5, 6])
def test_dpo_optimum_on_tabular_bandit_is_kl_regularised_optimum(K):
    """Minimising the exact expected DPO loss drives pi to pi* = pi_ref exp(r*/beta) / Z.

    The loss is logistic in h_ij = (theta_i - theta_j) - (log pi_ref_i - log pi_ref_j), which is linear
    in theta, so LBFGS in float64 converges; the tolerance 1e-6 on probabilities is far above what it
    reaches and far below any error in the claimed optimum."""
    g = torch.Generator().manual_seed(K)
    beta = 0.5
    ref_logp = torch.log_softmax(torch.randn(K, generator=g, dtype=F64), dim=-1)
    true_reward = torch.randn(K, generator=g, dtype=F64)
    theta = minimise(lambda t: expected_bandit_loss(t, ref_logp, true_reward, beta), ref_logp)
    pi_star = torch.softmax(ref_logp + true_reward / beta, dim=-1)
    assert (torch.softmax(theta, -1) - pi_star).abs().max() < 1e-6


def test_per_prompt_reward_shift_changes_neither_loss_nor_optimum():
    """r* -> r* + c(x) leaves the BT probabilities, hence the expected loss and its optimum, unchanged;
    the learned implicit reward beta log pi/pi_ref equals r* only up to that per-prompt constant."""
    g = torch.Generator().manual_seed(7)
    K, beta = 5, 0.5
    ref_logp = torch.log_softmax(torch.randn(K, generator=g, dtype=F64), dim=-1)
    true_reward = torch.randn(K, generator=g, dtype=F64)
    for _ in range(5):
        theta = torch.randn(K, generator=g, dtype=F64)
        torch.testing.assert_close(expected_bandit_loss(theta, ref_logp, true_reward, beta),
                                   expected_bandit_loss(theta, ref_logp, true_reward + 3.7, beta), rtol=1e-12, atol=0)
    optimum = minimise(lambda t: expected_bandit_loss(t, ref_logp, true_reward, beta), ref_logp)
    optimum_shifted = minimise(lambda t: expected_bandit_loss(t, ref_logp, true_reward - 11.0, beta), ref_logp)
    torch.testing.assert_close(torch.softmax(optimum, -1), torch.softmax(optimum_shifted, -1), rtol=0, atol=1e-9)
    implicit_reward = beta * (torch.log_softmax(optimum, -1) - ref_logp)
    offset = implicit_reward - true_reward  # = -beta log Z(x): the same for every response
    assert offset.max() - offset.min() < 1e-6


@pytest.mark.parametrize("loss_type,label_smoothing",
                         [("sigmoid", 0.0), ("sigmoid", 0.2), ("robust", 0.0), ("robust", 0.2), ("rdpo", 0.0),
                          ("dpop", 0.0)])
def test_loss_is_log2_when_policy_equals_reference(loss_type, label_smoothing):
    """h = 0 gives -log sigmoid(0) = log 2; with smoothing eps: (1-eps) log 2 + eps log 2 = log 2, and for
    robust ((1-eps) - eps) log 2 / (1 - 2 eps) = log 2. Equal lengths make the R-DPO term 0."""
    logps = -torch.rand(2, 8, dtype=F64) * 40
    counts = torch.full((8,), 7)
    losses, chosen_rewards, rejected_rewards = preference_loss(
        logps[0], logps[1], logps[0].clone(), logps[1].clone(), loss_type=loss_type, beta=0.1,
        label_smoothing=label_smoothing, chosen_counts=counts, rejected_counts=counts, rdpo_alpha=0.3)
    torch.testing.assert_close(losses, torch.full_like(losses, math.log(2)))
    assert (chosen_rewards == 0).all() and (rejected_rewards == 0).all()


def test_ipo_margin_converges_under_deterministic_preferences_where_dpo_diverges():
    """Two responses, y_0 always preferred (P = 1). DPO's loss -log s(beta h) has no minimiser: the
    margin h keeps growing (about 2/beta * log 2 per doubling of steps). IPO's (h - 1/(2 beta))^2 stops
    at h = 1/(2 beta) = 1 for beta = 0.5. Plain SGD, lr 0.1, from theta = log pi_ref."""
    beta, lr = 0.5, 0.1
    ref_logp = torch.log(torch.tensor([0.7, 0.3], dtype=F64))
    one = torch.ones(1, dtype=torch.long)

    def margins_after(loss_type, checkpoints):
        theta = ref_logp.clone().requires_grad_()
        opt, margins = torch.optim.SGD([theta], lr=lr), []
        for step in range(1, checkpoints[-1] + 1):
            logp = torch.log_softmax(theta, -1)
            loss, _, _ = preference_loss(logp[:1], logp[1:], ref_logp[:1], ref_logp[1:], loss_type=loss_type,
                                         beta=beta, chosen_counts=one, rejected_counts=one)
            opt.zero_grad()
            loss.sum().backward()
            opt.step()
            if step in checkpoints:
                logratio = (torch.log_softmax(theta, -1) - ref_logp).detach()
                margins.append((logratio[0] - logratio[1]).item())
        return margins

    checkpoints = [250, 500, 1000, 2000, 4000]
    dpo, ipo = margins_after("sigmoid", checkpoints), margins_after("ipo", checkpoints)
    assert all(later - earlier > 1.0 for earlier, later in zip(dpo, dpo[1:])), dpo
    assert dpo[-1] > 10 / (2 * beta)
    assert all(abs(m - 1 / (2 * beta)) < 1e-9 for m in ipo), ipo


HAND_INPUT = dict(c=-1.0, r=-3.0, c0=-2.0, r0=-2.0, n_w=2, n_l=4)
HAND_CASES = [  # (loss_type, kwargs, expected loss, expected chosen reward, expected rejected reward)
    ("sigmoid", dict(beta=0.5), 0.313262, 0.5, -0.5),
    ("sigmoid", dict(beta=0.5, label_smoothing=0.1), 0.413262, 0.5, -0.5),
    ("robust", dict(beta=0.5, label_smoothing=0.1), 0.188262, 0.5, -0.5),
    ("ipo", dict(beta=0.5), 0.0625, 0.25, -0.125),
    ("hinge", dict(beta=0.25), 0.5, 0.25, -0.25),
    ("hinge", dict(beta=1.0), 0.0, 1.0, -1.0),
    ("rdpo", dict(beta=0.5, rdpo_alpha=0.1), 0.371101, 0.5, -0.5),
    ("dpop", dict(beta=0.5, dpop_lambda=1.0), 0.313262, 0.5, -0.5),
    ("simpo", dict(beta=2.0, simpo_gamma=0.5), 0.693147, -1.0, -1.5),
    ("cpo", dict(beta=0.5), 0.313262, -0.5, -1.5),
]


@pytest.mark.parametrize("loss_type,kwargs,expected,chosen_reward,rejected_reward", HAND_CASES)
def test_hand_computed_values(loss_type, kwargs, expected, chosen_reward, rejected_reward):
    """One pair: log pi(y_w) = -1, log pi(y_l) = -3, log pi_ref(y_w) = log pi_ref(y_l) = -2, |y_w| = 2, |y_l| = 4.
    Summed log-ratios: +1 and -1, so h = 2. Let a = log(1 + e^-1) = 0.313262 (= -log s(1)).
    sigmoid beta .5:          beta h = 1, L = a = 0.313262; rewards beta*(+1, -1) = (.5, -.5).
    cDPO eps .1:              .9 a + .1 log(1 + e) = .9 a + .1 (a + 1) = a + .1 = 0.413262.
    robust eps .1:            (.9 a - .1 (a + 1)) / .8 = (.8 a - .1) / .8 = a - .125 = 0.188262.
    ipo beta .5:              per-token ratios +1/2 = .5 and -1/4 = -.25, h = .75; (.75 - 1/(2*.5))^2 = .0625;
                              rewards .5 * (.5, -.25) = (.25, -.125).
    hinge beta .25:           max(0, 1 - .25 * 2) = .5.   hinge beta 1: max(0, 1 - 2) = 0.
    rdpo beta .5 alpha .1:    z = 1 + .1 (2 - 4) = .8, L = log(1 + e^-.8) = log 1.449329 = 0.371101.
    dpop lambda 1:            log pi(y_w) = -1 > -2 = log pi_ref(y_w): no penalty, L = a.
    simpo beta 2 gamma .5:    averages -1/2 and -3/4; z = 2 (-.5 + .75) - .5 = 0, L = log 2 = 0.693147;
                              rewards 2 * (-.5, -.75) = (-1, -1.5).
    cpo beta .5:              z = .5 (-1 + 3) = 1, L = a; rewards .5 * (-1, -3) = (-.5, -1.5)."""
    x = {k: torch.tensor([v], dtype=F64) for k, v in HAND_INPUT.items()}
    losses, chosen, rejected = preference_loss(x["c"], x["r"], x["c0"], x["r0"], loss_type=loss_type,
                                               chosen_counts=x["n_w"], rejected_counts=x["n_l"], **kwargs)
    assert losses.item() == pytest.approx(expected, abs=1e-6)
    assert (chosen.item(), rejected.item()) == pytest.approx((chosen_reward, rejected_reward), abs=1e-12)


def test_dpop_hand_computed_value_with_penalty():
    """log pi(y_w) = -2.5, log pi_ref(y_w) = -2, log pi(y_l) = -4, log pi_ref(y_l) = -2, beta .5, lambda 1:
    ratios -.5 and -2, h = 1.5; penalty max(0, -2 - (-2.5)) = .5; z = .5 (1.5 - 1 * .5) = .5;
    L = log(1 + e^-.5) = log 1.606531 = 0.474077 (plain DPO would give log(1 + e^-.75) = 0.386871)."""
    t = lambda v: torch.tensor([v], dtype=F64)
    losses, _, _ = preference_loss(t(-2.5), t(-4.0), t(-2.0), t(-2.0), loss_type="dpop", beta=0.5, dpop_lambda=1.0)
    assert losses.item() == pytest.approx(0.474077, abs=1e-6)


def test_rewards_are_detached_and_bad_arguments_are_rejected():
    c = torch.tensor([-1.0], requires_grad=True)
    ref = torch.tensor([-2.0])
    _, chosen_rewards, rejected_rewards = preference_loss(c, c, ref, ref)
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
    with pytest.raises(ValueError, match="unknown loss_type"):
        preference_loss(c, c, ref, ref, loss_type="dpo")
    with pytest.raises(ValueError, match="needs chosen_counts"):
        preference_loss(c, c, ref, ref, loss_type="ipo")
    with pytest.raises(ValueError, match="reference log-probs"):
        preference_loss(c, c, loss_type="sigmoid")
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss(c, c, ref, ref, loss_type="hinge", label_smoothing=0.1)
