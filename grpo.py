"""
GRPO, Group Relative Policy Optimization: reinforcement learning on rewards that can be checked.
For each prompt sample a group of G completions, score them, and push up the ones that beat their
group, with PPO's clipped ratio and an explicit KL to a frozen reference, and no value function.

Reads a checkpoint to start from (init_from: sft.py's, normally; a Hugging Face folder gets the chat
tokens appended, as in sft.py, and is its own reference) and prompts with reference answers
(prompt_dataset: conversations with an "answer" field, data/tasks's format), of which rl_tasks picks
the task/difficulty cells to train on. Each iteration:

    rollout     prompts_per_iter prompts x samples_per_prompt samples, all in one batched generate with the
                KV cache (a group shares its prompt's prefill), each stopping at <|end|>; the
                completion mask covers the sampled tokens up to and including <|end|>
    reward      r_i from the checker (score: partial credit, exact: 0 or 1), a reward model, or a
                weighted sum; minus missing_end_penalty where a completion ran out of tokens
    advantage   A_i = (r_i - mean of its group) / (std + 1e-4), the std the group's, the batch's
                or 1 (scale_rewards); every token of a completion gets its A_i
    update      update_epochs passes over the batch in minibatches, per completion token:
                    ratio = exp(logp - old_logp)
                    loss_t = -min(ratio A, clip(ratio, 1 - clip_eps, 1 + clip_eps_high) A)
                             + kl_coef KL_t,   KL_t = exp(ref - logp) - (ref - logp) - 1   (k3)
                aggregated by loss_type (grpo | dapo | dr_grpo, see losses.aggregate); every forward
                (reference, old, policy) runs a group's prompt once, in front of its G rows

The log-probs are those of the distribution the tokens were sampled from: softmax(logits /
temperature) over the tokenizer's ids. top_k and top_p truncate that distribution further and are
not in the log-probs: with them the update is slightly off-policy, so they default off here. With
update_epochs 1 and one minibatch the ratio is exactly 1 (old_logp is the current policy) and
the gradient is REINFORCE with the group mean as baseline. The reference is a frozen copy of the
starting policy; with LoRA the same weights with the adapters off; with kl_coef 0, none at all. A
loss near 0 is normal (advantages are centred): watch reward, kl and the held-out exact match.

Writes to out_dir: ckpt.pt (resume; stage "grpo"; sample.py loads it), best.pt (the policy with
the best greedy exact match on the held-out prompts of the trained cells), log.jsonl, samples.txt.

A run on a laptop CPU (at most 20 minutes, after sft.py config/sft_tasks.py):
    python grpo.py config/grpo_tasks.py
    python grpo.py config/grpo_tasks.py --reward=model --reward_model=out-reward/ckpt.pt --out_dir=out-grpo-rm
One GPU, or several (each process rolls out whole groups of its own prompts):
    python grpo.py --init_from=out-sft/ckpt.pt --prompts_per_iter=64 --samples_per_prompt=16
    torchrun --standalone --nproc_per_node=8 grpo.py config/grpo_tasks.py
Resume: python grpo.py config/grpo_tasks.py --init_from=resume

A healthy run prints per iteration (reward rising, kl small and growing, zero_std falling from its
start as groups stop being all right or all wrong)
    iter=40 loss=0.0012 reward=0.7431 reward_std=0.2113 em=0.5234 kl=0.0061 clip=0.0031 entropy=0.2817
        len=4.9 zero_std=0.4375 truncated=0.0000 grad_norm=0.8123 gen_s=0.31 score_s=0.01 update_s=0.62 ...
and at every eval the greedy answers per task and difficulty and pass@k on held-out prompts:
    answers iter=50 em=0.8120 score=0.8843 em/add/3=0.8000 ... err_rl=0.2650 pass@1=0.61 pass@8=0.93
"""

import os
import sys
import time

import torch

import common
import losses
import posttrain
from configurator import configure
from data.tasks.tasks import exact_match

# -----------------------------------------------------------------------------
# I/O
out_dir = "out-grpo"
init_from = "out-sft/ckpt.pt"  # a checkpoint to start from (sft.py's, normally; a Hugging Face folder) | resume
eval_interval = 25  # iterations between evaluations (and checkpoints)
log_interval = 1  # iterations between log lines
eval_only = False  # evaluate once and exit
always_save_checkpoint = True  # write ckpt.pt at every eval, not only when the eval improves
wandb_log = False
wandb_project = "llm"
wandb_run_name = "grpo"
# data
prompt_dataset = "tasks"  # a folder under data/ (or absolute) with train.jsonl, val.jsonl: prompts with answers
rl_tasks = ("add/3", "sub/2", "sub/3", "sort/2", "sort/3")  # task/difficulty cells to train on (empty: all)
rl_cell_weights = "uniform"  # uniform: each cell as often as the others | rows: in proportion to its training rows
# model: only GPTConfig's training-only fields; the architecture is the checkpoint's
dropout = 0.0  # keep 0: the ratio compares forwards of the same weights
lora_rank = 0  # > 0: train low-rank adapters only; the reference is then the base, adapters off
lora_alpha = 16.0  # adapter scale = lora_alpha / lora_rank
lora_dropout = 0.0
lora_targets = ("c_q", "c_v")  # c_q c_k c_v attn.c_proj c_fc c_gate mlp.c_proj router lm_head, or attn / mlp
moe_aux_coef = 0.01  # a MoE model: weight of its load-balancing loss in this stage's loss (a dense one has none)
moe_z_coef = 0.001  # a MoE model: weight of its router z-loss
quantize = "none"  # none | int8 | int4 weights (frozen): train LoRA on them (QLoRA) or evaluate (eval_only)
quant_group_size = 64  # int4: inputs that share one scale, 32 | 64 | 128
# rollout
prompts_per_iter = 16  # P prompts per iteration per process
samples_per_prompt = 8  # G completions sampled for each prompt: the group its advantages are taken in
max_new_tokens = 16  # the longest completion, in tokens
temperature = 1.0  # sampling temperature; the log-probs are taken at the same temperature
top_k = 0  # 0 = off (see the docstring: top_k and top_p make the update off-policy)
top_p = 1.0  # 1.0 = off
mask_truncated = True  # completions without <|end|> by max_new_tokens carry no loss (DAPO's overlong filter)
missing_end_penalty = 0.0  # subtracted from the reward of a completion without <|end|>
# reward
reward = ("score",)  # terms score | exact | model | format, optionally weighted: score,model=0.5
reward_model = "out-reward/ckpt.pt"  # reward.py's checkpoint, for the model term; several (a.pt,b.pt): an ensemble
reward_ensemble = "mean"  # mean | min: an ensemble's reward, the mean or the lowest of its members' rewards
# grpo
scale_rewards = "group"  # group | batch | none: what the centred rewards are divided by
skip_zero_std = False  # leave groups whose rewards are all equal out of the loss (they have A = 0 anyway)
loss_type = "grpo"  # grpo | dapo | dr_grpo: how per-token losses are averaged (losses.aggregate)
clip_eps = 0.2  # the ratio is clipped to [1 - clip_eps, 1 + clip_eps_high]
clip_eps_high = 0.0  # 0 = clip_eps (PPO's clip); larger is DAPO's clip-higher
kl_coef = 0.04  # weight of the k3 KL to the reference per token (0 = no reference at all)
update_epochs = 1  # mu: optimizer passes over each rollout batch (TRL's num_iterations)
num_minibatches = 1  # optimizer steps per pass (the batch of P x G completions is cut into these)
# eval
eval_prompts = 1000  # dev prompts (val.jsonl) answered greedily at each eval, over every cell (0 = none)
test_prompts = 10000  # test prompts (test.jsonl) answered once at the end by best.pt, over every cell (0 = none)
eval_max_new_tokens = 40  # the longest eval answer
pass_k_prompts = 100  # held-out prompts of the trained cells for pass@k (0 = none)
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
decay_lr = False  # RL runs usually keep a constant rate after warmup
warmup_iters = 10
lr_decay_iters = 300  # usually max_iters
min_lr = 3e-6
# system
backend = "auto"  # DDP backend: auto (nccl on CUDA, gloo otherwise) | nccl | gloo
device = "auto"  # auto | cpu | cuda | cuda:1 | mps
dtype = "auto"  # auto | float32 | bfloat16 | float16
compile = True  # torch.compile the model (skipped on CPU and MPS)
seed = 1337
# -----------------------------------------------------------------------------
config = configure(globals())
# -----------------------------------------------------------------------------

if scale_rewards not in ("group", "batch", "none") or loss_type not in ("grpo", "dapo", "dr_grpo"):
    sys.exit("config error: scale_rewards must be group | batch | none, loss_type grpo | dapo | dr_grpo")
if rl_cell_weights not in ("uniform", "rows") or reward_ensemble not in ("mean", "min"):
    sys.exit(f"config error: rl_cell_weights must be uniform | rows (got {rl_cell_weights!r}), "
             f"reward_ensemble mean | min (got {reward_ensemble!r})")
if samples_per_prompt < 2 or prompts_per_iter < 1 or update_epochs < 1 or temperature <= 0:
    sys.exit("config error: need samples_per_prompt >= 2, prompts_per_iter >= 1, update_epochs >= 1, temperature > 0")
if not 1 <= num_minibatches <= prompts_per_iter * samples_per_prompt:
    sys.exit(f"config error: need 1 <= num_minibatches <= prompts_per_iter x samples_per_prompt = {prompts_per_iter * samples_per_prompt}")
clip_eps_high = clip_eps_high or clip_eps
if not 0 < clip_eps < 1 or clip_eps_high < clip_eps or kl_coef < 0:
    sys.exit("config error: need 0 < clip_eps < 1, clip_eps_high >= clip_eps (0 = clip_eps), kl_coef >= 0")
if dropout > 0 or lora_dropout > 0:  # the rollout samples without it, and the ratio compares two forwards
    sys.exit("config error: RL needs dropout = 0 and lora_dropout = 0: the ratio compares two forwards of the same weights")
ddp, _, dtype, ctx, compile = common.setup(device, backend, dtype, compile, seed, None, out_dir)
master = ddp.master

# -----------------------------------------------------------------------------
# the policy to start from, its tokenizer, and the prompts

ckpt, ckpt_path, resumed, tok, reference_path = posttrain.post_training_start(init_from, out_dir, eval_only, master)
meta = ckpt["meta"]
prompts = posttrain.rl_prompts(prompt_dataset, rl_tasks, tok, ddp, eval_prompts, pass_k_prompts, test_prompts,
                               ckpt["model_args"]["block_size"], max_new_tokens)  # train, dev and test splits
train_examples = prompts["train"]
# rl_cell_weights=uniform: each cell as often as the others
cells = [posttrain.cell_key(ex) for ex in train_examples] if rl_cell_weights == "uniform" else None
stream = posttrain.EpochStream(len(train_examples), seed, prompts_per_iter, 1, ddp, cells=cells)

# -----------------------------------------------------------------------------
# the policy, its reference, the reward

try:
    model = common.model_from_checkpoint(ckpt, ckpt_path, None if resumed else common.training_args(config),
                                         quantize=quantize, quant_group_size=quant_group_size, trains=not eval_only)
    # with LoRA the reference is the policy, adapters off; with kl_coef 0 there is none
    reference = posttrain.Reference(model, reference_path, ddp.device) if kl_coef > 0 else None
    rewarder = posttrain.TaskReward(reward, tok, ddp.device, meta, reward_model, missing_end_penalty,
                                    reward_ensemble)
except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
if master:
    print(f"reference: {reference or 'none (kl_coef 0)'}")
raw_model, model, optimizer, scaler = common.prepare_training(model, ddp, dtype, compile, weight_decay, learning_rate,
                                                              (beta1, beta2), resume_from=ckpt if resumed else None,
                                                              dynamic=True, ctx=ctx)


def checkpoint():
    common.save_training_checkpoint(os.path.join(out_dir, "ckpt.pt"), ddp, raw_model, optimizer, scaler, ctx.dtype,
                                    **loop.state(), config=config, meta=meta, stage="grpo", reference=reference_path)


def save_best():
    common.save_weights(os.path.join(out_dir, "best.pt"), ddp, raw_model, iter_num=loop.iter_num,
                        best_metric=loop.best_metric, config=config, meta=meta, stage="grpo")


loop = common.Loop(config, ddp, ckpt if resumed else None, checkpoint, save_best, metric="err_rl")
ckpt = None  # free it
evals = posttrain.Evals(tok, ctx, eval_batch_size, eval_max_new_tokens, pass_k_samples, eval_show, rl_tasks, seed,
                        out_dir)


# -----------------------------------------------------------------------------
# training loop

N = prompts_per_iter * samples_per_prompt  # completions per iteration per process
while True:
    lr = loop.lr(optimizer)
    if loop.eval_due():  # dev split: greedy answers on every cell, pass@k on the trained cells; best.pt follows err_rl
        posttrain.evaluate_rl(loop, raw_model, prompts["dev"], prompts["pass_dev"], evals)
    if loop.done():
        break

    # ---- rollout: P prompts x G samples in one batched generate ------------------------------
    # examples[i] is the task of row i: row p * G + s is sample s of prompt p
    (examples, out), t_gen = posttrain.timed(posttrain.rollout, raw_model, train_examples, stream, loop.iter_num, ddp,
                                             ctx, tok, samples_per_prompt, max_new_tokens, temperature, top_k, top_p, seed)

    # ---- rewards and group-relative advantages ------------------------------------------------
    (rewards, reward_parts, texts), t_score = posttrain.timed(rewarder, examples, out)
    # scale_rewards=batch divides by the std of the whole batch: every process's rewards, not this one's
    batch_std = None
    if scale_rewards == "batch" and ddp.enabled:
        batch_std = torch.cat(ddp.gather_objects(rewards.cpu())).std().item()
    advantages, zero_std = losses.group_advantages(rewards, samples_per_prompt, scale_rewards, batch_std=batch_std)
    # the update reads each row from its prompt's last token on: that token's target is the first
    # completion token, and the prompt before it, the same in the G samples of a group, is run once
    # per group by every forward below (out.prefix, a sampling.Prefix), in front of the rows
    S = out.prompt_len - 1
    inputs, pos, targets = out.idx[:, S:-1], out.pos[:, S:-1], out.targets()[:, S:]
    # the completion tokens, each a target of the position before it; a completion cut off by
    # max_new_tokens says little about its answer, and mask_truncated leaves it out
    mask = out.loss_mask(drop_truncated=mask_truncated)[:, S:]
    if skip_zero_std:
        mask = mask & ~zero_std.repeat_interleave(samples_per_prompt)[:, None]

    # ---- old and reference log-probs, once per rollout -----------------------------------------
    t0 = time.time()
    reuse_old = update_epochs == 1 and num_minibatches == 1  # then old_logp is the policy itself
    old_logp = None
    if not reuse_old:
        with torch.no_grad(), ctx:
            x = raw_model(inputs, pos, prefix=out.prefix())
            old_logp = raw_model.logprobs(x, targets, temperature, tok.n_vocab)[0]
    ref_logp = None
    if reference:
        with ctx:
            ref_logp = reference.logprobs(inputs, targets, pos, temperature, tok.n_vocab, out.prefix())
    # every minibatch of every pass (each pass cuts the batch into other minibatches), and the totals
    # of each over every process, read once: DDP averages the gradients, hence the means. Dr. GRPO
    # divides by every sampled row, left-out truncated ones too: a constant
    steps_planned = posttrain.minibatches(N, num_minibatches, update_epochs, seed, ddp.rank, loop.iter_num, ddp.device)
    totals = ddp.all_reduce_mean(torch.stack([
        torch.stack((mask[mb].sum(), torch.tensor(len(mb), device=ddp.device) if loss_type == "dr_grpo"
                     else mask[mb].any(dim=1).sum())) for mb in steps_planned]).float()).tolist()

    # ---- the update: update_epochs passes over the batch, num_minibatches steps each -------
    sums = torch.zeros(4, device=ddp.device)  # clipped tokens, KL, entropy, tokens: read after the update
    loss_sum, steps, grad_norm = torch.zeros((), device=ddp.device), 0, torch.zeros(())
    for mb, (n_tokens, n_samples) in zip(steps_planned, totals):
        if n_tokens == 0:
            continue  # nothing to learn from: every completion left out
        m = mask[mb]
        prefix = out.prefix(mb if num_minibatches > 1 else None)  # one minibatch: every row, in order
        with ctx:
            x = model(inputs[mb], pos[mb], prefix=prefix)
            # the entropy is only logged here, so it is computed without a graph
            logp, entropy = raw_model.logprobs(x, targets[mb], temperature, tok.n_vocab, entropy="log")
            old = logp.detach() if reuse_old else old_logp[mb]
            per_token, clipped = losses.clipped_surrogate(logp, old, advantages[mb], clip_eps, clip_eps_high)
            kl = torch.zeros_like(logp)
            if ref_logp is not None:
                kl = losses.kl_k3(logp, ref_logp[mb])
                per_token = per_token + kl_coef * kl  # <- GRPO: the KL is in the loss, not the reward
            loss = losses.aggregate(per_token, m, loss_type, n_samples, n_tokens, max_new_tokens)
            loss = loss + raw_model.aux_loss()  # MoE: plus its load-balancing terms
        scaler.scale(loss).backward()
        grad_norm = common.optimizer_step(raw_model, optimizer, scaler, grad_clip)
        loss_sum += loss.detach()
        steps += 1
        sums += torch.stack([(clipped & m).sum(), (kl.detach() * m).sum(), (entropy * m).sum(), m.sum()]).float()
    clipped_n, kl_sum, ent_sum, tokens_seen = sums.tolist()
    t_update = time.time() - t0
    # -------------------------------------------------------------------------------------------

    n_gen = out.mask.sum().item()
    tokens_seen = max(tokens_seen, 1.0)
    if loop.step_done(loss_sum / max(steps, 1), tokens=n_gen, lr=lr, reward=rewards.mean(), reward_std=rewards.std(),
                      **reward_parts, em=sum(exact_match(ex, t) for ex, t in zip(examples, texts)) / N,
                      work=posttrain.worked_share(examples, texts),
                      kl=kl_sum / tokens_seen if ref_logp is not None else None, clip=clipped_n / tokens_seen,
                      entropy=ent_sum / tokens_seen, len=n_gen / N, zero_std=zero_std.float().mean(),
                      truncated=out.truncated.float().mean(), grad_norm=grad_norm, gen_s=t_gen, score_s=t_score,
                      update_s=t_update, rollout_tok_s=n_gen / max(t_gen, 1e-9),
                      **(raw_model.moe_stats() or {})):  # MoE: the routing of the last minibatch
        break

posttrain.evaluate_test(loop, raw_model, prompts["test"], prompts["pass_test"], evals)
loop.close(raw_model)
