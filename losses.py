"""
Every training objective beyond next-token cross-entropy, as pure functions on tensors: the reward
model's ranking losses, GRPO's and PPO's clipped policy objective, their advantages and KL, PPO's
value loss and GAE, DPO and its variants, and distillation. Each docstring carries the formula;
tests/test_losses.py checks each against a value worked out by hand. The stage scripts (reward.py,
grpo.py, ppo.py, dpo.py, train.py and sft.py with a teacher) call these inside their training step;
nothing here knows about models, batches or processes.

Shapes: N rows (pairs, or sampled completions), T completion positions; a mask (N, T) is True on
the tokens that count. Per-token log-probabilities come from GPT.logprobs at the sampling
temperature.
"""

import math

import torch
import torch.nn.functional as F

from model import upcast

# -----------------------------------------------------------------------------
# reward models: a scalar r for a (prompt, reply), trained on pairs (chosen, rejected)


def bradley_terry_loss(r_chosen, r_rejected, margin=0.0):
    """Bradley-Terry: P(chosen > rejected) = sigmoid(r_c - r_r), fitted by maximum likelihood,

        loss = mean over pairs of -log sigmoid(r_c - r_r - m)

    With a margin m > 0 (a number, or one per pair) this is Llama 2's variant: a pair known to be
    far apart must be separated by at least about m before its loss fades. r_c 2, r_r 0.5, m 0:
    -log sigmoid(1.5) = log(1 + e^-1.5) = 0.2014."""
    return -F.logsigmoid(r_chosen - r_rejected - margin).mean()


def margin_ranking_loss(r_chosen, r_rejected, margin):
    """The hinge form: loss = mean of max(0, m - (r_c - r_r)). Zero once chosen leads by m; unlike
    Bradley-Terry it stops pushing there, and gives no signal at all past it."""
    return F.relu(margin - (r_chosen - r_rejected)).mean()


def center_loss(r_chosen, r_rejected):
    """mean((r_c + r_r)^2): the ranking losses see only differences, so rewards may drift as a
    whole; a small multiple of this (TRL's center_rewards_coefficient) keeps them near 0."""
    return (r_chosen + r_rejected).square().mean()


# -----------------------------------------------------------------------------
# GRPO: advantages from a group of samples of the same prompt, no value function


def group_advantages(rewards, group_size, scale="group", eps=1e-4, batch_std=None):
    """rewards (P * G,), the G = group_size samples of each prompt next to each other ->
    (advantages (P * G,), zero_std (P,) True for groups whose rewards are all equal).

        A_i = (r_i - mean of its group) / (s + eps)

    s is the std of the sample's group (scale="group", GRPO), of the whole batch ("batch"), or 1
    ("none", Dr. GRPO, which argues the division favours prompts that are too easy or too hard).
    Under DDP the batch spans processes: batch_std, their rewards' std, replaces this process's.
    The std uses Bessel's correction (n - 1, torch.std's default, as TRL does). A group whose
    rewards are all equal gets A = 0 everywhere: it carries no signal.
    Group (1, 0, 0, 1): mean 0.5, std sqrt(1/3) = 0.5774, A = (+-0.5) / 0.5775 = +-0.8659."""
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards must be group | batch | none, got {scale!r}")
    if group_size < 2 and scale == "group":
        raise ValueError("a group std needs group_size >= 2")
    r = rewards.view(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    zero_std = r.std(dim=1) < 1e-8 if group_size > 1 else torch.ones(r.size(0), dtype=torch.bool, device=r.device)
    if scale == "group":
        centred = centred / (r.std(dim=1, keepdim=True) + eps)
    elif scale == "batch" and batch_std is not None:
        centred = centred / (batch_std + eps)
    elif scale == "batch":
        centred = centred / (rewards.std() + eps) if rewards.numel() > 1 else centred
    return centred.reshape(-1), zero_std


def clipped_surrogate(logp, old_logp, advantages, clip_eps, clip_eps_high=None):
    """PPO's clipped objective, per token, as a loss (GRPO and PPO share it):

        ratio = exp(logp - old_logp)
        loss  = -min(ratio * A, clip(ratio, 1 - clip_eps, 1 + clip_eps_high) * A)

    logp, old_logp (N, T); advantages (N, T), or (N,) for one per sequence. clip_eps_high defaults
    to clip_eps; larger is DAPO's clip-higher, which leaves more room to raise unlikely tokens.
    The min makes the objective pessimistic: once the ratio has moved past the clip in the
    direction A favours, the gradient stops; in the other direction it never does.
    -> (loss (N, T), clipped (N, T) True where the clipped term was the one taken)."""
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_eps, 1 + high) * advantages
    return -torch.minimum(unclipped, clipped), clipped < unclipped


def kl_k3(logp, ref_logp):
    """The k3 estimator of KL(policy || reference) per sampled token (Schulman, "Approximating KL
    divergence"): with d = ref_logp - logp,

        KL_t = exp(d) - d - 1

    unbiased for tokens drawn from the policy, and never negative (e^d >= 1 + d), unlike the plain
    estimate -d. 0 where logp == ref_logp; d = log 2 gives 2 - log 2 - 1 = 0.3069."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def aggregate(per_token, mask, loss_type, n_samples=None, n_tokens=None, max_new_tokens=None):
    """Reduce a per-token loss (N, T) over the tokens of mask to the scalar to minimise:

        grpo     mean over samples of each sample's mean over its tokens (the GRPO paper); a
                 long completion weighs no more than a short one in all, so each of its tokens
                 weighs less
        dapo     sum over every token / the number of tokens (DAPO): every token weighs the same
        dr_grpo  sum over every token / (number of samples x max_new_tokens) (Dr. GRPO): a
                 constant denominator, no length bias either way

    When the batch is split into micro-batches and processes, n_samples and n_tokens are the
    totals of the whole iteration, so that summing the micro-batches' results gives the loss of
    the whole batch; by default they are this batch's. A sample with no tokens (a truncated one
    left out) counts for nothing, and not in n_samples either."""
    mask = mask.to(per_token.dtype)
    per_sample_tokens = mask.sum(dim=1)
    n_samples = float((per_sample_tokens > 0).sum()) if n_samples is None else float(n_samples)
    n_tokens = float(mask.sum()) if n_tokens is None else float(n_tokens)
    if loss_type == "grpo":
        means = (per_token * mask).sum(dim=1) / per_sample_tokens.clamp(min=1)
        return means.sum() / max(n_samples, 1.0)
    if loss_type == "dapo":
        return (per_token * mask).sum() / max(n_tokens, 1.0)
    if loss_type == "dr_grpo":
        if max_new_tokens is None:
            raise ValueError("dr_grpo needs max_new_tokens")
        return (per_token * mask).sum() / (max(n_samples, 1.0) * max_new_tokens)
    raise ValueError(f"loss_type must be grpo | dapo | dr_grpo, got {loss_type!r}")


# -----------------------------------------------------------------------------
# PPO: a value function, per-token rewards, GAE


def gae(rewards, values, mask, gamma, lam):
    """Generalized Advantage Estimation over each row's tokens of mask (a contiguous run, the
    completion), with the value after the last token taken to be 0:

        delta_t = r_t + gamma V_{t+1} - V_t
        A_t     = delta_t + gamma lam A_{t+1}
        returns = A + V

    rewards, values, mask (N, T) -> (advantages (N, T), returns (N, T)), 0 outside the mask.
    gamma = lam = 1: A_t = the reward-to-go from t minus V_t; lam = 0: A_t = delta_t.
    A loop over T, vectorised over the rows (the recursion runs backwards in time)."""
    mask = mask.to(values.dtype)
    N, T = rewards.shape
    advantages = torch.zeros_like(values)
    next_value = torch.zeros(N, dtype=values.dtype, device=values.device)
    next_adv = torch.zeros_like(next_value)
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = (delta + gamma * lam * next_adv) * m
        advantages[:, t] = adv
        # past the end of a row (m = 0) the next step sees V = 0 and A = 0
        next_value = values[:, t] * m
        next_adv = adv
    return advantages, (advantages + values) * mask


def whiten(x, mask, shift_mean=True, eps=1e-8):
    """(x - mean) / std over the entries of mask, the std with Bessel's correction; entries outside
    the mask become 0. shift_mean=False only rescales (for rewards, whose sign means something)."""
    mask = mask.to(x.dtype)
    n = mask.sum()
    mean = (x * mask).sum() / n
    var = ((x - mean).square() * mask).sum() / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def clipped_value_loss(values, old_values, returns, clip_value):
    """PPO's value loss, per token: the value may move at most clip_value from what it was at
    rollout before the clipped error takes over, and the larger error is the one minimised:

        loss = 0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)

    -> (loss, clipped True where the clipped error was the larger)."""
    v_clipped = old_values + (values - old_values).clamp(-clip_value, clip_value)
    err, err_clipped = (values - returns).square(), (v_clipped - returns).square()
    return 0.5 * torch.maximum(err, err_clipped), err_clipped > err


def adaptive_kl_coef(kl_coef, kl, target_kl, horizon, n_steps):
    """Ziegler et al. (2019)'s controller: move the KL coefficient toward the value that keeps the
    measured KL at target_kl, by at most 20% of the error per horizon's worth of steps:

        e = clip(kl / target_kl - 1, -0.2, 0.2);   kl_coef <- kl_coef * (1 + e * n_steps / horizon)

    kl_coef 0.1, kl 0.3, target 0.2, horizon 1000, 100 steps: e = 0.2, 0.1 * 1.02 = 0.102."""
    error = min(max(kl / target_kl - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * n_steps / horizon)


def kl_penalized_rewards(scores, logp, ref_logp, mask, kl_coef):
    """PPO's per-token rewards (Ziegler et al. 2019, InstructGPT): a KL penalty on every completion
    token and the sequence's score on its last one,

        r_t = -kl_coef (logp_t - ref_logp_t)             every token of mask
            + score                                      the last token of mask as well

    scores (N,), the sequence rewards; logp, ref_logp, mask (N, T) aligned with the targets
    (Completions.targets and loss_mask): position t holds the log-prob of the token sampled after
    it. The last True of a row is then the position whose target is the completion's <|end|>, or,
    for a completion that ran out of tokens, its last sampled token: the score goes to the action
    that ended the sequence, and GAE sees V = 0 after it. (TRL put it one slot later, after the
    <|end|>: their issue 3750.) A row with no True (left out) gets nothing.
    -> (rewards (N, T), kl (N, T) = logp - ref_logp on mask, 0 elsewhere).
    Mask (0, 1, 1), score 1, kl_coef 0.1, logp - ref = (., 0.5, -0.2): r = (0, -0.05, 1 + 0.02)."""
    m = mask.to(logp.dtype)
    kl = (logp - ref_logp) * m
    rewards = -kl_coef * kl
    T = mask.size(1)
    last = T - 1 - mask.flip(1).to(torch.int8).argmax(dim=1)  # the last True of each row
    rows = torch.arange(mask.size(0), device=mask.device)
    rewards[rows, last] += scores.to(rewards.dtype) * mask.any(dim=1)
    return rewards, kl


def running_moments(count, mean, m2, x):
    """Fold the values x (a tensor) into running statistics: count, mean and m2, the sum of squared
    deviations from the mean (Chan et al.'s parallel update, exact for any split of the data):

        n = count + len(x),  d = mean(x) - mean
        mean' = mean + d len(x) / n,   m2' = m2 + m2(x) + d^2 count len(x) / n

    -> (count', mean', m2'), floats; the std so far is sqrt(m2' / (count' - 1)). ppo.py scales its
    rewards by it. (1, 2, 3) then (5): count 4, mean 2.75, m2 8.75, std sqrt(8.75 / 3) = 1.7078."""
    x = x.detach().double().reshape(-1)
    k = x.numel()
    if k == 0:
        return count, mean, m2
    n = count + k
    mean_x = x.mean().item()
    d = mean_x - mean
    return n, mean + d * k / n, m2 + (x - mean_x).square().sum().item() + d * d * count * k / n


def explained_variance(values, returns, mask):
    """How much of the returns' variance the value function accounts for, over the entries of mask:

        1 - Var(returns - values) / Var(returns)

    1 is perfect, 0 is no better than a constant, negative is worse than one; nan when the
    returns do not vary. R (1, 2, 3), V (1, 2, 2): 1 - (2/9) / (2/3) = 2/3."""
    m = mask.to(torch.float64)
    n = m.sum()

    def var(x):
        x = x.double()
        mean = (x * m).sum() / n
        return ((x - mean).square() * m).sum() / n

    v = var(returns)
    return (1 - var(returns - values) / v).item() if v > 0 else float("nan")


def approx_kl(logp, old_logp, mask):
    """0.5 * mean over the mask of (logp - old_logp)^2: how far an update has moved the policy
    from the one that sampled, for stopping PPO's epochs early (TRL's approxkl)."""
    mask = mask.to(logp.dtype)
    return 0.5 * ((logp - old_logp).square() * mask).sum() / mask.sum().clamp(min=1)


# -----------------------------------------------------------------------------
# DPO and its variants: preferences straight into the policy, no reward model


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, loss_type="sigmoid",
             label_smoothing=0.0, chosen_tokens=None, rejected_tokens=None):
    """Preference losses on the summed log-probs (N,) of each pair's chosen and rejected reply
    under the policy and the frozen reference. With the log-ratios h_c = policy_c - ref_c and
    h_r = policy_r - ref_r, and Delta = h_c - h_r:

        sigmoid  -log sigmoid(beta Delta)                                       DPO
        ipo      (h_c / n_c - h_r / n_r - 1 / (2 beta))^2, n the reply's tokens  IPO: log-ratios
                 averaged per token, as the IPO authors and TRL do; a target instead of ever more
        hinge    max(0, 1 - beta Delta)                                         SLiC
        robust   (-(1 - eps) log sigmoid(beta Delta) + eps log sigmoid(-beta Delta)) / (1 - 2 eps)
                 with eps = label_smoothing, the share of pairs thought to be flipped (rDPO)

    -> (loss per pair (N,), implicit rewards beta h_c and beta h_r (N,) each). Policy = reference:
    Delta = 0 and the sigmoid loss is log 2 = 0.6931."""
    h_c, h_r = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    delta = h_c - h_r
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(beta * delta)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("ipo averages the log-ratios per token: pass chosen_tokens and rejected_tokens")
        loss = (h_c / chosen_tokens - h_r / rejected_tokens - 1 / (2 * beta)).square()
    elif loss_type == "hinge":
        loss = F.relu(1 - beta * delta)
    elif loss_type == "robust":
        if not 0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        eps = label_smoothing
        loss = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    else:
        raise ValueError(f"loss_type must be sigmoid | ipo | hinge | robust, got {loss_type!r}")
    return loss, (beta * h_c).detach(), (beta * h_r).detach()


def rpo_nll(policy_chosen, chosen_tokens):
    """RPO's term (Pang et al. 2024, "Iterative Reasoning Preference Optimization"): the negative
    log-likelihood of each pair's chosen reply per token, -policy_c / n_c (N,), from the summed
    log-probs policy_c (N,) of its n_c tokens. DPO sees only differences of log-ratios, so both
    replies' likelihoods may fall as long as the rejected one falls faster; sft_coef times the mean
    of this term holds the chosen one up. Summed log-prob -3 over 2 tokens: 1.5."""
    return -policy_chosen / chosen_tokens


# -----------------------------------------------------------------------------
# distillation: a student matches a teacher's distribution, not only the next token


def distill_loss(student_logits, teacher_logits, targets, temperature=1.0, kind="forward_kl", beta=0.5,
                 vocab_limit=None):
    """The distillation term (Hinton et al. 2015), averaged over the positions whose target is not
    -1 (prompt tokens and padding carry none):

        p = softmax(teacher / T), q = softmax(student / T)
        forward_kl   T^2 KL(p || q) = T^2 sum p (log p - log q)   the student covers the teacher
        reverse_kl   T^2 KL(q || p)                               the student picks a mode
        jsd          T^2 (beta KL(p || m) + (1 - beta) KL(q || m)),  m = beta p + (1 - beta) q
                     (the generalized JSD of GKD; beta 0.5 is the symmetric one)

    Why T^2: the gradient of the softened term with respect to the logits scales as 1 / T^2, so
    multiplying by T^2 keeps its size comparable to the hard cross-entropy whatever T is.
    vocab_limit: ids from it on (the padding of a padded vocabulary) are left out of both
    distributions. logits (B, T, V), targets (B, T)."""
    V = student_logits.size(-1) if vocab_limit is None else vocab_limit
    keep = targets.reshape(-1) >= 0
    s = upcast(student_logits.reshape(-1, student_logits.size(-1))[keep, :V]) / temperature
    t = upcast(teacher_logits.reshape(-1, teacher_logits.size(-1))[keep, :V]) / temperature
    log_q, log_p = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
    if kind == "forward_kl":
        per = (log_p.exp() * (log_p - log_q)).sum(-1)
    elif kind == "reverse_kl":
        per = (log_q.exp() * (log_q - log_p)).sum(-1)
    elif kind == "jsd":
        if not 0.0 < beta < 1.0:
            raise ValueError(f"jsd needs 0 < beta < 1, got {beta}")
        log_m = torch.logsumexp(torch.stack((log_p + math.log(beta), log_q + math.log(1 - beta))), dim=0)
        per = beta * (log_p.exp() * (log_p - log_m)).sum(-1) + (1 - beta) * (log_q.exp() * (log_q - log_m)).sum(-1)
    else:
        raise ValueError(f"distill_loss must be forward_kl | reverse_kl | jsd, got {kind!r}")
    if per.numel() == 0:
        return student_logits.sum() * 0.0
    return temperature**2 * per.mean()


def distilled(ce, student_logits, teacher_logits, targets, alpha, temperature, kind="forward_kl", beta=0.5,
              vocab_limit=None):
    """The distillation objective of a stage: (1 - alpha) * ce + alpha * distill_loss(...), where ce
    is the stage's own cross-entropy on the same batch. -> (the objective, the distillation term)."""
    kd = distill_loss(student_logits, teacher_logits, targets, temperature, kind, beta, vocab_limit)
    return (1 - alpha) * ce + alpha * kd, kd
