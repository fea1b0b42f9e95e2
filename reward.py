"""
Reward modelling: learn a scalar score of how good a reply is from pairs of replies where one was
preferred, the first stage of RLHF after SFT.

Reads a checkpoint to start from (init_from: sft.py's, the normal case, or any of this repository)
and preference pairs: the train.jsonl and val.jsonl of each folder in preference_dataset, one pair per
line in TRL's format ({"prompt", "chosen", "rejected"}, optional "margin", "task", "difficulty",
"answer", "format"; data/preferences/prepare.py writes them for the task family). The model is the
GPT backbone with a scalar head (GPTConfig.scalar_head) read at the last real token of each rendered
conversation, the assistant's closing <|end|>, the one token that has seen the whole reply: a
causal backbone read at its last token, as InstructGPT and TRL build reward models (the seed
curriculum calls the reward model an encoder; this is the design we build). Chosen and rejected
replies of a batch go through the model in one forward. Two options give it a view of the steps
of a worked solution: reward_read=lines reads the head at every line end of the reply too and
takes the mean (posttrain.read_positions), so that each step is judged where it is written, a
one-digit local check; lm_coef adds the chosen replies' next-token loss, a verifier that also
learns to generate what good replies look like (Cobbe et al. 2021 found it helps).

Writes to out_dir: ckpt.pt (for resume, stage "reward"), best.pt (the weights with the best val
loss), log.jsonl. Both store reward_mean and reward_std, the reward's mean and std over training
answers, so the RL stages can normalise it: posttrain.RewardModel loads a checkpoint as a scorer.

A tiny run on a laptop CPU (about 5 minutes, after sft.py config/sft_tasks.py and the pairs):
    python data/preferences/prepare.py --source=rules
    python data/preferences/prepare.py --source=policy --init_from=out-sft/ckpt.pt
    python reward.py config/reward_tasks.py
One GPU, or several:
    python reward.py --init_from=out-sft/ckpt.pt --preference_dataset=my_pairs --batch_size=64
    torchrun --standalone --nproc_per_node=8 reward.py config/reward_tasks.py --gradient_accumulation_steps=8
Resume, or measure any reward checkpoint on any pair files:
    python reward.py config/reward_tasks.py --init_from=resume
    python reward.py --init_from=out-reward/ckpt.pt --eval_only=True --preference_dataset=preferences/policy \\
        --out_dir=out-reward

A healthy run prints the pairs it read (and what it left out), then
    iter=100 loss=0.2113 acc=0.9375 gap=2.8180 lr=0.0003 grad_norm=3.1415 ms=95.0 tok_s=21000 eta=3.2m
and at every eval, over the held-out pairs of each folder: the loss, pairwise accuracy (overall,
per task and difficulty, and on a mixed dataset by the forms of chosen-rejected: acc/worked-direct
is the pairs of a worked solution over a direct answer, n/worked-direct their count), mean reward
gap r_c - r_r, Spearman correlation between the reward and the checker's score of every held-out
answer, and the expected calibration error of sigmoid(r_c - r_r) as the probability that chosen
wins:
    eval iter=1000 val_loss=0.1402 acc=0.9612 gap=4.1200 spearman=0.8512 ece=0.0311 rules/acc=0.98 ...
"""

import math
import os
import sys
import time

import torch

import common
import losses
import posttrain
from configurator import configure
from conversations import pair_batch, preference_splits
from data.tasks.tasks import reply_form, score

# -----------------------------------------------------------------------------
# I/O
out_dir = "out-reward"
init_from = "out-sft/ckpt.pt"  # a checkpoint to start from (sft.py's, normally; a Hugging Face folder) | resume
eval_interval = 250  # iterations between evaluations (and checkpoints)
log_interval = 10  # iterations between log lines
eval_only = False  # evaluate once and exit
always_save_checkpoint = True  # write ckpt.pt at every eval, not only when val loss improves
wandb_log = False
wandb_project = "llm"
wandb_run_name = "reward"
# data
preference_dataset = ("preferences/rules",)  # folders under data/ (or absolute) with train.jsonl, val.jsonl
gradient_accumulation_steps = 1  # micro-steps per iteration, summed over all processes
batch_size = 32  # pairs per micro-step per process (each pair is two conversations)
# model: only GPTConfig's training-only fields; the architecture is the checkpoint's
dropout = 0.0
lora_rank = 0  # > 0: train low-rank adapters (and the scalar head) only
lora_alpha = 16.0  # adapter scale = lora_alpha / lora_rank
lora_dropout = 0.0
lora_targets = ("c_q", "c_v")  # c_q c_k c_v attn.c_proj c_fc c_gate mlp.c_proj router lm_head, or attn / mlp
moe_aux_coef = 0.01  # a MoE model: weight of its load-balancing loss in this stage's loss (a dense one has none)
moe_z_coef = 0.001  # a MoE model: weight of its router z-loss
quantize = "none"  # none | int8 | int4 weights (frozen): train LoRA on them (QLoRA) or evaluate (eval_only)
quant_group_size = 64  # int4: inputs that share one scale, 32 | 64 | 128
# reward
loss_type = "bt"  # bt (Bradley-Terry) | margin_ranking | bt_margin (Bradley-Terry with a margin, Llama 2)
margin = 1.0  # the margin m of a pair without a margin field (margin_ranking, bt_margin)
center_coef = 0.0  # adds center_coef * mean((r_c + r_r)^2) to the training loss, keeping rewards centred (0 = off)
reward_read = "end"  # end: the head at the reply's <|end|> | lines: its mean over every line end too (posttrain.read_positions)
lm_coef = 0.0  # adds lm_coef * the chosen reply's next-token loss (a verifier that also generates, Cobbe et al. 2021)
eval_pairs = 2000  # held-out pairs per folder measured at each eval (0 = all)
calibration_bins = 10  # bins of sigmoid(r_c - r_r) for the calibration error
stats_pairs = 1000  # training pairs whose answers give the reward's mean and std for the checkpoint
# optimizer
learning_rate = 3e-4  # peak
max_iters = 1000  # total iterations
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0  # clip the global gradient norm to this (0 = off)
# schedule
decay_lr = True  # linear warmup, then cosine to min_lr
warmup_iters = 50
lr_decay_iters = 1000  # usually max_iters
min_lr = 3e-5  # usually learning_rate / 10
# system
backend = "auto"  # DDP backend: auto (nccl on CUDA, gloo otherwise) | nccl | gloo
device = "auto"  # auto | cpu | cuda | cuda:1 | mps
dtype = "auto"  # auto | float32 | bfloat16 | float16
compile = True  # torch.compile the model (skipped on CPU and MPS)
seed = 1337
# -----------------------------------------------------------------------------
config = configure(globals())
# -----------------------------------------------------------------------------

if loss_type not in ("bt", "margin_ranking", "bt_margin"):
    sys.exit(f"config error: loss_type must be bt | margin_ranking | bt_margin, got {loss_type!r}")
if batch_size < 1 or eval_pairs < 0 or calibration_bins < 1 or center_coef < 0 or lm_coef < 0:
    sys.exit("config error: need batch_size >= 1, eval_pairs >= 0, calibration_bins >= 1, center_coef >= 0, lm_coef >= 0")
if reward_read not in posttrain.READS:
    sys.exit(f"config error: reward_read must be {' | '.join(posttrain.READS)}, got {reward_read!r}")
ddp, grad_accum, dtype, ctx, compile = common.setup(device, backend, dtype, compile, seed,
                                                    gradient_accumulation_steps, out_dir)
master = ddp.master

# -----------------------------------------------------------------------------
# the checkpoint to start from, and the pairs rendered by its chat template

ckpt, ckpt_path, resumed, tok, _ = posttrain.post_training_start(init_from, out_dir, verbose=master)
meta = ckpt["meta"]
block_size = ckpt["model_args"]["block_size"]
pad_id = tok.special_id("<|endoftext|>")
line_ids = posttrain.line_end_ids(tok, ddp.device)  # where reward_read=lines reads too
try:
    train_pairs, val_pairs = preference_splits([common.data_dir(f) for f in preference_dataset], tok, block_size,
                                               eval_pairs, train=not eval_only, verbose=master)
except (ValueError, FileNotFoundError) as e:
    sys.exit(f"data error: {e}")
if not eval_only and not train_pairs:
    sys.exit("data error: no training pairs left")
stream = posttrain.EpochStream(len(train_pairs), seed, batch_size, grad_accum, ddp)


def pair_margins(pairs):
    return torch.tensor([row.get("margin", margin) for _, _, row in pairs], dtype=torch.float32, device=ddp.device)


# -----------------------------------------------------------------------------
# model, optimizer, checkpoint

try:
    train_args = None if resumed else common.training_args(config, scalar_head=True)  # a fresh scalar head
    model = common.model_from_checkpoint(ckpt, ckpt_path, train_args, quantize=quantize,
                                         quant_group_size=quant_group_size, trains=not eval_only)
except ValueError as e:
    sys.exit(f"init_from: {e}")
if not model.config.scalar_head:
    sys.exit(f"{ckpt_path} is a resume checkpoint without a scalar head: not a reward model")
base = ckpt.get("base", ckpt_path) if resumed else init_from
raw_model, model, optimizer, scaler = common.prepare_training(model, ddp, dtype, compile, weight_decay, learning_rate,
                                                              (beta1, beta2), resume_from=ckpt if resumed else None,
                                                              dynamic=True, ctx=ctx)


@torch.no_grad()
def rewards_of(pairs):
    """(r_chosen, r_rejected) of pairs, in eval mode, batched."""
    raw_model.eval()
    rc, rr = [], []
    for k in range(0, len(pairs), batch_size):
        idx, mask, _ = pair_batch(pairs[k : k + batch_size], pad_id, ddp.device)
        with ctx:
            r = posttrain.read_reward(raw_model.scores(raw_model(idx)), posttrain.read_positions(idx, mask, reward_read,
                                                                                                   line_ids))
        n = r.size(0) // 2
        rc.append(r[:n].float())
        rr.append(r[n:].float())
    raw_model.train()
    return torch.cat(rc), torch.cat(rr)


def reward_stats():
    """The mean and std of the reward over the answers of the first stats_pairs training pairs, for
    the RL stages to normalise by (the same pairs every time, so the numbers compare)."""
    if not train_pairs:
        return {}
    rc, rr = rewards_of(train_pairs[:stats_pairs])
    r = torch.cat((rc, rr))
    return {"reward_mean": r.mean().item(), "reward_std": r.std().item() if r.numel() > 1 else 1.0}


def checkpoint():
    common.save_training_checkpoint(os.path.join(out_dir, "ckpt.pt"), ddp, raw_model, optimizer, scaler, ctx.dtype,
                                    **loop.state(), **reward_stats(), config=config, meta=meta, stage="reward",
                                    base=base)


def save_best():
    common.save_weights(os.path.join(out_dir, "best.pt"), ddp, raw_model, iter_num=loop.iter_num,
                        best_metric=loop.best_metric, **reward_stats(), config=config, meta=meta,
                        stage="reward", base=base)


loop = common.Loop(config, ddp, ckpt if resumed else None, checkpoint, save_best)
ckpt = None  # free it

# -----------------------------------------------------------------------------
# evaluation: accuracy, reward gap, rank correlation with the checker, calibration


def ranking_loss(r_c, r_r, m):
    """The ranking loss of this run (the centring term is added apart, so val losses compare)."""
    if loss_type == "bt":
        return losses.bradley_terry_loss(r_c, r_r)
    if loss_type == "bt_margin":
        return losses.bradley_terry_loss(r_c, r_r, m)
    return losses.margin_ranking_loss(r_c, r_r, m)


def accuracy_by(part, group):
    """Pairwise accuracy of (r_chosen, r_rejected, row) triples by group(row), a name or None (left
    out) -> {name: (accuracy, pairs)}, sorted by name."""
    wins = {}
    for a, b, row in part:
        name = group(row)
        if name is not None:
            wins.setdefault(name, []).append(a > b)
    return {name: (sum(v) / len(v), len(v)) for name, v in sorted(wins.items())}


def evaluate():
    """Every folder's held-out pairs (each process a share): -> the flat dict the log takes."""
    out, all_loss, all_n = {}, 0.0, 0
    for name, pairs in val_pairs.items():
        mine = pairs[ddp.rank :: ddp.world_size]
        rc, rr = rewards_of(mine) if mine else (torch.zeros(0), torch.zeros(0))
        part = [(rc[i].item(), rr[i].item(), row) for i, (_, _, row) in enumerate(mine)]
        part = [x for chunk in ddp.gather_objects(part) for x in chunk]
        if not part:
            continue
        rc = torch.tensor([a for a, _, _ in part])
        rr = torch.tensor([b for _, b, _ in part])
        rows = [row for _, _, row in part]
        m = torch.tensor([row.get("margin", margin) for row in rows])
        n = len(rows)
        stats = {"val_loss": ranking_loss(rc, rr, m).item(), "center": losses.center_loss(rc, rr).item(),
                 "acc": (rc > rr).float().mean().item(),
                 "gap": (rc - rr).mean().item()}
        cells = accuracy_by(part, lambda row: f"{row['task']}/{row.get('difficulty')}" if "task" in row else None)
        stats.update({f"acc/{cell}": acc for cell, (acc, _) in cells.items()})
        # by the forms of the two replies (chosen-rejected, e.g. worked-direct) on a dataset answered
        # either way (data/tasks --cot_share): which judgments it gets right
        kinds = accuracy_by(part, lambda row: f"{reply_form(row['chosen'])}-{reply_form(row['rejected'])}"
                            if row.get("format") == "either" else None)
        stats.update({f"acc/{kind}": acc for kind, (acc, _) in kinds.items()})
        stats.update({f"n/{kind}": n for kind, (_, n) in kinds.items()})
        # Spearman: the reward of every held-out answer against the checker's score of it
        graded = [(r, score(row, reply)) for a, b, row in part if "answer" in row
                  for r, reply in ((a, row["chosen"]), (b, row["rejected"]))]
        if graded:
            stats["spearman"] = posttrain.spearman([g[0] for g in graded], [g[1] for g in graded])
        # calibration of sigmoid(r_c - r_r), each pair in both orders, so outcomes are 1 and 0
        p = torch.sigmoid(rc - rr).tolist()
        stats["ece"], _ = posttrain.calibration(p + [1 - x for x in p], [1] * n + [0] * n, calibration_bins)
        prefix = f"{name}/" if len(val_pairs) > 1 else ""
        out.update({prefix + k: v for k, v in stats.items()})
        all_loss, all_n = all_loss + stats["val_loss"] * n, all_n + n
    if len(val_pairs) > 1:  # the pooled loss is the one best.pt follows
        out = {"val_loss": all_loss / max(all_n, 1), **out}
    return out


# -----------------------------------------------------------------------------
# training loop

while True:
    lr = loop.lr(optimizer)
    if loop.eval_due():
        t_eval = time.time()
        stats = evaluate()
        loop.log("eval", **stats, lr=lr, s=time.time() - t_eval)
        loop.evaluated(stats.get("val_loss", math.inf))
    if loop.done():
        break

    # ---- the training step --------------------------------------------------------------
    total, n_tokens = torch.zeros((), device=ddp.device), 0
    acc_gap = torch.zeros(2, device=ddp.device)  # this process's (accuracy, mean reward gap) of the iteration
    for micro_step in range(grad_accum):
        pairs = [train_pairs[i] for i in stream.indices(loop.iter_num, micro_step)]
        idx, mask, lengths = pair_batch(pairs, pad_id, ddp.device)
        if ddp.enabled:  # gradients are averaged across processes only on the last micro-step
            model.require_backward_grad_sync = micro_step == grad_accum - 1
        with ctx:
            x = model(idx)  # chosen and rejected in one forward
            r = posttrain.read_reward(raw_model.scores(x), posttrain.read_positions(idx, mask, reward_read, line_ids))
            r_c, r_r = r[: len(pairs)], r[len(pairs):]
            objective = ranking_loss(r_c, r_r, pair_margins(pairs)) / grad_accum  # <- the ranking loss
            total += objective.detach()
            if center_coef:  # rewards kept near 0: the ranking losses see only differences
                objective = objective + center_coef * losses.center_loss(r_c, r_r) / grad_accum
            if lm_coef:  # the chosen replies' tokens as next-token targets, each the target of the token before
                n = len(pairs)
                targets = torch.cat((idx[:n, 1:].masked_fill(~mask[:n, 1:], -1), idx.new_full((n, 1), -1)), dim=1)
                objective = objective + lm_coef * raw_model.loss(x[:n], targets) / grad_accum
            objective = objective + raw_model.aux_loss() / grad_accum  # MoE: plus its load-balancing terms
        scaler.scale(objective).backward()
        acc_gap += torch.stack(((r_c > r_r).float().mean(), (r_c - r_r).mean())).detach() / grad_accum
        n_tokens += int(lengths.sum())
    grad_norm = common.optimizer_step(raw_model, optimizer, scaler, grad_clip)
    # --------------------------------------------------------------------------------------

    flops = raw_model.flops_per_token(idx.size(1)) * n_tokens
    acc, gap = ddp.all_reduce_mean(acc_gap).tolist()
    if loop.step_done(total, tokens=n_tokens, flops=flops, acc=acc, gap=gap, lr=lr, grad_norm=grad_norm,
                      **(raw_model.moe_stats() or {})):  # MoE: the routing of the last micro-step
        break

loop.close(raw_model)
