"""
PPO, Proximal Policy Optimization with a learned value function: RLHF as InstructGPT does it. The
policy samples completions, a reward scores each one, a KL penalty per token keeps the policy near
the frozen starting policy, a value head predicts at every token what is still to be earned, and
GAE turns rewards and values into per-token advantages for PPO's clipped objective.

Reads a checkpoint to start from (init_from: sft.py's, normally) and prompts with reference answers
(prompt_dataset: conversations with an "answer" field, data/tasks's format), of which rl_tasks picks
the task/difficulty cells to train on. Each iteration:

    rollout     prompts_per_iter prompts x samples_per_prompt completions in one batched generate
                with the KV cache, each stopping at <|end|>
    reward      the sequence reward s from the checker (score: partial credit, exact: 0 or 1), a
                reward model, or a weighted sum; minus missing_end_penalty where a completion ran
                out of tokens; with reward_scaling divided by the running std of every s so far
    old pass    once, without gradients, on one grid: position t holds the log-prob of the token
                sampled after it (old_logp, and the reference's ref_logp) and the value V_t of the
                state before that token
    per token   r_t = -kl_coef (old_logp_t - ref_logp_t) on every completion token, plus s on the
                last one: the position whose target is <|end|>, or a truncated completion's last
                token (losses.kl_penalized_rewards); whiten_rewards scales their spread to std 1
    GAE         delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lam A_{t+1},  V = 0
                after the last token;  returns R = A + V;  A whitened over the completion tokens
                of the batch (each process's own)
    update      update_epochs passes over the batch in num_minibatches shuffled minibatches, per token:
                    ratio = exp(logp - old_logp)
                    pg_t  = -min(ratio A, clip(ratio, 1 - clip_eps, 1 + clip_eps) A)
                    vf_t  = 0.5 max((V - R)^2, (clip(V, V_old - clip_value, V_old + clip_value) - R)^2)
                    loss  = mean(pg_t) - ent_coef mean(entropy_t) + vf_coef mean(vf_t)   (token means)
                the passes stop after a minibatch whose approx_kl exceeds target_kl_stop (0 = never)
    kl_coef     fixed, or with target_kl > 0 Ziegler et al.'s controller: after each rollout it moves
                toward keeping the KL per sequence (nats, summed over its tokens) at target_kl

value_model = shared: the value head is a scalar head on the policy's own backbone (GPTConfig
scalar_head), one forward gives the log-probs and the values, one optimizer, the value loss weighted
by vf_coef, the gradient norm clipped jointly. separate: a second GPT with a scalar head, started
from the reward model (value_init = reward, InstructGPT's choice) or from init_from with a fresh head
(value_init = sft), with its own optimizer at value_learning_rate, its gradient clipped on its own;
(shared, value_learning_rate sets the head's rate alone: a fresh head learns faster than the
fine-tuned backbone it sits on);
one more forward and backward per minibatch.

The log-probs are those of the distribution the tokens were sampled from: softmax(logits /
temperature) over the tokenizer's ids, as in grpo.py (top_k and top_p make the update off-policy,
so they default off). The reference is a frozen copy of the starting policy; with LoRA the same
weights with the adapters off; with kl_coef 0, none. With update_epochs 1 and one minibatch the ratio
is 1 and nothing is clipped.

Writes to out_dir: ckpt.pt (resume; stage "ppo": the policy as a plain GPT, so sample.py loads it,
and beside it the value head or the value network, the KL coefficient and the reward statistics),
best.pt (the plain policy with the best greedy exact match on held-out prompts of the trained
cells), log.jsonl, samples.txt.

A run on a laptop CPU (at most 20 minutes, after sft.py config/sft_tasks.py):
    python ppo.py config/ppo_tasks.py
    python ppo.py config/ppo_tasks.py --reward=model --reward_model=out-reward/ckpt.pt --out_dir=out-ppo-rm
    python ppo.py config/ppo_tasks.py --value_model=separate --value_init=reward --out_dir=out-ppo-separate
One GPU, or several (each process rolls out its own prompts):
    python ppo.py --init_from=out-sft/ckpt.pt --prompts_per_iter=256 --num_minibatches=4
    torchrun --standalone --nproc_per_node=8 ppo.py config/ppo_tasks.py
Resume: python ppo.py config/ppo_tasks.py --init_from=resume

A healthy run prints per iteration (reward and true_score rising, kl small and mostly positive,
explained_var climbing from about 0 as the value head learns, clip and approx_kl small), e.g.
    iter=40 loss=0.0123 lr=3e-05 reward=0.6812 reward_score=0.6812 true_score=0.6812 em=0.4219 kl=0.0042
        kl_k3=0.0041 kl_seq=0.0253 kl_coef=0.05 entropy=0.3127 clip=0.0116 approx_kl=0.0007 vf_loss=0.0148
        vf_clip=0.0830 explained_var=0.4105 steps=4 len=5.9 truncated=0.0000 grad_norm=0.5312 ...
(made-up values, to show the shape of the line) and at every eval the greedy answers per task
and difficulty and pass@k on held-out prompts, as grpo.py:
    answers iter=50 em=0.8120 score=0.8843 em/add/3=0.8000 ... err_rl=0.2650 pass@1=0.61 pass@8=0.93
"""

import math
import os
import sys
import time
from dataclasses import asdict

import torch

import bpe
import common
import losses
import posttrain
from configurator import configure
from data.tasks import tasks

# -----------------------------------------------------------------------------
# I/O
out_dir = "out-ppo"
init_from = "out-sft/ckpt.pt"  # a checkpoint to start from (sft.py's, normally; a Hugging Face folder) | resume
eval_interval = 25  # iterations between evaluations (and checkpoints)
log_interval = 1  # iterations between log lines
eval_only = False  # evaluate once and exit
always_save_checkpoint = True  # write ckpt.pt at every eval, not only when the eval improves
wandb_log = False
wandb_project = "llm"
wandb_run_name = "ppo"
# data
prompt_dataset = "tasks"  # a folder under data/ (or absolute) with train.jsonl, val.jsonl: prompts with answers
rl_tasks = ("add/3", "sub/2", "sub/3", "sort/2", "sort/3")  # task/difficulty cells to train on (empty: all)
rl_cell_weights = "uniform"  # uniform: each cell as often as the others | rows: in proportion to its training rows
# model: only GPTConfig's training-only fields; the architecture is the checkpoint's
dropout = 0.0  # keep 0: the ratio compares forwards of the same weights
lora_rank = 0  # > 0: train low-rank adapters (and the value head) only; the reference is the base, adapters off
lora_alpha = 16.0  # adapter scale = lora_alpha / lora_rank
lora_dropout = 0.0
lora_targets = ("c_q", "c_v")  # c_q c_k c_v attn.c_proj c_fc c_gate mlp.c_proj router lm_head, or attn / mlp
moe_aux_coef = 0.01  # a MoE model: weight of its load-balancing loss in this stage's loss (a dense one has none)
moe_z_coef = 0.001  # a MoE model: weight of its router z-loss
quantize = "none"  # none | int8 | int4 frozen base weights: with lora_rank > 0, QLoRA
quant_group_size = 64  # int4: inputs that share one scale, 32 | 64 | 128
# rollout
prompts_per_iter = 64  # P prompts per iteration per process
samples_per_prompt = 1  # completions sampled for each prompt (PPO needs no group; a prompt's share its prefill)
max_new_tokens = 16  # the longest completion, in tokens
temperature = 1.0  # sampling temperature; the log-probs are taken at the same temperature
top_k = 0  # 0 = off (top_k and top_p make the update off-policy)
top_p = 1.0  # 1.0 = off
mask_truncated = False  # completions without <|end|> by max_new_tokens carry no loss at all
missing_end_penalty = 0.0  # subtracted from the reward of a completion without <|end|>
# reward
reward = ("score",)  # terms score | exact | model | format, optionally weighted: score,model=0.5
reward_model = "out-reward/ckpt.pt"  # reward.py's checkpoint, for the model term and value_init=reward; several (a.pt,b.pt): an ensemble
reward_ensemble = "mean"  # mean | min: an ensemble's reward, the mean or the lowest of its members' rewards
# ppo
value_model = "shared"  # shared: a value head on the policy's backbone | separate: a second network
value_init = "sft"  # separate's start: sft (init_from, a fresh head) | reward (reward_model, its head too)
vf_coef = 0.1  # shared: weight of the value loss beside the policy loss
kl_coef = 0.05  # weight of the KL penalty per token in the reward (with target_kl > 0, its start)
target_kl = 0.0  # > 0: adapt kl_coef toward this KL per sequence, in nats (0 = kl_coef fixed)
kl_horizon = 10000  # the controller's horizon, in sequences: how slowly kl_coef follows
whiten_rewards = False  # scale the per-token rewards' spread over the batch to std 1, keeping their mean
reward_scaling = False  # divide the sequence rewards by the running std of every one so far
gamma = 1.0  # discount per token
lam = 0.95  # GAE's lambda: 1 = the reward-to-go minus V, 0 = the one-step TD residual
clip_eps = 0.2  # the ratio is clipped to [1 - clip_eps, 1 + clip_eps]
clip_value = 0.2  # how far a value may move from its rollout value before the clipped error counts
ent_coef = 0.0  # weight of the entropy bonus (0 = none)
update_epochs = 4  # optimizer passes over each rollout batch (TRL's num_ppo_epochs)
num_minibatches = 1  # optimizer steps per pass (the batch of P x samples_per_prompt is cut into these)
target_kl_stop = 0.0  # stop the passes after a minibatch whose approx_kl exceeds this (0 = never)
# eval
eval_prompts = 1000  # dev prompts (val.jsonl) answered greedily at each eval, over every cell (0 = none)
test_prompts = 10000  # test prompts (test.jsonl) answered once at the end by best.pt, over every cell (0 = none)
eval_max_new_tokens = 40  # the longest eval answer
pass_k_prompts = 100  # held-out prompts of the trained cells for pass@k (0 = none)
pass_k_samples = 8  # n answers per prompt at temperature 1 for pass@1, 4, 8
eval_batch_size = 256  # rows per generate call in the eval
eval_show = 12  # examples appended to out_dir/samples.txt at each eval
# optimizer
learning_rate = 3e-5  # peak, of the policy (and, shared, its value head)
value_learning_rate = 3e-4  # the value head's (shared) or network's (separate) peak rate, same schedule (0 = learning_rate);
# 10x the policy's: at the policy's own rate a fresh head's explained variance stayed below 0 (README, PPO)
max_iters = 300  # total iterations
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0  # clip the gradient norm to this (0 = off): shared jointly, separate per network
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

N = prompts_per_iter * samples_per_prompt  # completions per iteration per process
rules = {  # each broken rule is one clause of the message
    "value_model must be shared | separate": value_model in ("shared", "separate"),
    "rl_cell_weights must be uniform | rows": rl_cell_weights in ("uniform", "rows"),
    "reward_ensemble must be mean | min": reward_ensemble in ("mean", "min"),
    "value_init must be sft | reward": value_init in ("sft", "reward"),
    "value_init=reward starts a separate value network: set value_model=separate":
        value_init == "sft" or value_model == "separate",
    "need prompts_per_iter >= 1 and samples_per_prompt >= 1": prompts_per_iter >= 1 and samples_per_prompt >= 1,
    "need update_epochs >= 1": update_epochs >= 1,
    f"need 1 <= num_minibatches <= prompts_per_iter x samples_per_prompt = {N}": 1 <= num_minibatches <= N,
    "need temperature > 0": temperature > 0,
    "RL needs dropout = 0 and lora_dropout = 0: the ratio compares two forwards of the same weights":
        dropout == 0 and lora_dropout == 0,
    "need 0 < clip_eps < 1 and clip_value > 0": 0 < clip_eps < 1 and clip_value > 0,
    "need 0 <= gamma <= 1 and 0 <= lam <= 1": 0 <= gamma <= 1 and 0 <= lam <= 1,
    "need kl_coef >= 0, target_kl >= 0 and kl_horizon > 0": kl_coef >= 0 and target_kl >= 0 and kl_horizon > 0,
    "target_kl > 0 adapts kl_coef by multiplying it: need kl_coef > 0": target_kl == 0 or kl_coef > 0,
    "need vf_coef, ent_coef, target_kl_stop and value_learning_rate >= 0":
        min(vf_coef, ent_coef, target_kl_stop, value_learning_rate) >= 0,
}
if not all(rules.values()):
    sys.exit("config error: " + "; ".join(rule for rule, ok in rules.items() if not ok))
shared = value_model == "shared"
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
if resumed and ("value_head" if shared else "value_model") not in ckpt:
    sys.exit(f"config error: {ckpt_path} was written with the other value_model; resume with the one it started with")

# -----------------------------------------------------------------------------
# the policy (with its value head when shared), the value network (separate), the reference, the reward

value = None
try:
    # the saved policy is a plain GPT: a shared value head is stored beside it, and goes back on here
    model = common.model_from_checkpoint(ckpt, ckpt_path, {"scalar_head": shared} if resumed else
                                         common.training_args(config, scalar_head=shared), quantize=quantize,
                                         quant_group_size=quant_group_size, trains=not eval_only, resuming=resumed)
    if shared and resumed:
        model.score_head.load_state_dict(ckpt["value_head"])
    elif resumed:  # separate: the value network as it was saved
        value = common.model_from_checkpoint({"model": ckpt["value_model"], "model_args": ckpt["value_model_args"]},
                                             ckpt_path)
    elif not shared:  # separate: from the reward model, its head included, or from init_from with a fresh head
        start, start_path = ckpt, ckpt_path
        if value_init == "reward":
            if "," in reward_model:
                raise ValueError(f"value_init=reward starts the value network from one reward model, not {reward_model}")
            start, start_path = common.load_checkpoint(reward_model), reward_model
            if start.get("stage") != "reward":
                raise ValueError(f"value_init=reward: {reward_model} is not a reward model (stage {start.get('stage')!r})")
            bpe.check_same_tokenizer(start["meta"], f"reward model {reward_model}", meta, "the policy")
        value = common.model_from_checkpoint(start, start_path, {"scalar_head": True, "dropout": dropout,
                                                                 "moe_aux_coef": moe_aux_coef, "moe_z_coef": moe_z_coef})
    if value is not None and not value.config.tie_weights:
        value.lm_head.requires_grad_(False)  # the value network reads only its scalar head
    reference = posttrain.Reference(model, reference_path, ddp.device) if kl_coef > 0 else None
    rewarder = posttrain.TaskReward(reward, tok, ddp.device, meta, reward_model, missing_end_penalty,
                                    reward_ensemble)
except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
kl_now = ckpt.get("kl_coef", kl_coef) if resumed else kl_coef  # the controller's coefficient, carried across resumes
moments = tuple(ckpt.get("reward_moments", (0, 0.0, 0.0))) if resumed else (0, 0.0, 0.0)  # of the sequence rewards
if master:
    print(f"reference: {reference or 'none (kl_coef 0)'}; value: "
          f"{'a head on the policy' if shared else f'a separate network from {ckpt_path if resumed else start_path}'}")
# a shared value head starts from nothing: it may learn faster than the fine-tuned backbone
raw_model, model, optimizer, scaler = common.prepare_training(
    model, ddp, dtype, compile, weight_decay, learning_rate, (beta1, beta2), resume_from=ckpt if resumed else None,
    dynamic=True, ctx=ctx, head_lr_scale=(value_learning_rate or learning_rate) / learning_rate if shared else 1.0)
if value is not None:
    value_state = None
    if resumed:  # its RNG is the one the policy's restore has just set: setting it again changes nothing
        value_state = {"optimizer": ckpt["value_optimizer"], "scaler": ckpt["value_scaler"], "rng": ckpt["rng"]}
    raw_value, value, value_optimizer, value_scaler = common.prepare_training(
        value, ddp, ctx.dtype, compile, weight_decay, value_learning_rate or learning_rate, (beta1, beta2),
        resume_from=value_state, dynamic=True)


def checkpoint():
    if shared:
        value_part = {"value_head": raw_model.score_head.state_dict()}
    else:
        value_part = {"value_model": raw_value.state_dict(), "value_model_args": asdict(raw_value.config),
                      "value_optimizer": value_optimizer.state_dict(), "value_scaler": value_scaler.state_dict()}
    common.save_training_checkpoint(os.path.join(out_dir, "ckpt.pt"), ddp, raw_model, optimizer, scaler, ctx.dtype,
                                    drop_scalar_head=True, **loop.state(), config=config, meta=meta, stage="ppo",
                                    reference=reference_path, kl_coef=kl_now, reward_moments=moments, **value_part)


def save_best():
    common.save_weights(os.path.join(out_dir, "best.pt"), ddp, raw_model, drop_scalar_head=True,
                        iter_num=loop.iter_num, best_metric=loop.best_metric, config=config, meta=meta, stage="ppo")


loop = common.Loop(config, ddp, ckpt if resumed else None, checkpoint, save_best, metric="err_rl")
ckpt = None  # free it
evals = posttrain.Evals(tok, ctx, eval_batch_size, eval_max_new_tokens, pass_k_samples, eval_show, rl_tasks, seed,
                        out_dir)

# -----------------------------------------------------------------------------
# training loop

while True:
    lr = loop.lr(optimizer)
    if value is not None:  # the value network's rate follows the same schedule
        common.set_lr(value_optimizer, lr * (value_learning_rate or learning_rate) / learning_rate)
    if loop.eval_due():  # dev split: greedy answers on every cell, pass@k on the trained cells; best.pt follows err_rl
        posttrain.evaluate_rl(loop, raw_model, prompts["dev"], prompts["pass_dev"], evals)
    if loop.done():
        break

    # ---- rollout: P prompts x samples_per_prompt completions in one batched generate ---------
    # examples[i] is the task of row i: row p * S + s is sample s of prompt p
    (examples, out), t_gen = posttrain.timed(posttrain.rollout, raw_model, train_examples, stream, loop.iter_num, ddp,
                                             ctx, tok, samples_per_prompt, max_new_tokens, temperature, top_k, top_p,
                                             seed)

    # ---- the sequence rewards ------------------------------------------------------------------
    (seq_rewards, reward_parts, texts), t_score = posttrain.timed(rewarder, examples, out)
    scores = seq_rewards
    if reward_scaling:  # by the std of every reward so far, on every process (so the same on each)
        moments = losses.running_moments(*moments, torch.tensor(ddp.gather_objects(seq_rewards.tolist())))
        std = math.sqrt(moments[2] / max(moments[0] - 1, 1))
        scores = seq_rewards / (std if std > 1e-6 else 1.0)  # 1 while the rewards have not varied

    # ---- once per rollout, without gradients: old log-probs, the reference's, the values --------
    t0 = time.time()
    # each row from its prompt's last token on, whose target is the first completion token; the
    # prompt before it runs in front of the rows, once per prompt (out.prefix, a sampling.Prefix)
    S = out.prompt_len - 1
    inputs, pos, targets = out.idx[:, S:-1], out.pos[:, S:-1], out.targets()[:, S:]
    # the completion tokens, each the target of the position before it (whose value is V_t); a
    # truncated completion keeps its tokens (its reward goes on its last one) unless mask_truncated
    mask = out.loss_mask(drop_truncated=mask_truncated)[:, S:]
    with torch.no_grad(), ctx:
        x = raw_model(inputs, pos, prefix=out.prefix())
        old_logp = raw_model.logprobs(x, targets, temperature, tok.n_vocab)[0]
        old_values = (raw_model.scores(x) if shared else
                      raw_value.scores(raw_value(inputs, pos, prefix=out.prefix()))) * mask
        # without a reference (kl_coef 0) the penalty is 0
        ref_logp = (reference.logprobs(inputs, targets, pos, temperature, tok.n_vocab, out.prefix()) if reference
                    else old_logp)

    # ---- per-token rewards with the KL penalty, GAE, whitened advantages ------------------------
    coef_used = kl_now  # the coefficient of this rollout's rewards, for the log
    rewards, kl = losses.kl_penalized_rewards(scores, old_logp, ref_logp, mask, kl_now)  # <- PPO: the KL is a reward
    if whiten_rewards:
        rewards = losses.whiten(rewards, mask, shift_mean=False)
    advantages, returns = losses.gae(rewards, old_values, mask, gamma, lam)
    if mask.any():
        advantages = losses.whiten(advantages, mask)
    explained_var = losses.explained_variance(old_values, returns, mask)
    # the KL per sequence, over every process, drives the controller (Ziegler et al.: n_steps = sequences)
    kl_seq_sum, n_seq = ddp.all_reduce_mean(torch.stack((kl.sum(), mask.any(dim=1).sum().float()))).tolist()
    kl_seq = kl_seq_sum / max(n_seq, 1e-9)
    if target_kl > 0:
        kl_now = losses.adaptive_kl_coef(kl_now, kl_seq, target_kl, kl_horizon, N * ddp.world_size)

    # ---- the update: update_epochs passes over the batch, num_minibatches steps each ---------------
    # every minibatch of every pass (each pass cuts the batch into other minibatches), and the
    # tokens of each over every process, read once: DDP averages the gradients, hence the mean
    steps_planned = posttrain.minibatches(N, num_minibatches, update_epochs, seed, ddp.rank, loop.iter_num, ddp.device)
    totals = ddp.all_reduce_mean(torch.stack([mask[mb].sum() for mb in steps_planned]).float()).tolist()
    sums = torch.zeros(6, device=ddp.device)  # clipped, value-clipped, entropy, vf, approx_kl, tokens: read once
    steps = 0
    loss_sum, grad_norm, value_grad_norm = torch.zeros((), device=ddp.device), torch.zeros(()), torch.zeros(())
    for mb, n_tokens in zip(steps_planned, totals):
        if n_tokens == 0:
            continue  # nothing to learn from: every completion left out
        m = mask[mb]
        prefix = out.prefix(mb if num_minibatches > 1 else None)  # one minibatch: every row, in order
        with ctx:
            x = model(inputs[mb], pos[mb], prefix=prefix)
            # the entropy bonus needs its graph; without one (ent_coef 0) it is only logged
            logp, entropy = raw_model.logprobs(x, targets[mb], temperature, tok.n_vocab,
                                               entropy=True if ent_coef > 0 else "log")
            values = raw_model.scores(x) if shared else raw_value.scores(value(inputs[mb], pos[mb], prefix=prefix))
            pg, clipped = losses.clipped_surrogate(logp, old_logp[mb], advantages[mb], clip_eps)
            vf, value_clipped = losses.clipped_value_loss(values, old_values[mb], returns[mb], clip_value)
            pg_loss = (pg * m).sum() / n_tokens  # token means over the minibatch of every process
            vf_loss = (vf * m).sum() / n_tokens
            ent = (entropy * m).sum() / n_tokens
            policy_loss = pg_loss - ent_coef * ent + raw_model.aux_loss()  # MoE: plus its balancing terms
            approx = losses.approx_kl(logp.detach(), old_logp[mb], m)
        if shared:  # one backbone, one loss, one step; the head's own gradient norm logged apart
            loss = policy_loss + vf_coef * vf_loss  # <- PPO: the value loss beside the policy's
            scaler.scale(loss).backward()
            head_grads = torch.stack([p.grad.float().norm() for p in raw_model.score_head.parameters()])
            value_grad_norm = head_grads.norm() / scaler.get_scale()  # (still fp16-scaled here)
            grad_norm = common.optimizer_step(raw_model, optimizer, scaler, grad_clip)
        else:  # two networks, two losses, two steps
            value_loss = vf_loss + raw_value.aux_loss()
            scaler.scale(policy_loss).backward()
            value_scaler.scale(value_loss).backward()
            loss = policy_loss + value_loss  # for the log
            grad_norm = common.optimizer_step(raw_model, optimizer, scaler, grad_clip)
            value_grad_norm = common.optimizer_step(raw_value, value_optimizer, value_scaler, grad_clip)
        steps += 1
        loss_sum += loss.detach()
        sums += torch.stack([(clipped & m).sum(), (value_clipped & m).sum(), (entropy.detach() * m).sum(),
                             (vf.detach() * m).sum(), approx.detach(), m.sum()]).float()
        # the policy has moved too far from the one that sampled: the rest of the batch waits
        if target_kl_stop > 0 and ddp.all_reduce_mean(approx.detach().clone()).item() > target_kl_stop:
            break
    clipped_n, value_clipped_n, ent_sum, vf_sum, approx_sum, tokens_seen = sums.tolist()
    t_update = time.time() - t0
    # -------------------------------------------------------------------------------------------

    n_gen, n_mask = out.mask.sum().item(), max(mask.sum().item(), 1)
    tokens_seen = max(tokens_seen, 1.0)
    if loop.step_done(loss_sum / max(steps, 1), tokens=n_gen, lr=lr, reward=seq_rewards.mean(), **reward_parts,
                      true_score=sum(tasks.score(ex, t) for ex, t in zip(examples, texts)) / N,
                      em=sum(tasks.exact_match(ex, t) for ex, t in zip(examples, texts)) / N,
                      work=posttrain.worked_share(examples, texts),
                      kl=kl.sum().item() / n_mask if reference else None,
                      kl_k3=(losses.kl_k3(old_logp, ref_logp) * mask).sum().item() / n_mask if reference else None,
                      kl_seq=kl_seq if reference else None, kl_coef=coef_used, entropy=ent_sum / tokens_seen,
                      clip=clipped_n / tokens_seen, approx_kl=approx_sum / max(steps, 1), vf_loss=vf_sum / tokens_seen,
                      vf_clip=value_clipped_n / tokens_seen, explained_var=explained_var, steps=steps, len=n_gen / N,
                      truncated=out.truncated.float().mean(), grad_norm=grad_norm, value_grad_norm=value_grad_norm,
                      gen_s=t_gen, score_s=t_score, update_s=t_update, rollout_tok_s=n_gen / max(t_gen, 1e-9),
                      **(raw_model.moe_stats() or {})):  # MoE: the policy's routing in the last minibatch
        break

if value is not None:
    ddp.check_in_sync(raw_value)
posttrain.evaluate_test(loop, raw_model, prompts["test"], prompts["pass_test"], evals)
loop.close(raw_model)
