"""
DPO, Direct Preference Optimization: learn from pairs of replies where one was preferred, straight
into the policy, with no reward model and no sampling during training. The policy's own log-ratio
to a frozen reference is an implicit reward, beta * (log pi(y|x) - log pi_ref(y|x)), and the
pairs are fitted with it as a reward model is fitted with its scalar (Rafailov et al. 2023).

Reads a checkpoint to start from (init_from: sft.py's, normally; a Hugging Face folder gets the chat
tokens appended, as in sft.py, and is its own reference) and preference pairs: the
train.jsonl and val.jsonl of each folder in preference_dataset, in TRL's format (reward.py's; see
data/preferences/prepare.py: on-policy pairs, the starting policy's own best and worst sampled
answers, are the normal case, rules pairs work too). build_pairs has prepare.py write a missing
folder first. Each iteration, for a batch of pairs:

    log-probs   the summed log-probs of the reply tokens only (prompt and padding masked, the
                reply's closing <|end|> in) of the chosen and the rejected reply: both halves of
                the batch in ONE forward of the concatenated batch, chosen rows first
    reference   the same sums under the frozen reference, the starting policy: computed once over
                every pair before training (precompute_ref, and then no reference model is kept),
                or live each step; with LoRA the reference is the policy with its adapters off
    loss        with h = logp - ref (the log-ratio) and Delta = h_chosen - h_rejected:
                    sigmoid  -log sigmoid(beta Delta)                                   DPO
                    ipo      (h_c / n_c - h_r / n_r - 1 / (2 beta))^2, per-token log-ratios IPO
                    hinge    max(0, 1 - beta Delta)                                     SLiC
                    robust   DPO with label_smoothing eps of the pairs taken as flipped  rDPO
                plus sft_coef * the chosen reply's NLL per token (RPO, see below)
    step        AdamW on the mean over pairs

What to watch: the implicit rewards beta h of chosen and rejected, their margin and how often
chosen leads (acc), and the plain log-probs of both replies. DPO only widens the margin: it may
do so with both likelihoods falling (likelihood displacement, probability mass moving to replies
in neither set). logp_chosen falling with logp_rejected is that failure; sft_coef > 0 guards
against it. At the start, policy = reference: the sigmoid loss is log 2 = 0.6931, rewards 0.

Writes to out_dir: ckpt.pt (resume; stage "dpo", with the reference's path, so a resumed run keeps
the starting policy as its reference; sample.py loads it), best.pt (the policy with the best greedy
exact match on the held-out prompts of the rl_tasks cells; with no task prompts, the lowest loss on
the held-out pairs), log.jsonl, samples.txt.

A run on a laptop CPU (sized for at most 10 minutes on 2 cores, the pairs included; see
config/dpo_tasks.py), after sft.py config/sft_tasks.py:
    python dpo.py config/dpo_tasks.py
    python dpo.py config/dpo_tasks.py --loss_type=ipo --beta=0.5 --out_dir=out-dpo-ipo
    python sample.py --out_dir=out-dpo --chat=True
One GPU, or several:
    python dpo.py --init_from=out-sft/ckpt.pt --preference_dataset=preferences/policy --batch_size=64
    torchrun --standalone --nproc_per_node=8 dpo.py config/dpo_tasks.py --gradient_accumulation_steps=8
Resume, or measure a checkpoint (its pairs against the reference it was trained from):
    python dpo.py config/dpo_tasks.py --init_from=resume
    python dpo.py config/dpo_tasks.py --init_from=out-dpo/best.pt --eval_only=True --out_dir=out-dpo-eval

A healthy run prints the pairs it read and its reference, then the eval of iteration 0, where
policy = reference: over each folder's held-out pairs val_loss=0.6931 (log 2 for sigmoid) with
rewards, margin and acc 0 (acc counts strict leads), and the greedy answers on the task prompts
of every cell (the cells DPO does not train on show regressions there):
    eval iter=0 val_loss=0.6931 reward_chosen=0 reward_rejected=0 margin=0 acc=0 logp_chosen=... logp_rejected=...
    answers iter=0 em=... score=... em/add/1=... ... err_rl=... pass@1=... pass@4=... pass@8=...
then a line per log_interval, the loss falling from 0.6931, acc and margin rising, logp_chosen
not falling far (nll with sft_coef > 0):
    iter=10 loss=... reward_chosen=... reward_rejected=... margin=... acc=... logp_chosen=... logp_rejected=...
        grad_norm=... lr=... ms=... tok_s=... mfu=... eta=...
"""

import math
import os
import shlex
import sys
import time

import torch

import common
import losses
import posttrain
from configurator import configure
from conversations import pair_batch, preference_splits

# -----------------------------------------------------------------------------
# I/O
out_dir = "out-dpo"
init_from = "out-sft/ckpt.pt"  # a checkpoint to start from (sft.py's, normally; a Hugging Face folder) | resume
eval_interval = 50  # iterations between evaluations (and checkpoints)
log_interval = 10  # iterations between log lines
eval_only = False  # evaluate once and exit
always_save_checkpoint = True  # write ckpt.pt at every eval, not only when the eval improves
wandb_log = False
wandb_project = "llm"
wandb_run_name = "dpo"
# data
preference_dataset = ("preferences/policy",)  # folders under data/ (or absolute) with train.jsonl, val.jsonl
build_pairs = ""  # arguments of data/preferences/prepare.py that build a missing folder (--out_dir added; "" = never)
prompt_dataset = "tasks"  # a folder under data/ (or absolute) whose val.jsonl holds the eval's task prompts ("" = none)
rl_tasks = ("add/3", "sub/2", "sub/3", "sort/2", "sort/3")  # the cells err_rl (best.pt) follows (empty: all)
rl_cell_weights = "uniform"  # uniform: the pairs of each task/difficulty cell as often as another's | rows: as read
gradient_accumulation_steps = 1  # micro-steps per iteration, summed over all processes
batch_size = 32  # pairs per micro-step per process (each pair is two conversations)
# model: only GPTConfig's training-only fields; the architecture is the checkpoint's
dropout = 0.0  # keep 0: the reference is scored without dropout, and at the start policy = reference
lora_rank = 0  # > 0: train low-rank adapters only; the reference is then the base, adapters off
lora_alpha = 16.0  # adapter scale = lora_alpha / lora_rank
lora_dropout = 0.0
lora_targets = ("c_q", "c_v")  # c_q c_k c_v attn.c_proj c_fc c_gate mlp.c_proj router lm_head, or attn / mlp
moe_aux_coef = 0.01  # a MoE model: weight of its load-balancing loss in this stage's loss (a dense one has none)
moe_z_coef = 0.001  # a MoE model: weight of its router z-loss
quantize = "none"  # none | int8 | int4 frozen base weights: with lora_rank > 0, QLoRA
quant_group_size = 64  # int4: inputs that share one scale, 32 | 64 | 128
# dpo
loss_type = "sigmoid"  # sigmoid (DPO) | ipo | hinge | robust (see losses.dpo_loss)
beta = 0.1  # the strength of the tie to the reference: small lets the policy move further
label_smoothing = 0.0  # robust: the share of pairs taken to be flipped, in [0, 0.5)
sft_coef = 0.0  # weight of the chosen reply's NLL per token (RPO; 0 = off)
precompute_ref = True  # the reference's log-probs once before training (then no reference model); else live
eval_pairs = 1000  # held-out pairs per folder measured at each eval (0 = all)
# eval
eval_prompts = 1000  # dev task prompts (val.jsonl) answered greedily at each eval, over every cell (0 = none)
test_prompts = 10000  # test task prompts (test.jsonl) answered once at the end by best.pt, over every cell (0 = none)
eval_max_new_tokens = 40  # the longest eval answer
pass_k_prompts = 100  # held-out prompts of the rl_tasks cells for pass@k (0 = none)
pass_k_samples = 8  # n answers per prompt at temperature 1 for pass@1, 4, 8
eval_batch_size = 256  # rows per generate call in the eval
eval_show = 12  # examples appended to out_dir/samples.txt at each eval
# optimizer
learning_rate = 3e-5  # peak
max_iters = 300  # total iterations
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0  # clip the global gradient norm to this (0 = off)
# schedule
decay_lr = True  # linear warmup, then cosine to min_lr
warmup_iters = 10
lr_decay_iters = 300  # usually max_iters
min_lr = 3e-6  # usually learning_rate / 10
# system
backend = "auto"  # DDP backend: auto (nccl on CUDA, gloo otherwise) | nccl | gloo
device = "auto"  # auto | cpu | cuda | cuda:1 | mps
dtype = "auto"  # auto | float32 | bfloat16 | float16
compile = True  # torch.compile the model (skipped on CPU and MPS)
seed = 1337
# -----------------------------------------------------------------------------
config = configure(globals())
# -----------------------------------------------------------------------------

if loss_type not in ("sigmoid", "ipo", "hinge", "robust"):
    sys.exit(f"config error: loss_type must be sigmoid | ipo | hinge | robust, got {loss_type!r}")
if beta <= 0:
    sys.exit(f"config error: beta must be > 0, got {beta}")
if not 0 <= label_smoothing < 0.5 or (label_smoothing > 0 and loss_type != "robust"):
    sys.exit(f"config error: label_smoothing must be in [0, 0.5) and is robust's only (loss_type={loss_type}), "
             f"got {label_smoothing}")
if sft_coef < 0 or batch_size < 1 or eval_pairs < 0:
    sys.exit("config error: need sft_coef >= 0, batch_size >= 1, eval_pairs >= 0")
if rl_cell_weights not in ("uniform", "rows"):
    sys.exit(f"config error: rl_cell_weights must be uniform | rows, got {rl_cell_weights!r}")
ddp, grad_accum, dtype, ctx, compile = common.setup(device, backend, dtype, compile, seed,
                                                    gradient_accumulation_steps, out_dir)
master = ddp.master

# -----------------------------------------------------------------------------
# the policy to start from, its reference, the pairs and the task prompts

# the reference is the starting policy; a resumed run, or a DPO checkpoint being measured, names its own
ckpt, ckpt_path, resumed, tok, reference_path = posttrain.post_training_start(init_from, out_dir, eval_only, master)
meta = ckpt["meta"]
block_size = ckpt["model_args"]["block_size"]
pad_id = tok.special_id("<|endoftext|>")

folders = [common.data_dir(f) for f in preference_dataset]
for folder in folders:  # the master builds what is missing (build_pairs), the others wait for it
    build = ["data/preferences/prepare.py", *shlex.split(build_pairs), f"--out_dir={folder}"] if build_pairs else None
    common.prepare_missing(folder, ("train.jsonl", "val.jsonl"), ddp, build,
                           "make the pairs with data/preferences/prepare.py, or set build_pairs")
try:
    # inputs are a conversation's tokens but its last: block_size + 1 tokens fit
    train_pairs, val_pairs = preference_splits(folders, tok, block_size + 1, eval_pairs, train=not eval_only,
                                               verbose=master)
except (ValueError, FileNotFoundError) as e:
    sys.exit(f"data error: {e}")
if not eval_only and not train_pairs:
    sys.exit("data error: no training pairs left")
# the task prompts: val.jsonl is the dev split of the evals during training, test.jsonl (when there
# is one) the test split answered once at the end
prompts = posttrain.rl_prompts(prompt_dataset, rl_tasks, tok, ddp, eval_prompts, pass_k_prompts, test_prompts)
# rl_cell_weights=uniform: each cell as often as the others
cells = [posttrain.cell_key(row) for _, _, row in train_pairs] if rl_cell_weights == "uniform" else None
stream = posttrain.EpochStream(len(train_pairs), seed, batch_size, grad_accum, ddp, cells=cells)

try:
    model = common.model_from_checkpoint(ckpt, ckpt_path, None if resumed else common.training_args(config),
                                         quantize=quantize, quant_group_size=quant_group_size, trains=not eval_only)
    reference = posttrain.Reference(model, reference_path, ddp.device)  # with LoRA: the policy, adapters off
except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
if master:
    print(f"reference: {reference}{', precomputed' if precompute_ref else ', live'}")
raw_model, model, optimizer, scaler = common.prepare_training(model, ddp, dtype, compile, weight_decay, learning_rate,
                                                              (beta1, beta2), resume_from=ckpt if resumed else None,
                                                              dynamic=True, ctx=ctx)

# -----------------------------------------------------------------------------
# the summed log-probs of the replies


def reply_batch(pairs):
    """pairs -> inputs (2B, T - 1), the chosen conversations first, then the rejected; targets
    (2B, T - 1), the next token where it is a reply token (the reply's <|end|> included) and -1 on
    the prompt and the padding, so that they carry no log-prob; n (2B,) the reply tokens per row."""
    idx, mask, _ = pair_batch(pairs, pad_id, ddp.device)
    targets = idx[:, 1:].masked_fill(~mask[:, 1:], -1)
    return idx[:, :-1], targets, mask[:, 1:].sum(1)


@torch.no_grad()
def reply_logps(logprobs, pairs):
    """The summed reply log-probs of pairs, batch_size pairs a forward -> (N, 2): chosen, rejected.
    logprobs(inputs, targets) gives the per-token log-probs of a batch."""
    out = [torch.zeros(0, 2, device=ddp.device)]
    for k in range(0, len(pairs), batch_size):
        inputs, targets, _ = reply_batch(pairs[k : k + batch_size])
        with ctx:
            logp = logprobs(inputs, targets).sum(1)  # (2B,)
        out.append(logp.float().view(2, -1).t())
    return torch.cat(out)


def policy_logps(pairs):
    """(N, 2) under the policy, in eval mode (as the reference is scored)."""
    raw_model.eval()
    try:
        return reply_logps(lambda inputs, targets: raw_model.logprobs(raw_model(inputs), targets,
                                                                      vocab_limit=tok.n_vocab)[0], pairs)
    finally:
        raw_model.train()


def reference_logps(pairs):
    """(N, 2) under the reference: the frozen starting policy, or the policy with its adapters off."""
    return reply_logps(lambda inputs, targets: reference.logprobs(inputs, targets, None, 1.0, tok.n_vocab), pairs)


ref_train, ref_val = None, {}
if precompute_ref:  # each process scores a share of the pairs; every process keeps all of them
    t0 = time.time()
    parts = ddp.gather_objects(reference_logps(train_pairs[ddp.rank :: ddp.world_size]).cpu())
    ref_train = torch.zeros(len(train_pairs), 2)
    for rank, part in enumerate(parts):
        ref_train[rank :: ddp.world_size] = part
    ref_train = ref_train.to(ddp.device)
    ref_val = {name: reference_logps(pairs[ddp.rank :: ddp.world_size]) for name, pairs in val_pairs.items()}
    reference = None  # no reference model in memory from here on
    if master:
        print(f"reference log-probs of {len(train_pairs)} train pairs and "
              f"{sum(map(len, val_pairs.values()))} val pairs in {time.time() - t0:.1f}s")


def checkpoint():
    common.save_training_checkpoint(os.path.join(out_dir, "ckpt.pt"), ddp, raw_model, optimizer, scaler, ctx.dtype,
                                    **loop.state(), config=config, meta=meta, stage="dpo", reference=reference_path)


def save_best():
    common.save_weights(os.path.join(out_dir, "best.pt"), ddp, raw_model, iter_num=loop.iter_num,
                        best_metric=loop.best_metric, config=config, meta=meta, stage="dpo",
                        reference=reference_path)


loop = common.Loop(config, ddp, ckpt if resumed else None, checkpoint, save_best,
                   metric="err_rl" if prompts["dev"] else "val_loss")
ckpt = None  # free it
evals = posttrain.Evals(tok, ctx, eval_batch_size, eval_max_new_tokens, pass_k_samples, eval_show, rl_tasks, seed,
                        out_dir)

# -----------------------------------------------------------------------------
# evaluation: the implicit reward on held-out pairs, the greedy answers on the task prompts


def reward_stats(policy, r_c, r_r):
    """The means the log takes of the replies' summed log-probs policy (N, 2) and their implicit
    rewards r_c, r_r (N,): how often chosen leads counts strict leads (0 while policy = reference)."""
    return {"reward_chosen": r_c.mean(), "reward_rejected": r_r.mean(), "margin": (r_c - r_r).mean(),
            "acc": (r_c > r_r).float().mean(), "logp_chosen": policy[:, 0].detach().mean(),
            "logp_rejected": policy[:, 1].detach().mean()}


def evaluate_pairs():
    """Each folder's held-out pairs (each process a share): the DPO loss, the implicit rewards, how
    often chosen leads, the replies' log-probs -> the flat dict the log takes."""
    out, pooled, pooled_n = {}, 0.0, 0
    for name, pairs in val_pairs.items():
        mine = pairs[ddp.rank :: ddp.world_size]
        policy = policy_logps(mine)
        ref = ref_val[name] if precompute_ref else reference_logps(mine)
        n = torch.tensor([[sum(c[1][1:]), sum(r[1][1:])] for c, r, _ in mine], dtype=torch.float32).view(-1, 2)
        part = torch.cat(ddp.gather_objects(torch.cat((policy.cpu(), ref.cpu(), n), dim=1)))  # (N, 6)
        if len(part) == 0:
            continue
        policy, ref, n = part[:, 0:2], part[:, 2:4], part[:, 4:6]
        loss, r_c, r_r = losses.dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta, loss_type,
                                         label_smoothing, n[:, 0], n[:, 1])
        stats = {"val_loss": loss.mean().item(), **{k: v.item() for k, v in reward_stats(policy, r_c, r_r).items()}}
        out.update({(f"{name}/" if len(val_pairs) > 1 else "") + k: v for k, v in stats.items()})
        pooled, pooled_n = pooled + stats["val_loss"] * len(part), pooled_n + len(part)
    if len(val_pairs) > 1:  # the pooled loss
        out = {"val_loss": pooled / max(pooled_n, 1), **out}
    return out


# -----------------------------------------------------------------------------
# training loop

while True:
    lr = loop.lr(optimizer)
    if loop.eval_due():
        t_eval = time.time()
        pair_eval = evaluate_pairs()
        loop.log("eval", **pair_eval, lr=lr, s=time.time() - t_eval)
        answer_eval = posttrain.evaluate_rl(loop, raw_model, prompts["dev"], prompts["pass_dev"], evals,
                                            evaluated=False)
        # best.pt follows the greedy answers; with no task prompts to answer, the held-out pairs' loss
        loop.evaluated(answer_eval.get("err_rl", pair_eval.get("val_loss", math.inf)))
    if loop.done():
        break

    # ---- the training step --------------------------------------------------------------
    total, metrics, n_tokens = torch.zeros((), device=ddp.device), {}, 0
    for micro_step in range(grad_accum):
        rows = stream.indices(loop.iter_num, micro_step)
        pairs = [train_pairs[i] for i in rows]
        B = len(pairs)
        inputs, targets, n = reply_batch(pairs)
        ref = ref_train[rows] if precompute_ref else reference_logps(pairs)  # (B, 2), no gradient
        if ddp.enabled:  # gradients are averaged across processes only on the last micro-step
            model.require_backward_grad_sync = micro_step == grad_accum - 1
        with ctx:
            x = model(inputs)  # chosen and rejected in one forward
            logp = raw_model.logprobs(x, targets, vocab_limit=tok.n_vocab)[0].sum(1)  # (2B,) reply tokens only
            policy = logp.view(2, B).t()  # (B, 2): chosen, rejected
            loss, r_c, r_r = losses.dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta, loss_type,
                                             label_smoothing, n[:B], n[B:])  # <- the preference loss, per pair
            objective = loss.mean()
            stats = reward_stats(policy, r_c, r_r)
            if sft_coef > 0:  # <- RPO: also raise the chosen reply, so both likelihoods cannot fall together
                stats["nll"] = losses.rpo_nll(policy[:, 0], n[:B]).mean()
                objective = objective + sft_coef * stats["nll"]
            objective = objective / grad_accum
            total += objective.detach()
            objective = objective + raw_model.aux_loss() / grad_accum  # MoE: plus its load-balancing terms
        scaler.scale(objective).backward()
        for k, v in stats.items():
            metrics[k] = metrics.get(k, 0.0) + v.detach().float() / grad_accum
        n_tokens += sum(len(c[0]) + len(r[0]) for c, r, _ in pairs)
    grad_norm = common.optimizer_step(raw_model, optimizer, scaler, grad_clip)
    # --------------------------------------------------------------------------------------

    # the metrics of the whole batch, every process's pairs (one all-reduce of a few numbers)
    names = list(metrics)
    values = ddp.all_reduce_mean(torch.stack([metrics[k] for k in names])).tolist()
    # FLOPs: the forward and backward, plus a live reference's forward (a third of that)
    flops = raw_model.flops_per_token(inputs.size(1)) * n_tokens * (1 if precompute_ref else 4 / 3)
    if loop.step_done(total, tokens=n_tokens, flops=flops, **dict(zip(names, values)), grad_norm=grad_norm, lr=lr,
                      **(raw_model.moe_stats() or {})):  # MoE: the routing of the last micro-step
        break

posttrain.evaluate_test(loop, raw_model, prompts["test"], prompts["pass_test"], evals)
loop.close(raw_model)
