"""Property tests of nanoalign.algos.kto.kto_loss / check_labels and nanoalign.algos.orpo.orpo_loss."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from nanoalign.algos.kto import check_labels, kto_loss
from nanoalign.algos.orpo import log_odds, orpo_loss

F64 = torch.float64
LOGP = st.floats(-60.0, -0.01, allow_nan=False, allow_infinity=False)  # summed log-probs


def vectors(draw, size, elements=LOGP):
    return torch.tensor(draw(st.lists(elements, min_size=size, max_size=size)), dtype=F64)


@st.composite
def kto_batches(draw):
    """1-4 desirable, 1-4 undesirable and 2-6 mismatched (KL) examples, with hyperparameters."""
    n_d, n_u, m = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(2, 6))
    return dict(c=vectors(draw, n_d), r=vectors(draw, n_u), kl=vectors(draw, m), c0=vectors(draw, n_d),
                r0=vectors(draw, n_u), kl0=vectors(draw, m), beta=draw(st.floats(0.01, 3.0)),
                w_d=draw(st.floats(0.1, 3.0)), w_u=draw(st.floats(0.1, 3.0)))


def run_kto(b, c, r, kl):
    return kto_loss(c, r, kl, b["c0"], b["r0"], b["kl0"], beta=b["beta"], desirable_weight=b["w_d"],
                    undesirable_weight=b["w_u"])


# ----------------------------------------------------------------------------------------------- KTO

@settings(max_examples=50, deadline=None)
@given(b=kto_batches())
def test_kto_autograd_matches_analytic_gradient_and_signs(b):
    """dL/dlog pi(y_w) = -w_D beta s'(beta (r - z0)) < 0, dL/dlog pi(y_l) = +w_U beta s'(beta (z0 - r)) > 0
    (s' = s (1 - s)), and no gradient reaches the KL (mismatched-pair) log-probs."""
    c, r, kl = (b[k].clone().requires_grad_() for k in ("c", "r", "kl"))
    losses, _, _, z0 = run_kto(b, c, r, kl)
    losses.sum().backward()
    z0_expected = max(0.0, (b["kl"] - b["kl0"]).mean().item())
    assert z0.item() == pytest.approx(z0_expected, abs=1e-12)
    u = torch.sigmoid(b["beta"] * ((b["c"] - b["c0"]) - z0_expected))
    v = torch.sigmoid(b["beta"] * (z0_expected - (b["r"] - b["r0"])))
    torch.testing.assert_close(c.grad, -b["w_d"] * b["beta"] * u * (1 - u), rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(r.grad, b["w_u"] * b["beta"] * v * (1 - v), rtol=1e-9, atol=1e-15)
    assert (c.grad <= 0).all() and (r.grad >= 0).all()  # descent raises desirable, lowers undesirable log-ratios
    assert kl.grad is None  # z0 is detached


def test_kto_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    c, r, kl = (-10 * torch.rand(n, generator=g, dtype=F64) for n in (3, 2, 5))
    c0, r0, kl0 = (x + torch.randn(x.shape, generator=g, dtype=F64) for x in (c, r, kl))
    fn = lambda c, r: kto_loss(c, r, kl, c0, r0, kl0, beta=0.7, desirable_weight=1.3, undesirable_weight=0.8)[0]
    assert torch.autograd.gradcheck(fn, (c.requires_grad_(), r.requires_grad_()))


def test_kto_z0_is_clamped_at_zero_and_carries_no_gradient():
    """Mean KL log-ratio -1 -> z0 = 0; mean +1 -> z0 = 1; z0 never requires grad."""
    x = torch.tensor([-1.0])
    kl = torch.tensor([-4.0, -2.0], requires_grad=True)
    _, _, _, z0 = kto_loss(x, x, kl, x, x, torch.tensor([-2.0, -2.0]), beta=0.1)
    assert z0.item() == 0.0 and not z0.requires_grad
    _, _, _, z0 = kto_loss(x, x, kl, x, x, torch.tensor([-4.0, -4.0]), beta=0.1)
    assert z0.item() == pytest.approx(1.0) and not z0.requires_grad


@pytest.mark.parametrize("ref_kl,z0,expected", [([-2.0, -2.0], 0.0, [0.377541, 0.566311]),
                                                ([-6.0, -2.0], 1.0, [0.5, 0.403412])])
def test_kto_hand_computed_values(ref_kl, z0, expected):
    """Desirable: log pi = -1, log pi_ref = -2 -> r = +1. Undesirable: log pi = -3, log pi_ref = -2 -> r = -1.
    KL pairs: log pi = (-4, -2); beta .5, w_D 1, w_U 1.5.
    ref_kl (-2, -2): log-ratios (-2, 0), mean -1 -> z0 = max(0, -1) = 0.
       desirable 1 - s(.5 (1 - 0)) = 1 - .622459 = 0.377541; undesirable 1.5 (1 - s(.5 (0 + 1))) = 0.566311.
    ref_kl (-6, -2): log-ratios (2, 0), mean 1 -> z0 = 1.
       desirable 1 - s(.5 (1 - 1)) = 0.5; undesirable 1.5 (1 - s(.5 (1 + 1))) = 1.5 * .268941 = 0.403412.
    Rewards beta r = (.5, -.5) in both cases."""
    t = lambda *v: torch.tensor(v, dtype=F64)
    losses, chosen_rewards, rejected_rewards, kl = kto_loss(
        t(-1.0), t(-3.0), t(-4.0, -2.0), t(-2.0), t(-2.0), t(*ref_kl), beta=0.5, desirable_weight=1.0,
        undesirable_weight=1.5)
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert kl.item() == z0
    assert (chosen_rewards.item(), rejected_rewards.item()) == (0.5, -0.5)


def test_one_label_data_raises_a_clear_error_not_nan():
    assert check_labels([True, False, True]) == (2, 1)
    with pytest.raises(ValueError, match=r"micro-batch 3 has 4 desirable and 0 undesirable"):
        check_labels(torch.ones(4, dtype=torch.bool), where="micro-batch 3")
    with pytest.raises(ValueError, match=r"dataset has 0 desirable and 2 undesirable"):
        check_labels([0, 0])
    # the loss itself stays finite when one side of a batch is empty (only per-label means would be NaN)
    empty, x = torch.zeros(0), torch.tensor([-1.0, -2.0])
    losses, chosen_rewards, _, kl = kto_loss(x, empty, x, x + 1, empty, x - 1, beta=0.1)
    assert losses.shape == (2,) and torch.isfinite(losses).all() and torch.isfinite(kl)


# ---------------------------------------------------------------------------------------------- ORPO

@pytest.mark.parametrize("x", [-1e-8, -1e-12, 0.0])
def test_orpo_finite_as_average_logp_approaches_zero(x):
    """float32, as the trainer computes it: 1 - exp(-1e-8) rounds to 0 there, log1p(-exp(x)) is -inf."""
    chosen = torch.tensor([x, -2.0], requires_grad=True)
    rejected = torch.tensor([-1.5, x], requires_grad=True)
    nll = torch.tensor([0.5, 0.5], requires_grad=True)
    losses, or_term, ratio = orpo_loss(chosen, rejected, nll, lam=0.1)
    losses.sum().backward()
    for t in (losses, or_term, ratio, chosen.grad, rejected.grad, nll.grad):
        assert torch.isfinite(t).all()
    if x != 0.0:  # below the clamp the odds-ratio term still pushes: chosen up, rejected down
        assert chosen.grad[0] < 0 and rejected.grad[1] > 0


@settings(max_examples=50, deadline=None)
@given(c=st.floats(-20.0, -1e-3), r=st.floats(-20.0, -1e-3), nll=st.floats(0.0, 20.0), lam=st.floats(0.0, 2.0))
def test_orpo_equals_naive_formula_where_finite(c, r, nll, lam):
    """NLL - lam log s(log(p_w/(1-p_w)) - log(p_l/(1-p_l))), p = exp(avg logp), in plain float64."""
    t = lambda v: torch.tensor([v], dtype=F64)
    losses, or_term, ratio = orpo_loss(t(c), t(r), t(nll), lam=lam)
    p_w, p_l = math.exp(c), math.exp(r)
    naive_ratio = math.log(p_w / (1 - p_w)) - math.log(p_l / (1 - p_l))
    assert ratio.item() == pytest.approx(naive_ratio, rel=1e-9, abs=1e-9)
    assert losses.item() == pytest.approx(nll - lam * math.log(1 / (1 + math.exp(-naive_ratio))), rel=1e-9, abs=1e-9)


@settings(max_examples=50, deadline=None)
@given(c=st.lists(st.floats(-30.0, -1e-6), min_size=3, max_size=3),
       r=st.lists(st.floats(-30.0, -1e-6), min_size=3, max_size=3), lam=st.floats(0.0, 2.0))
def test_orpo_autograd_matches_analytic_gradient(c, r, lam):
    """With d log odds/dx = 1/(1 - e^x) and Delta the log odds ratio:
    dL/dx_w = -lam s(-Delta) / (1 - e^x_w), dL/dx_l = +lam s(-Delta) / (1 - e^x_l), dL/dnll = 1."""
    c, r = torch.tensor(c, dtype=F64, requires_grad=True), torch.tensor(r, dtype=F64, requires_grad=True)
    nll = torch.ones(3, dtype=F64, requires_grad=True)
    losses, _, ratio = orpo_loss(c, r, nll, lam=lam)
    losses.sum().backward()
    weight = lam * torch.sigmoid(-ratio.detach())
    torch.testing.assert_close(c.grad, -weight / -torch.expm1(c.detach()), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(r.grad, weight / -torch.expm1(r.detach()), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(nll.grad, torch.ones(3, dtype=F64))


def test_orpo_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    c, r = -3 * torch.rand(4, generator=g, dtype=F64) - 1e-3, -3 * torch.rand(4, generator=g, dtype=F64) - 1e-3
    nll = torch.rand(4, generator=g, dtype=F64)
    args = (c.requires_grad_(), r.requires_grad_(), nll.requires_grad_())
    assert torch.autograd.gradcheck(lambda c, r, nll: orpo_loss(c, r, nll, lam=0.3)[0], args)


def test_orpo_hand_computed_value():
    """avg log p(y_w) = log .5 -> odds 1, log odds 0; avg log p(y_l) = log .2 -> odds .25, log odds -log 4.
    Delta = log 4 = 1.386294; s(log 4) = 4/5, so L_OR = -log .8 = 0.223144.
    With nll = log 2 = 0.693147 and lam = .1: L = 0.693147 + 0.0223144 = 0.715461."""
    t = lambda v: torch.tensor([v], dtype=F64)
    losses, or_term, ratio = orpo_loss(t(math.log(0.5)), t(math.log(0.2)), t(math.log(2)), lam=0.1)
    assert ratio.item() == pytest.approx(1.386294, abs=1e-6)
    assert or_term.item() == pytest.approx(0.223144, abs=1e-6)
    assert losses.item() == pytest.approx(0.715461, abs=1e-6)
    assert log_odds(t(math.log(0.5))).item() == pytest.approx(0.0, abs=1e-12)
    assert F.logsigmoid(ratio).item() == pytest.approx(-0.223144, abs=1e-6)
