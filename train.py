"""
Pretraining: next-token prediction on a tokenized corpus.

Reads data/<dataset>/{train.bin,val.bin,meta.json} (written by a data/*/prepare.py script; for
tiny_shakespeare it is run for you when missing). Writes to out_dir: ckpt.pt (the latest state,
for resume), best.pt (the weights with the best val loss) and log.jsonl (one JSON object per log
line).

A tiny run on a laptop CPU (about 5 minutes):
    python train.py config/tiny_shakespeare.py
One GPU (nanoGPT's shakespeare_char scale):
    python train.py config/tiny_shakespeare_gpu.py
Several GPUs on one node, or two nodes (run the second command on each node, with its rank):
    torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m.py
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=10.0.0.1 --master_port=29500 \
        train.py config/gpt2_124m.py
Resume, or fine-tune from a checkpoint (with LoRA, say, or LoRA on an int4 base: QLoRA), or measure one:
    python train.py config/tiny_shakespeare.py --init_from=resume
    python train.py --init_from=out/ckpt.pt --lora_rank=8 --learning_rate=1e-3 --out_dir=out-lora
    python train.py --init_from=out/ckpt.pt --lora_rank=8 --quantize=int4 --learning_rate=1e-3 --out_dir=out-qlora
    python train.py config/tiny_shakespeare.py --init_from=out-shakespeare/best.pt --eval_only=True --quantize=int8 \
        --out_dir=out-eval-int8

A mixture-of-experts model (8 experts, top-2, as many active parameters per token as the dense
config), a hybrid dense/MoE stack, and the dense config beside the MoE one, one thread each, then
the two compared (README, Mixture-of-experts):
    python train.py config/tiny_shakespeare_moe.py
    python train.py config/tiny_shakespeare.py --n_expert=4 --moe_every=2 --out_dir=out-hybrid
    OMP_NUM_THREADS=1 python train.py config/tiny_shakespeare.py --dtype=float32 --out_dir=out-moe-dense &
    OMP_NUM_THREADS=1 python train.py config/tiny_shakespeare_moe.py --dtype=float32 & wait
    python report.py --stages= --compare=dense=out-moe-dense,moe=out-shakespeare-moe --out=moe.md

A healthy run prints the resolved config, then lines such as (loss is the cross-entropy)
    iter=100 loss=2.4012 lr=0.0010 grad_norm=0.5123 ms=105.2 tok_s=18700 mfu=0.21 eta=4.1m
a MoE model with the routing of its last micro-step beside it: the load-balancing loss (1 when the
load is even), the router z-loss, and the coefficient of variation of the load over the experts (0
when even); the load per expert goes to log.jsonl only (config/tiny_shakespeare_moe.py, float32):
    iter=20 loss=4.3423 lr=0.0004 grad_norm=2.2444 aux_loss=1.0576 z_loss=4.7515 load_cv=0.9697 ms=...
and at every eval_interval
    eval iter=250 train_loss=1.9803 val_loss=2.0712 val_ppl=7.9363
"""

import math
import os
import sys
import time
from dataclasses import fields

import numpy as np
import torch

import bpe
import common
import losses
from configurator import configure
from model import GPT, GPTConfig, cross_entropy
from quantize import quantize_model

# -----------------------------------------------------------------------------
# I/O
out_dir = "out"
init_from = "scratch"  # scratch | resume (from out_dir/ckpt.pt) | path to a checkpoint to start from
eval_interval = 250  # iterations between evaluations (and checkpoints)
log_interval = 10  # iterations between log lines
eval_iters = 200  # batches per split in each evaluation
eval_only = False  # evaluate once and exit
always_save_checkpoint = True  # write ckpt.pt at every eval, not only when val loss improves
eval_sample_tokens = 0  # tokens of greedy text printed at each eval (0 = none)
wandb_log = False
wandb_project = "llm"
wandb_run_name = "train"
# data
dataset = "tiny_shakespeare/byte"  # a folder under data/ (or an absolute path) with train.bin, val.bin, meta.json
gradient_accumulation_steps = 1  # micro-steps per iteration, summed over all processes
batch_size = 12  # sequences per micro-step per process
block_size = 256  # tokens per sequence
# model: GPTConfig's fields by their own names (vocab_size comes from meta.json)
n_layer = 6
n_head = 6
n_embd = 384
n_kv_head = None  # None = n_head
dropout = 0.0
bias = False
pos_emb = "rope"  # learned | sinusoidal | rope | none
rope_theta = 10000.0
norm = "rmsnorm"  # layernorm | rmsnorm
mlp = "swiglu"  # gelu | swiglu
tie_weights = True
sliding_window = None  # None = full causal attention
n_sink = 0
# mixture-of-experts: n_expert > 0 replaces the MLP of every moe_every-th layer by routed experts
n_expert = 0  # routed experts per MoE layer; 0 = a dense MLP in every layer
n_expert_active = 2  # top-k: the routed experts each token goes through
moe_every = 1  # 1 = every layer MoE; k = layers k-1, 2k-1, ... (a hybrid dense/MoE stack)
n_shared_expert = 0  # experts every token goes through besides its routed ones (DeepSeekMoE)
expert_hidden = None  # None = the dense MLP's hidden size split over the experts a token uses (equal active parameters)
moe_aux_coef = 0.01  # weight of the Switch Transformer load-balancing loss
moe_z_coef = 0.001  # weight of the router z-loss
lora_rank = 0  # > 0: train low-rank adapters only (on a checkpoint, via init_from)
lora_alpha = 16.0  # adapter scale = lora_alpha / lora_rank
lora_dropout = 0.0
lora_targets = ("c_q", "c_v")  # c_q c_k c_v attn.c_proj c_fc c_gate mlp.c_proj router lm_head, or attn / mlp
# distillation: learn from a teacher's distribution too (empty teacher: off)
teacher = ""  # a checkpoint of this repository with the same tokenizer (train.py's or sft.py's)
distill_alpha = 0.5  # loss = (1 - alpha) * CE + alpha * T^2 * D(teacher_T || student_T)
distill_temperature = 2.0  # T, the temperature of both distributions in the distillation term
distill_loss = "forward_kl"  # forward_kl | reverse_kl | jsd (the generalized JSD of GKD)
distill_beta = 0.5  # jsd's interpolation: m = beta p + (1 - beta) q
quantize = "none"  # none | int8 | int4 weights (frozen): train LoRA on them (QLoRA) or evaluate (eval_only)
quant_group_size = 64  # int4: inputs that share one scale, 32 | 64 | 128
# optimizer
learning_rate = 1e-3  # peak
max_iters = 5000  # total iterations
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0  # clip the global gradient norm to this (0 = off)
# schedule
decay_lr = True  # linear warmup, then cosine to min_lr
warmup_iters = 100
lr_decay_iters = 5000  # usually max_iters
min_lr = 1e-4  # usually learning_rate / 10
# system
backend = "auto"  # DDP backend: auto (nccl on CUDA, gloo otherwise) | nccl | gloo
device = "auto"  # auto | cpu | cuda | cuda:1 | mps
dtype = "auto"  # auto (GPU: bf16, fp16 on older ones; CPU: bf16 where a timed step is faster) | float32 | bfloat16 | float16
compile = True  # torch.compile the model (skipped on CPU and MPS)
grad_checkpointing = False  # recompute each block in the backward pass instead of keeping its activations
seed = 1337
# -----------------------------------------------------------------------------
config = configure(globals())
# -----------------------------------------------------------------------------

if teacher and grad_checkpointing:
    sys.exit("config error: grad_checkpointing takes the loss without the full logits, which distillation (teacher) needs")
ddp, grad_accum, dtype, ctx, compile = common.setup(device, backend, dtype, compile, seed,
                                                    gradient_accumulation_steps, out_dir)
master = ddp.master
if master:
    print(f"tokens per iteration: {gradient_accumulation_steps * batch_size * block_size:,} ({ddp.world_size} processes x {grad_accum} "
          f"micro-steps x {batch_size} x {block_size}); device {ddp.device}, dtype {dtype}")

# -----------------------------------------------------------------------------
# data

data_dir = common.data_dir(dataset)
if dataset.startswith("tiny_shakespeare/"):  # its prepare.py writes a missing folder: byte, bpe4096 ...
    kind = dataset.split("/", 1)[1]
    command = ["data/tiny_shakespeare/prepare.py", *(["--tokenizer=bpe", f"--vocab_size={kind[3:]}"]
                                                     if kind.startswith("bpe") else [f"--tokenizer={kind}"])]
common.prepare_missing(data_dir, ("meta.json", "train.bin", "val.bin"), ddp,
                       command if dataset.startswith("tiny_shakespeare/") else None, "run its prepare.py first")
meta = bpe.dataset_meta(data_dir)
data_dtype = np.dtype(meta["dtype"])
# the ids the training text never contains (tiny shakespeare has no digits and no chat tokens):
# their embedding rows only ever learn to be unlikely, so a later stage that needs them (SFT on
# arithmetic) may start them afresh; read from the first 2^28 tokens, which is all of most corpora
_head = np.memmap(os.path.join(data_dir, "train.bin"), dtype=data_dtype, mode="r")[: 2**28]
meta["unseen_ids"] = np.flatnonzero(np.bincount(_head, minlength=meta["n_vocab"])[: meta["n_vocab"]] == 0).tolist()
del _head


def get_batch(split, generator):
    # a fresh memmap per batch: numpy's memmap holds on to pages otherwise
    data = np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=data_dtype, mode="r")
    ix = torch.randint(len(data) - block_size - 1, (batch_size,), generator=generator).tolist()
    x = torch.from_numpy(np.stack([data[i : i + block_size] for i in ix]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[i + 1 : i + 1 + block_size] for i in ix]).astype(np.int64))
    if ddp.device_type == "cuda":
        return x.pin_memory().to(ddp.device, non_blocking=True), y.pin_memory().to(ddp.device, non_blocking=True)
    return x.to(ddp.device), y.to(ddp.device)


def train_generator(it, micro_step):
    # the batches of an iteration depend only on (seed, rank, iteration, micro-step): resuming
    # draws exactly the batches an uninterrupted run would have, with no state to carry
    return torch.Generator().manual_seed(hash((seed, ddp.rank, it, micro_step)) % 2**63)


# -----------------------------------------------------------------------------
# model, optimizer, checkpoint

model_args = {f.name: config[f.name] for f in fields(GPTConfig) if f.name in config}
model_args["vocab_size"] = meta["vocab_size"]
ckpt, resumed = None, False
if init_from == "scratch":
    try:
        model = quantize_model(GPT(GPTConfig(**model_args)), quantize, quant_group_size, trains=not eval_only)
    except ValueError as e:
        sys.exit(f"config error: {e}")
else:
    ckpt, path, resumed = common.load_start(init_from, out_dir, verbose=master)
    try:
        if "meta" in ckpt:  # the checkpoint's ids must mean what the dataset's ids mean
            bpe.check_same_tokenizer(ckpt["meta"], f"init_from={path}", meta, f"dataset {dataset}")
        model = common.model_from_checkpoint(ckpt, path, None if resumed else model_args, quantize=quantize,
                                             quant_group_size=quant_group_size, trains=not eval_only)
    except ValueError as e:
        sys.exit(f"error: {e}")
model.grad_checkpointing = grad_checkpointing
raw_model, model, optimizer, scaler = common.prepare_training(model, ddp, dtype, compile, weight_decay, learning_rate,
                                                              (beta1, beta2), resume_from=ckpt if resumed else None, ctx=ctx)

teacher_model = (common.load_teacher(teacher, meta, ddp, distill_loss, distill_alpha, distill_temperature)
                 if teacher else None)


def checkpoint():
    common.save_training_checkpoint(os.path.join(out_dir, "ckpt.pt"), ddp, raw_model, optimizer, scaler, ctx.dtype,
                                    **loop.state(), config=config, meta=meta, stage="pretrain")


def save_best():
    common.save_weights(os.path.join(out_dir, "best.pt"), ddp, raw_model, iter_num=loop.iter_num,
                        best_metric=loop.best_metric, config=config, meta=meta, stage="pretrain")


loop = common.Loop(config, ddp, ckpt if resumed else None, checkpoint, save_best)
ckpt = None  # free it

# -----------------------------------------------------------------------------
# evaluation

eval_batches = {  # fixed batches, the same in every run, so eval losses are comparable
    split: [get_batch(split, torch.Generator().manual_seed(1000 + k)) for k in range(ddp.rank, eval_iters, ddp.world_size)]
    for split in ("train", "val")
}


def sample_text(n_tokens):
    tok = bpe.tokenizer_from_meta(meta)
    start = torch.tensor([[tok.special_id("<|endoftext|>")]], device=ddp.device)
    with ctx:
        out = raw_model.generate(start, n_tokens, temperature=0)
    return tok.decode(out[0, 1:].tolist())


# -----------------------------------------------------------------------------
# training loop

tokens_per_step = grad_accum * batch_size * block_size  # this process's, per iteration
flops_per_step = raw_model.flops_per_token(block_size) * tokens_per_step
while True:
    lr = loop.lr(optimizer)
    if loop.eval_due():
        t_eval = time.time()
        split_loss = {split: common.mean_loss(model, raw_model, batches, ctx, ddp)
                      for split, batches in eval_batches.items()}
        loop.log("eval", train_loss=split_loss["train"], val_loss=split_loss["val"],
                 val_ppl=math.exp(min(split_loss["val"], 50.0)), lr=lr, s=time.time() - t_eval)
        if eval_sample_tokens and master:
            print(sample_text(eval_sample_tokens))
        loop.evaluated(split_loss["val"])
    if loop.done():
        break

    # ---- the training step --------------------------------------------------------------
    ce, kd = torch.zeros((), device=ddp.device), torch.zeros((), device=ddp.device)
    for micro_step in range(grad_accum):
        X, Y = get_batch("train", train_generator(loop.iter_num, micro_step))
        if ddp.enabled:  # gradients are averaged across processes only on the last micro-step
            model.require_backward_grad_sync = micro_step == grad_accum - 1
        with ctx:
            x = model(X)  # (B, T, n_embd): the hidden states
            if teacher_model is None:
                loss = raw_model.loss(x, Y)
            else:  # the logits once, for the cross-entropy and the distillation term both
                logits = raw_model.logits(x)
                loss = cross_entropy(logits, Y)
            ce += loss.detach() / grad_accum  # the accumulated gradient is the mean over micro-steps
            if teacher_model is not None:  # <- distillation: the teacher's softened distribution as a target too
                with torch.no_grad():
                    teacher_logits = teacher_model.logits(teacher_model(X))
                loss, part = losses.distilled(loss, logits, teacher_logits, Y, distill_alpha, distill_temperature,
                                              distill_loss, distill_beta, meta["n_vocab"])
                kd += part.detach() / grad_accum
            loss = (loss + raw_model.aux_loss()) / grad_accum  # MoE: plus its load-balancing terms
        scaler.scale(loss).backward()
    grad_norm = common.optimizer_step(raw_model, optimizer, scaler, grad_clip)
    # --------------------------------------------------------------------------------------

    # MoE: the routing of the last micro-step (aux_loss, z_loss, load_cv; the load per expert in log.jsonl)
    if loop.step_done(ce, tokens=tokens_per_step, flops=flops_per_step, kd=kd if teacher_model is not None else None,
                      lr=lr, grad_norm=grad_norm, **(raw_model.moe_stats() or {})):
        break

loop.close(raw_model)
