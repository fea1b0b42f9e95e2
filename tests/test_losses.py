"""losses.py: every objective against a value worked out by hand (the arithmetic is in the comments)."""

import math

import pytest
import torch

import losses

t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731


# --- reward models -----------------------------------------------------------


def test_bradley_terry_and_margins_by_hand():
    rc, rr = t(2.0), t(0.5)
    # -log sigmoid(1.5) = log(1 + e^-1.5)
    assert losses.bradley_terry_loss(rc, rr).item() == pytest.approx(math.log(1 + math.exp(-1.5)))
    assert losses.bradley_terry_loss(rc, rr).item() == pytest.approx(0.201413, abs=1e-6)
    # with margin 1: -log sigmoid(0.5) = 0.474077
    assert losses.bradley_terry_loss(rc, rr, margin=t(1.0)).item() == pytest.approx(0.474077, abs=1e-6)
    # hinge: max(0, 2 - 1.5) = 0.5, and 0 once the lead passes the margin
    assert losses.margin_ranking_loss(rc, rr, 2.0).item() == pytest.approx(0.5)
    assert losses.margin_ranking_loss(rc, rr, 1.0).item() == 0.0
    # centring: (2 + 0.5)^2 = 6.25; BT + 0.01 x centring = 0.201413 + 0.0625
    assert losses.center_loss(rc, rr).item() == pytest.approx(6.25)
    total = losses.bradley_terry_loss(rc, rr) + 0.01 * losses.center_loss(rc, rr)
    assert total.item() == pytest.approx(0.263913, abs=1e-6)
    # means over pairs, per-pair margins
    two = losses.bradley_terry_loss(t(2.0, 0.0), t(0.5, 0.0), margin=t(0.0, 1.0))
    assert two.item() == pytest.approx((0.201413 + math.log(1 + math.e)) / 2, abs=1e-6)


# --- GRPO --------------------------------------------------------------------


def test_group_advantages_for_each_scaling():
    r = t(1, 0, 0, 1, 1, 1, 1, 0)
    # group 1: mean 0.5, std (n - 1) sqrt(1/3); group 2: mean 0.75, std sqrt(0.75 / 3) = 0.5
    a, zero = losses.group_advantages(r, 4, "group")
    s1, s2 = math.sqrt(1 / 3), 0.5
    expected = [
        0.5 / (s1 + 1e-4), -0.5 / (s1 + 1e-4), -0.5 / (s1 + 1e-4), 0.5 / (s1 + 1e-4),
        0.25 / (s2 + 1e-4), 0.25 / (s2 + 1e-4), 0.25 / (s2 + 1e-4), -0.75 / (s2 + 1e-4)]
    assert a.tolist() == pytest.approx(expected)
    assert a[0].item() == pytest.approx(0.8659, abs=1e-4) and zero.tolist() == [False, False]
    # batch: one std over all 8 rewards: mean 5/8, sum of squares 5 (3/8)^2 + 3 (5/8)^2 = 1.875, / 7
    sb = math.sqrt(1.875 / 7)
    a, _ = losses.group_advantages(r, 4, "batch")
    assert a.tolist() == pytest.approx([c / (sb + 1e-4) for c in (0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75)])
    # under DDP the std is every process's: given, it replaces this batch's
    a, _ = losses.group_advantages(r, 4, "batch", batch_std=2.0)
    assert a.tolist() == pytest.approx([c / 2.0001 for c in (0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75)])
    # none (Dr. GRPO): only centred
    a, _ = losses.group_advantages(r, 4, "none")
    assert a.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75])


def test_a_group_with_equal_rewards_has_no_signal():
    a, zero = losses.group_advantages(t(0.3, 0.3, 0.3, 1.0, 0.0, 0.5), 3, "group")
    assert a[:3].tolist() == [0.0, 0.0, 0.0] and zero.tolist() == [True, False]
    with pytest.raises(ValueError):
        losses.group_advantages(t(1, 2), 2, "groups")


@pytest.mark.parametrize("A, ratio, loss, clipped", [
    (1.0, 1.5, -1.2, True),    # A > 0 pushed past 1 + eps: clipped at 1.2, no more gradient
    (1.0, 0.5, -0.5, False),   # A > 0 below 1 - eps: the unclipped term is the smaller, gradient flows
    (-1.0, 1.5, 1.5, False),   # A < 0 above 1 + eps: unclipped -1.5 is the smaller, gradient flows
    (-1.0, 0.5, 0.8, True),    # A < 0 pushed below 1 - eps: clipped at 0.8
    (1.0, 1.1, -1.1, False),   # inside the clip range: the plain ratio
])
def test_clipped_surrogate_on_both_sides_for_both_signs(A, ratio, loss, clipped):
    logp = torch.tensor([[math.log(ratio)]], dtype=torch.float64, requires_grad=True)
    out, was_clipped = losses.clipped_surrogate(logp, torch.zeros(1, 1, dtype=torch.float64), t(A), 0.2)
    assert out.item() == pytest.approx(loss) and was_clipped.item() == clipped
    out.sum().backward()
    # d/dlogp of -ratio A is -ratio A where unclipped, 0 where clipped
    assert logp.grad.item() == pytest.approx(0.0 if clipped else -ratio * A)


def test_clip_higher():
    out, _ = losses.clipped_surrogate(torch.tensor([[math.log(1.5)]]), torch.zeros(1, 1), torch.tensor([1.0]), 0.2, 0.3)
    assert out.item() == pytest.approx(-1.3)  # clipped at 1 + 0.3
    out, _ = losses.clipped_surrogate(torch.tensor([[math.log(0.5)]]), torch.zeros(1, 1), torch.tensor([-1.0]), 0.2, 0.3)
    assert out.item() == pytest.approx(0.8)  # the low side still at 1 - 0.2


def test_k3_is_zero_at_the_reference_and_positive_elsewhere():
    assert losses.kl_k3(t(-1.2, 0.0), t(-1.2, 0.0)).tolist() == [0.0, 0.0]
    # d = ref - logp = log 2: 2 - log 2 - 1
    assert losses.kl_k3(t(0.0), t(math.log(2))).item() == pytest.approx(1 - math.log(2))
    assert (losses.kl_k3(torch.randn(100, dtype=torch.float64), torch.randn(100, dtype=torch.float64)) > 0).all()


def test_each_loss_type_on_two_samples_of_different_lengths():
    # sample 1: 2 tokens, losses 1 and 3; sample 2: 4 tokens, 2 2 2 6
    per_token = t(1, 3, 99, 99, 2, 2, 2, 6).view(2, 4)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert losses.aggregate(per_token, mask, "grpo").item() == pytest.approx((2 + 3) / 2)  # means 2 and 3
    assert losses.aggregate(per_token, mask, "dapo").item() == pytest.approx(16 / 6)  # 16 over 6 tokens
    assert losses.aggregate(per_token, mask, "dr_grpo", max_new_tokens=4).item() == pytest.approx(16 / 8)
    # split into two micro-batches with the iteration's totals, the parts add up to the whole
    for kind, kw in (("grpo", dict(n_samples=2)), ("dapo", dict(n_tokens=6)), ("dr_grpo", dict(n_samples=2, max_new_tokens=4))):
        whole = losses.aggregate(per_token, mask, kind, max_new_tokens=4)
        parts = sum(losses.aggregate(per_token[i : i + 1], mask[i : i + 1], kind, **kw) for i in range(2))
        assert parts.item() == pytest.approx(whole.item()), kind
    # a sample with no tokens (left out) counts for nothing
    empty = torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert losses.aggregate(per_token, empty, "grpo").item() == pytest.approx(3.0)


def test_mu_one_is_reinforce_with_a_group_baseline():
    # one optimizer pass on fresh samples: logp == old_logp, so the ratio is 1, nothing is clipped,
    # and the gradient is -A_i per token: REINFORCE with the group mean as baseline
    logp = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    adv, _ = losses.group_advantages(t(1, 0, 0, 1), 4)
    out, clipped = losses.clipped_surrogate(logp, logp.detach(), adv, 0.2)
    assert not clipped.any()
    loss = losses.aggregate(out, torch.ones(4, 3, dtype=torch.bool), "grpo")
    loss.backward()
    torch.testing.assert_close(logp.grad, (-adv[:, None] / 3 / 4).expand(4, 3))


# --- PPO ---------------------------------------------------------------------


def test_gae_by_hand():
    r, v, m = t(0, 0, 1)[None], t(0.5, 0.6, 0.7)[None], torch.ones(1, 3, dtype=torch.bool)
    a, ret = losses.gae(r, v, m, gamma=1.0, lam=1.0)  # reward-to-go (1, 1, 1) minus V
    assert a[0].tolist() == pytest.approx([0.5, 0.4, 0.3]) and ret[0].tolist() == pytest.approx([1, 1, 1])
    a, _ = losses.gae(r, v, m, gamma=1.0, lam=0.0)  # TD residuals: .6 - .5, .7 - .6, 1 - .7
    assert a[0].tolist() == pytest.approx([0.1, 0.1, 0.3])
    # gamma 0.9, lam 0.8: delta = (.9 x .6 - .5, .9 x .7 - .6, 1 - .7) = (.04, .03, .3);
    # A_2 = .3, A_1 = .03 + .72 x .3 = .246, A_0 = .04 + .72 x .246 = .21712
    a, ret = losses.gae(r, v, m, gamma=0.9, lam=0.8)
    assert a[0].tolist() == pytest.approx([0.21712, 0.246, 0.3])
    assert ret[0].tolist() == pytest.approx([0.71712, 0.846, 1.0])
    # the same completion after a prompt and followed by padding: only the masked part counts
    r2 = t(9, 0, 0, 1, 9)[None]
    v2 = t(9, 0.5, 0.6, 0.7, 9)[None]
    m2 = torch.tensor([[0, 1, 1, 1, 0]], dtype=torch.bool)
    a2, _ = losses.gae(r2, v2, m2, gamma=0.9, lam=0.8)
    assert a2[0].tolist() == pytest.approx([0.0, 0.21712, 0.246, 0.3, 0.0])


def test_masked_whitening():
    x, m = t(1, 2, 3, 100), torch.tensor([1, 1, 1, 0], dtype=torch.bool)
    # mean 2, variance (1 + 0 + 1) / 2 = 1 (Bessel): (-1, 0, 1), the masked entry 0
    assert losses.whiten(x, m).tolist() == pytest.approx([-1, 0, 1, 0], abs=1e-6)
    assert losses.whiten(x, m, shift_mean=False).tolist() == pytest.approx([1, 2, 3, 0], abs=1e-6)


def test_clipped_value_loss_by_hand():
    # V 1.0 from V_old 0.5, clip 0.2, R 2: (1 - 2)^2 = 1 vs (0.7 - 2)^2 = 1.69: 0.5 x 1.69
    loss, clipped = losses.clipped_value_loss(t(1.0), t(0.5), t(2.0), 0.2)
    assert loss.item() == pytest.approx(0.845) and clipped.item()
    # within the clip the two errors are equal: 0.5 x 1
    loss, clipped = losses.clipped_value_loss(t(1.0), t(0.9), t(0.0), 0.2)
    assert loss.item() == pytest.approx(0.5) and not clipped.item()


def test_adaptive_kl_coefficient_by_hand():
    assert losses.adaptive_kl_coef(0.1, 0.3, 0.2, 1000, 100) == pytest.approx(0.102)  # error 0.5 clipped to 0.2
    assert losses.adaptive_kl_coef(0.1, 0.18, 0.2, 1000, 100) == pytest.approx(0.099)  # error -0.1
    assert losses.adaptive_kl_coef(0.1, 0.2, 0.2, 1000, 100) == pytest.approx(0.1)


def test_approx_kl():
    m = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    assert losses.approx_kl(t(0.1, -0.3, 5)[None], t(0, 0, 0)[None], m).item() == pytest.approx(0.5 * (0.01 + 0.09) / 2)


def test_kl_penalty_and_score_land_on_the_right_tokens():
    # targets aligned: position 0 is the prompt's, the completion's tokens are the targets of 1...
    # row 0 stops: its <|end|> is the target of position 2, then filler; row 1 ran out of tokens
    # (its last token is the target of position 4); row 2 was left out (mask_truncated)
    mask = torch.tensor([[0, 1, 1, 0, 0], [0, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    logp = t(9, 0.5, -0.2, 9, 9, 9, 0.1, 0.1, 0.1, 0.3, 9, 9, 9, 9, 9).view(3, 5)
    ref = torch.zeros(3, 5, dtype=torch.float64)
    rewards, kl = losses.kl_penalized_rewards(t(1.0, 0.5, 7.0), logp, ref, mask, kl_coef=0.1)
    # -0.1 x (0.5, -0.2) on row 0's tokens, its score 1 on the <|end|> position: -0.05, 0.02 + 1
    assert rewards[0].tolist() == pytest.approx([0, -0.05, 1.02, 0, 0])
    # the truncated row's score on its last token: -0.1 x 0.3 + 0.5
    assert rewards[1].tolist() == pytest.approx([0, -0.01, -0.01, -0.01, 0.47])
    assert rewards[2].tolist() == [0.0] * 5  # no tokens, no score
    assert kl[0].tolist() == pytest.approx([0, 0.5, -0.2, 0, 0]) and kl[2].tolist() == [0.0] * 5
    # gamma = lam = 1, V = 0: every token's advantage is the sum of rewards from it on
    adv, _ = losses.gae(rewards, torch.zeros_like(rewards), mask, 1.0, 1.0)
    assert adv[0].tolist() == pytest.approx([0, 0.97, 1.02, 0, 0])
    assert adv[1].tolist() == pytest.approx([0, 0.44, 0.45, 0.46, 0.47])


def test_running_moments_by_hand_and_in_any_split():
    c, mean, m2 = losses.running_moments(0, 0.0, 0.0, t(1, 2, 3))
    assert (c, mean, m2) == (3, pytest.approx(2.0), pytest.approx(2.0))  # (1 + 0 + 1)
    c, mean, m2 = losses.running_moments(c, mean, m2, t(5))
    # all four: mean 2.75, squared deviations 1.75^2 + 0.75^2 + 0.25^2 + 2.25^2 = 8.75
    assert (c, mean, m2) == (4, pytest.approx(2.75), pytest.approx(8.75))
    assert math.sqrt(m2 / (c - 1)) == pytest.approx(1.7078, abs=1e-4)
    assert losses.running_moments(c, mean, m2, t()) == (c, mean, m2)  # an empty batch changes nothing


def test_explained_variance_by_hand():
    m = torch.tensor([1, 1, 1, 0], dtype=torch.bool)
    # R - V = (0, 0, 1): variance 2/9; R: 2/3
    assert losses.explained_variance(t(1, 2, 2, 50), t(1, 2, 3, -50), m) == pytest.approx(2 / 3)
    assert losses.explained_variance(t(1, 2, 3, 0), t(1, 2, 3, 9), m) == pytest.approx(1.0)
    assert losses.explained_variance(t(0, 0, 0, 0), t(1, 2, 3, 9), m) == pytest.approx(0.0)
    assert math.isnan(losses.explained_variance(t(0, 1, 2, 0), t(1, 1, 1, 9), m))


# --- DPO ---------------------------------------------------------------------


def test_each_dpo_loss_type_by_hand():
    # h_c = -1 - (-2) = 1, h_r = -3 - (-2) = -1, Delta = 2, beta 0.1: beta Delta = 0.2
    args = (t(-1.0), t(-3.0), t(-2.0), t(-2.0), 0.1)
    loss, rc, rr = losses.dpo_loss(*args, "sigmoid")
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.2)))  # 0.598139
    assert rc.item() == pytest.approx(0.1) and rr.item() == pytest.approx(-0.1)
    assert losses.dpo_loss(*args, "hinge")[0].item() == pytest.approx(0.8)
    # robust, eps 0.1: (0.9 x 0.598139 - 0.1 x 0.798139) / 0.8 = 0.573139
    assert losses.dpo_loss(*args, "robust", label_smoothing=0.1)[0].item() == pytest.approx(0.573139, abs=1e-6)
    assert losses.dpo_loss(*args, "robust", label_smoothing=0.0)[0].item() == pytest.approx(0.598139, abs=1e-6)
    # ipo with 2 and 4 reply tokens: (1/2 - (-1/4) - 1 / 0.2)^2 = (0.75 - 5)^2 = 18.0625
    assert losses.dpo_loss(*args, "ipo", chosen_tokens=t(2.0), rejected_tokens=t(4.0))[0].item() == pytest.approx(18.0625)
    with pytest.raises(ValueError, match="ipo"):
        losses.dpo_loss(*args, "ipo")


def test_policy_equal_to_reference_gives_log_2_and_zero_rewards():
    lp = t(-4.0, -7.5)
    loss, rc, rr = losses.dpo_loss(lp, lp + 1, lp, lp + 1, beta=0.3)
    assert loss.tolist() == pytest.approx([math.log(2)] * 2) and rc.tolist() == rr.tolist() == [0.0, 0.0]


def test_rpo_nll_by_hand_and_its_pull_on_the_chosen_reply():
    # -(-3) / 2 = 1.5, -(-1) / 4 = 0.25
    assert losses.rpo_nll(t(-3.0, -1.0), t(2.0, 4.0)).tolist() == pytest.approx([1.5, 0.25])
    # DPO sigmoid at Delta = 2, beta 0.1 (0.598139, above) plus 0.5 x the NLL of a chosen reply of
    # summed log-prob -1 over 2 tokens (0.5): 0.848139. Its gradient in policy_c is the DPO part,
    # -beta sigmoid(-beta Delta) = -0.1 x 0.450166, plus -0.5 / 2 = -0.295017: descent raises policy_c
    pc = t(-1.0).requires_grad_()
    loss = losses.dpo_loss(pc, t(-3.0), t(-2.0), t(-2.0), 0.1)[0] + 0.5 * losses.rpo_nll(pc, t(2.0))
    loss.backward()
    assert loss.item() == pytest.approx(0.848139, abs=1e-6) and pc.grad.item() == pytest.approx(-0.295017, abs=1e-6)


# --- distillation ------------------------------------------------------------


def test_distillation_losses_by_hand():
    # one position over two tokens: teacher logits (0, 0) -> p = (1/2, 1/2); student (0, log 3) -> q = (1/4, 3/4)
    teacher = t(0.0, 0.0).view(1, 1, 2)
    student = t(0.0, math.log(3)).view(1, 1, 2)
    y = torch.tensor([[1]])
    fwd = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # 0.143841
    rev = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # 0.130812
    m = (0.375, 0.625)
    jsd = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) + \
        0.5 * (0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1]))  # 0.033822
    assert losses.distill_loss(student, teacher, y, 1.0, "forward_kl").item() == pytest.approx(fwd)
    assert fwd == pytest.approx(0.143841, abs=1e-6) and rev == pytest.approx(0.130812, abs=1e-6)
    assert losses.distill_loss(student, teacher, y, 1.0, "reverse_kl").item() == pytest.approx(rev)
    assert losses.distill_loss(student, teacher, y, 1.0, "jsd").item() == pytest.approx(jsd)
    assert jsd == pytest.approx(0.033822, abs=1e-6)
    # T = 2: q = softmax(0, log(3)/2) = (1, sqrt 3) / (1 + sqrt 3); p unchanged; times T^2 = 4
    q = (1 / (1 + math.sqrt(3)), math.sqrt(3) / (1 + math.sqrt(3)))
    fwd2 = 4 * (0.5 * math.log(0.5 / q[0]) + 0.5 * math.log(0.5 / q[1]))
    assert losses.distill_loss(student, teacher, y, 2.0, "forward_kl").item() == pytest.approx(fwd2)
    rev2 = 4 * (q[0] * math.log(q[0] / 0.5) + q[1] * math.log(q[1] / 0.5))
    assert losses.distill_loss(student, teacher, y, 2.0, "reverse_kl").item() == pytest.approx(rev2)


def test_distillation_skips_masked_positions_and_padding_ids():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 6, generator=g), torch.randn(2, 3, 6, generator=g)
    y = torch.tensor([[1, -1, 2], [-1, -1, 0]])
    whole = losses.distill_loss(student, teacher, y, 1.5, "forward_kl")
    # the masked positions can hold anything
    s2, t2 = student.clone(), teacher.clone()
    s2[0, 1], t2[1, 0] = 100.0, -100.0
    assert losses.distill_loss(s2, t2, y, 1.5, "forward_kl").item() == pytest.approx(whole.item())
    # ids >= vocab_limit never enter either distribution
    s3, t3 = student.clone(), teacher.clone()
    s3[..., 4:], t3[..., 4:] = 50.0, -50.0
    assert losses.distill_loss(s3, t3, y, 1.5, "forward_kl", vocab_limit=4).item() == pytest.approx(
        losses.distill_loss(student[..., :4], teacher[..., :4], y, 1.5, "forward_kl").item())
    # the student equal to the teacher: 0
    assert losses.distill_loss(teacher, teacher, y, 2.0, "jsd").item() == pytest.approx(0.0, abs=1e-7)
