"""The listwise losses (algos/pro.py, rrhf.py, lipo.py): hand-derived gradients, hand-computed values, invariance
to the order the completions are listed in, ties, and the reductions for two completions to known pairwise losses."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from nanoalign.algos.dpo import preference_loss
from nanoalign.algos.lipo import lambda_weights, lipo_loss
from nanoalign.algos.listwise import best_slots, better_pairs, to_slots
from nanoalign.algos.pro import pro_loss
from nanoalign.algos.rrhf import rrhf_loss

F64 = torch.float64
AVG = st.floats(-6.0, -0.05, allow_nan=False)  # per-token average log-probs
SUM = st.floats(-40.0, -0.5, allow_nan=False)  # summed log-probs
SCORE = st.sampled_from([0.0, 0.25, 0.5, 1.0, 1.5, 2.0])  # a few values, so ties occur


@st.composite
def lists(draw, elements=AVG):
    """1-3 lists of 2-4 completions, padded to K = 4 slots: (values, scores, valid), float64."""
    B = draw(st.integers(1, 3))
    sizes = [draw(st.integers(2, 4)) for _ in range(B)]
    values, scores = torch.zeros(B, 4, dtype=F64), torch.zeros(B, 4, dtype=F64)
    valid = torch.zeros(B, 4, dtype=torch.bool)
    for b, k in enumerate(sizes):
        values[b, :k] = torch.tensor(draw(st.lists(elements, min_size=k, max_size=k)), dtype=F64)
        scores[b, :k] = torch.tensor(draw(st.lists(SCORE, min_size=k, max_size=k)), dtype=F64)
        valid[b, :k] = True
    return values, scores, valid


def permute(tensors, valid, draw_perm):
    """The same lists with each list's real completions in another order (empty slots stay last)."""
    out = [t.clone() for t in tensors]
    for b in range(valid.shape[0]):
        k = int(valid[b].sum())
        order = torch.tensor(draw_perm(k))
        for t, o in zip(out, tensors):
            t[b, :k] = o[b, order]
    return out


def permutations(draw):
    return lambda k: draw(st.permutations(list(range(k))))


# ------------------------------------------------------------------------------------------------- helpers
def test_better_pairs_best_slots_and_to_slots():
    scores = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 1.0, 0.0, 0.0]])
    valid = torch.tensor([[True, True, True, True], [True, True, False, False]])
    better = better_pairs(scores, valid)
    assert better[0].nonzero().tolist() == [[0, 3], [1, 0], [1, 3], [2, 0], [2, 3]]  # the tie (1, 2) is no pair
    assert better[1].nonzero().tolist() == [[0, 1]]  # empty slots are in no pair
    assert best_slots(scores, valid).tolist() == [[False, True, True, False], [True, False, False, False]]
    assert to_slots(torch.arange(1.0, 7.0), valid).tolist() == [[1, 2, 3, 4], [5, 6, 0, 0]]


# ------------------------------------------------------------------------------------------------------ PRO
def pro_by_hand(avg, scores, k):
    """sum over completions m with a worse one of -log (e^{p_m} / (e^{p_m} + sum_{s_j < s_m} e^{p_j}))."""
    total = 0.0
    for m in range(k):
        worse = [j for j in range(k) if scores[j] < scores[m]]
        if worse:
            total += math.log(math.exp(avg[m]) + sum(math.exp(avg[j]) for j in worse)) - avg[m]
    return total


def test_pro_hand_computed_value_without_ties():
    """Ranked y1 > y2 > y3 with r = (-1, -2, -3): term 1 = log(e^-1 + e^-2 + e^-3) + 1 = 0.407606,
    term 2 = log(e^-2 + e^-3) + 2 = 0.313262; the list as given in the order (y3, y1, y2) gives the same."""
    avg, scores = torch.tensor([[-3.0, -1.0, -2.0]], dtype=F64), torch.tensor([[0.0, 2.0, 1.0]], dtype=F64)
    loss = pro_loss(avg, scores, torch.ones(1, 3, dtype=torch.bool))
    assert loss.item() == pytest.approx(0.407606 + 0.313262, abs=1e-6)


@settings(max_examples=60, deadline=None)
@given(batch=lists())
def test_pro_gradient_matches_the_hand_derivation(batch):
    """dL/dr_j = sum_{terms m containing j} q_m(j) - [j has a term of its own] (q_m = term m's softmax)."""
    avg, scores, valid = batch
    avg = avg.clone().requires_grad_()
    losses = pro_loss(avg, scores, valid)
    losses.sum().backward()
    expected = torch.zeros_like(avg)
    for b in range(avg.shape[0]):
        k = int(valid[b].sum())
        a, s = avg[b, :k].tolist(), scores[b, :k].tolist()
        assert losses[b].item() == pytest.approx(pro_by_hand(a, s, k), rel=1e-9, abs=1e-12)
        for m in range(k):
            members = [m] + [j for j in range(k) if s[j] < s[m]]
            if len(members) == 1:
                continue
            norm = sum(math.exp(a[j]) for j in members)
            for j in members:
                expected[b, j] += math.exp(a[j]) / norm - (j == m)
    torch.testing.assert_close(avg.grad, expected, rtol=1e-9, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_pro_and_rrhf_do_not_depend_on_list_order_or_score_scale(data):
    """The same completions listed in another order give the same loss; so does any increasing map of the scores
    (PRO without temperature and RRHF use the order only)."""
    avg, scores, valid = data.draw(lists())
    p_avg, p_scores = permute([avg, scores], valid, permutations(data.draw))
    for loss in (pro_loss, rrhf_loss):
        torch.testing.assert_close(loss(p_avg, p_scores, valid), loss(avg, scores, valid), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(loss(avg, 3 * scores ** 3 - 7, valid), loss(avg, scores, valid), rtol=0, atol=0)


@settings(max_examples=40, deadline=None)
@given(c=AVG, r=AVG)
def test_pro_with_two_completions_is_the_bradley_terry_loss_on_average_logps(c, r):
    """k = 2, no SFT term: -log sigmoid(r_w - r_l), i.e. SimPO with beta 1 and gamma 0 (DPO without a reference on
    length-normalised log-probs). Both orders of the pair give it."""
    avg = torch.tensor([[c, r], [r, c]], dtype=F64)
    scores = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64)
    one = torch.ones(1, dtype=F64)
    expected, _, _ = preference_loss(torch.tensor([c], dtype=F64), torch.tensor([r], dtype=F64), loss_type="simpo",
                                     beta=1.0, simpo_gamma=0.0, chosen_counts=one, rejected_counts=one)
    torch.testing.assert_close(pro_loss(avg, scores, torch.ones(2, 2, dtype=torch.bool)), expected.expand(2))


def test_pro_ties_and_a_fully_tied_list():
    """Scores (1, 1, 0): two terms, each tied best against the worst alone; scores all equal: no term at all."""
    avg = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -2.0, -3.0]], dtype=F64)
    scores = torch.tensor([[1.0, 1.0, 0.0], [5.0, 5.0, 5.0]], dtype=F64)
    losses = pro_loss(avg, scores, torch.ones(2, 3, dtype=torch.bool))
    by_hand = -math.log(1 / (1 + math.exp(-2))) - math.log(1 / (1 + math.exp(-1)))  # -log s(-1+3) - log s(-2+3)
    assert losses.tolist() == pytest.approx([by_hand, 0.0], abs=1e-12)


def test_pro_reward_difference_temperature():
    """Scores (1.0, 0.5, 0.0), r = (-1, -2, -3). Term 1: logits y1: -1 * max(0.5, 1.0) = -1, y2: -2 * 0.5 = -1,
    y3: -3 * 1.0 = -3 -> log(2 e^-1 + e^-3) + 1. Term 2: y2: -2 * 0.5 = -1, y3: -3 * 0.5 = -1.5
    -> log(e^-1 + e^-1.5) + 1.
    A bad name fails."""
    avg, scores = torch.tensor([[-1.0, -2.0, -3.0]], dtype=F64), torch.tensor([[1.0, 0.5, 0.0]], dtype=F64)
    loss = pro_loss(avg, scores, torch.ones(1, 3, dtype=torch.bool), temperature="reward_difference")
    expected = math.log(2 * math.exp(-1) + math.exp(-3)) + 1 + math.log(math.exp(-1) + math.exp(-1.5)) + 1
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="unknown PRO temperature"):
        pro_loss(avg, scores, torch.ones(1, 3, dtype=torch.bool), temperature="hot")


def test_pro_gradcheck_with_temperature():
    avg = torch.tensor([[-1.3, -0.4, -2.2, -0.9]], dtype=F64, requires_grad=True)
    scores, valid = torch.tensor([[0.2, 0.9, 0.1, 0.9]], dtype=F64), torch.ones(1, 4, dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda a: pro_loss(a, scores, valid, temperature="reward_difference"), (avg,))


# ----------------------------------------------------------------------------------------------------- RRHF
@settings(max_examples=60, deadline=None)
@given(batch=lists())
def test_rrhf_value_and_gradient_match_the_hand_derivation(batch):
    """L = sum_{s_i < s_j} max(0, p_i - p_j); dL/dp_m = #{better j: p_j < p_m} - #{worse i: p_i > p_m}."""
    avg, scores, valid = batch
    avg = avg.clone().requires_grad_()
    losses = rrhf_loss(avg, scores, valid)
    losses.sum().backward()
    expected = torch.zeros_like(avg)
    for b in range(avg.shape[0]):
        k = int(valid[b].sum())
        p, s = avg[b, :k].tolist(), scores[b, :k].tolist()
        pairs = [(i, j) for i in range(k) for j in range(k) if s[i] < s[j]]  # (worse, better)
        assert losses[b].item() == pytest.approx(sum(max(0.0, p[i] - p[j]) for i, j in pairs), abs=1e-12)
        for i, j in pairs:
            if p[i] > p[j]:
                expected[b, i] += 1
                expected[b, j] -= 1
    torch.testing.assert_close(avg.grad, expected, rtol=0, atol=0)


@settings(max_examples=40, deadline=None)
@given(c=AVG, r=AVG)
def test_rrhf_with_two_completions_is_a_zero_margin_hinge(c, r):
    avg, scores = torch.tensor([[c, r]], dtype=F64), torch.tensor([[2.0, 1.0]], dtype=F64)
    assert rrhf_loss(avg, scores, torch.ones(1, 2, dtype=torch.bool)).item() == max(0.0, r - c)


# ----------------------------------------------------------------------------------------------------- LiPO
INV_LOG2_3 = 1 / math.log2(3)


def test_lambda_weights_by_hand():
    """psi = (2, 0, 1) -> gains G = (3, 0, 1). Rewards s = (0.1, 0.3, -0.2): ranks tau = (2, 1, 3),
    1/D = 1/log2(1 + tau) = (1/log2 3, 1, 1/2). Delta_01 = 3 |1/log2 3 - 1| = 3 (1 - 0.63093) = 1.10721;
    Delta_02 = 2 |0.63093 - 0.5| = 0.26186; Delta_21 = 1 |0.5 - 1| = 0.5. All rewards 0 (the first step): ties
    broken by psi, tau = (1, 3, 2)."""
    scores, valid = torch.tensor([[2.0, 0.0, 1.0]], dtype=F64), torch.ones(1, 3, dtype=torch.bool)
    delta = lambda_weights(torch.tensor([[0.1, 0.3, -0.2]], dtype=F64), scores, valid)[0]
    assert [delta[0, 1].item(), delta[0, 2].item(), delta[2, 1].item()] == pytest.approx(
        [3 * (1 - INV_LOG2_3), 2 * (INV_LOG2_3 - 0.5), 0.5], abs=1e-12)
    assert torch.equal(delta, delta.T) and torch.all(delta.diagonal() == 0)
    delta = lambda_weights(torch.zeros(1, 3, dtype=F64), scores, valid)[0]  # tau = (1, 3, 2): 1/D = (1, 0.5, 0.63093)
    assert [delta[0, 1].item(), delta[0, 2].item(), delta[2, 1].item()] == pytest.approx(
        [3 * 0.5, 2 * (1 - INV_LOG2_3), INV_LOG2_3 - 0.5], abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(batch=lists(SUM), ref_shift=st.lists(st.floats(-3.0, 3.0), min_size=4, max_size=4), beta=st.floats(0.01, 2.0))
def test_lipo_gradient_matches_the_hand_derivation(batch, ref_shift, beta):
    """dL/dlog pi(y_m) = beta [- sum_{psi_m > psi_j} Delta_mj s(s_j - s_m) + sum_{psi_i > psi_m} Delta_im s(s_m - s_i)],
    with Delta from the current rewards (no gradient through it)."""
    logps, scores, valid = batch
    ref = logps + torch.tensor(ref_shift, dtype=F64)
    logps = logps.clone().requires_grad_()
    losses, rewards = lipo_loss(logps, ref, scores, valid, beta=beta)
    losses.sum().backward()
    delta = lambda_weights(rewards, scores, valid)
    expected = torch.zeros_like(logps)
    for b in range(logps.shape[0]):
        k = int(valid[b].sum())
        s, psi = rewards[b].tolist(), scores[b].tolist()
        value = 0.0
        for i in range(k):
            for j in range(k):
                if psi[i] > psi[j]:
                    d = delta[b, i, j].item()
                    value += -d * math.log(1 / (1 + math.exp(-(s[i] - s[j]))))
                    expected[b, i] -= beta * d / (1 + math.exp(s[i] - s[j]))  # -Delta s(s_j - s_i)
                    expected[b, j] += beta * d / (1 + math.exp(s[i] - s[j]))
        assert losses[b].item() == pytest.approx(value, rel=1e-9, abs=1e-12)
    torch.testing.assert_close(logps.grad, expected, rtol=1e-8, atol=1e-12)
    assert ref.grad is None


@settings(max_examples=40, deadline=None)
@given(c=SUM, r=SUM, c0=SUM, r0=SUM, beta=st.floats(0.01, 2.0),
       psi=st.tuples(SCORE, SCORE).filter(lambda p: p[0] > p[1]))
def test_lipo_with_two_completions_is_dpo_times_a_constant_weight(c, r, c0, r0, beta, psi):
    """k = 2: Delta = (2^psi_w - 2^psi_l) (1 - 1/log2 3) whatever the rewards, times DPO's Eq. 7."""
    t = lambda *v: torch.tensor([v], dtype=F64)
    losses, _ = lipo_loss(t(c, r), t(c0, r0), t(*psi), torch.ones(1, 2, dtype=torch.bool), beta=beta)
    dpo, _, _ = preference_loss(t(c)[0], t(r)[0], t(c0)[0], t(r0)[0], beta=beta)
    weight = (2 ** psi[0] - 2 ** psi[1]) * (1 - INV_LOG2_3)
    assert losses.item() == pytest.approx(weight * dpo.item(), rel=1e-9, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_lipo_does_not_depend_on_list_order(data):
    logps, scores, valid = data.draw(lists(SUM))
    ref = logps + torch.linspace(-1, 1, 4, dtype=F64)
    p_logps, p_ref, p_scores = permute([logps, ref, scores], valid, permutations(data.draw))
    torch.testing.assert_close(lipo_loss(p_logps, p_ref, p_scores, valid)[0], lipo_loss(logps, ref, scores, valid)[0],
                               rtol=1e-12, atol=1e-12)


def test_lipo_first_step_is_not_zero_and_padding_is_inert():
    """pi = pi_ref (all s = 0): the loss is sum Delta log 2 > 0 with Delta from the label order; an empty slot with
    garbage values changes nothing."""
    logps = torch.tensor([[-5.0, -6.0, -7.0, 0.0]], dtype=F64)
    scores, valid = torch.tensor([[1.0, 0.0, 0.5, 0.0]], dtype=F64), torch.tensor([[True, True, True, False]])
    loss, _ = lipo_loss(logps, logps, scores, valid)
    delta = lambda_weights(torch.zeros(1, 4, dtype=F64), scores, valid)[0]
    assert loss.item() == pytest.approx(math.log(2) * (delta[0, 1] + delta[0, 2] + delta[2, 1]).item()) and loss > 0
    garbage = logps.clone()
    garbage[0, 3], scores2 = 99.0, scores.clone()
    scores2[0, 3] = 7.0
    assert lipo_loss(garbage, logps, scores2, valid)[0].item() == loss.item()
