"""
Supervised fine-tuning: teach a pretrained model to answer in the chat template.

Reads a checkpoint (init_from: train.py's, an earlier SFT's, or a Hugging Face model folder, whose
tokenizer gets the chat tokens appended and the model rows for them) and data/<sft_dataset>/{train,
val}.jsonl, one conversation per line: {"messages": [{"role": "user", "content": ...}, {"role":
"assistant", "content": ...}, ...]} or {"prompt": ..., "completion": ...}, optionally with
"answer", "task" and "difficulty" fields (data/tasks/prepare.py writes such a task mix, and is run
for you when sft_dataset is "tasks", or "tasks_cot" for worked solutions, and its files are missing). Each conversation is rendered by
the tokenizer's chat template (bpe.Tokenizer.render_conversation) and the loss is taken on the
assistant's tokens only, each reply's closing <|end|> included. Writes to out_dir: ckpt.pt (the
latest state, for resume, the same format as train.py's, so sample.py loads it), best.pt (the
weights with the best val loss), log.jsonl and samples.txt (prompts, references and the model's
answers at each eval). With lora_rank > 0 only adapters train (and with train_embeddings the token
embedding too); best.pt and, at the end, merged.pt hold the plain model with the adapters folded
in, and lora.pt the adapters alone (and the embedding), to load on top of the base. With quantize
= int8 | int4 too, the base stays quantized while the adapters train (QLoRA), and merged.pt is the
base dequantized once, with the adapters folded in.

A tiny run on a laptop CPU (about 10 minutes, after python train.py config/tiny_shakespeare.py):
    python sft.py config/sft_tasks.py
    python sft.py config/sft_tasks_lora.py
    python sample.py --out_dir=out-sft --chat=True
One GPU, or several:
    python sft.py --init_from=out/ckpt.pt --sft_dataset=my_chats --batch_size=64 --out_dir=out-sft
    torchrun --standalone --nproc_per_node=8 sft.py --init_from=out/ckpt.pt --gradient_accumulation_steps=8
Resume, or measure a checkpoint without training (quantized too), or LoRA on an int4 base (QLoRA):
    python sft.py config/sft_tasks.py --init_from=resume
    python sft.py config/sft_tasks.py --eval_only=True --eval_prompts=100000 --out_dir=out-sft-base
    python sft.py config/sft_tasks.py --init_from=out-sft/best.pt --eval_only=True --quantize=int8 --out_dir=out-sft-int8
    python sft.py config/sft_tasks_lora.py --quantize=int4 --out_dir=out-sft-qlora

A healthy run prints the resolved config, the data (conversations, tokens, what was dropped), then
(config/sft_tasks.py on 2 CPU cores)
    iter=1000 loss=1.5734 lr=0.000887 grad_norm=1.5555 ms=117.2496 tok_s=7227 pad=0.3523 mfu=0.6795 eta=5.9m
and at every eval_interval the assistant-token losses and the greedy answers' exact match (em)
and edit-similarity score, overall and per task and difficulty:
    eval iter=2000 train_loss=0.7959 val_loss=0.6957 lr=0.000568
    answers iter=2000 em=0.3708 score=0.6380 em/add/1=0.9286 score/add/1=0.9643 em/add/2=0.1429 ...
On a CPU, mfu is the fraction of a matmul speed measured at start, a rough guide only.
"""

import os
import sys
import time
from dataclasses import asdict

import torch

import common
import losses
import posttrain
from configurator import configure
from conversations import read_conversations
from convert import lora_state_dict
from data.tasks.tasks import metrics
from model import cross_entropy

# -----------------------------------------------------------------------------
# I/O
out_dir = "out-sft"
init_from = "out/ckpt.pt"  # a checkpoint to fine-tune (train.py's, an SFT one, a Hugging Face folder) | resume
eval_interval = 250  # iterations between evaluations (and checkpoints)
log_interval = 10  # iterations between log lines
eval_iters = 20  # batches per split for the train and val losses
eval_only = False  # evaluate once and exit
always_save_checkpoint = True  # write ckpt.pt at every eval, not only when val loss improves
wandb_log = False
wandb_project = "llm"
wandb_run_name = "sft"
# data
sft_dataset = "tasks"  # a folder under data/ (or an absolute path) with train.jsonl and val.jsonl
gradient_accumulation_steps = 1  # micro-steps per iteration, summed over all processes
batch_size = 32  # conversations per micro-step per process, right-padded to the longest of them
# each micro-step's conversations sorted by length and run in this many pieces, each padded to its own
# longest: the same tokens and the same loss (token-weighted), fewer padded positions (README, SFT)
length_pieces = 4
# model: only GPTConfig's training-only fields; the architecture (and block_size) is the checkpoint's
dropout = 0.0
lora_rank = 0  # > 0: train low-rank adapters only, save the merged model and the adapters at the end
lora_alpha = 16.0  # adapter scale = lora_alpha / lora_rank
lora_dropout = 0.0
lora_targets = ("c_q", "c_v")  # c_q c_k c_v attn.c_proj c_fc c_gate mlp.c_proj router lm_head, or attn / mlp
moe_aux_coef = 0.01  # a MoE model: weight of its load-balancing loss in this stage's loss (a dense one has none)
moe_z_coef = 0.001  # a MoE model: weight of its router z-loss
quantize = "none"  # none | int8 | int4 weights (frozen): train LoRA on them (QLoRA) or evaluate (eval_only)
quant_group_size = 64  # int4: inputs that share one scale, 32 | 64 | 128
# sft
curriculum = "none"  # none | length | difficulty: the first epoch runs from easy to hard (difficulty field, else length)
eval_prompts = 240  # dev prompts (val.jsonl) answered greedily at each eval, balanced over task and difficulty (0 = none)
test_prompts = 10000  # test prompts (test.jsonl, when there is one) answered once at the end by best.pt (0 = none)
eval_batch_size = 256  # rows per generate call when answering them
eval_max_new_tokens = 40  # the longest answer generated, in tokens
eval_show = 12  # prompt / reference / answer examples appended to out_dir/samples.txt at each eval
train_embeddings = False  # with LoRA: train the token embedding (= the tied output head) too, not only adapters
# the embedding rows of ids the pretraining text never had (train.py records them: tiny shakespeare
# has no digits and no chat tokens) only ever learned to be unlikely outputs, which pushed them all
# one way, so as inputs they start nearly equal and SFT first has to tell 3 from 7 (README, SFT):
# norm restarts them as random directions as long as the other rows, init at N(0, 0.02), none keeps them
reinit_unseen = "norm"  # none | init | norm
# distillation: learn from a teacher's distribution too (empty teacher: off)
teacher = ""  # a checkpoint of this repository with the same tokenizer (train.py's or sft.py's)
distill_alpha = 0.5  # loss = (1 - alpha) * CE + alpha * T^2 * D(teacher_T || student_T)
distill_temperature = 2.0  # T, the temperature of both distributions in the distillation term
distill_loss = "forward_kl"  # forward_kl | reverse_kl | jsd (the generalized JSD of GKD)
distill_beta = 0.5  # jsd's interpolation: m = beta p + (1 - beta) q
# optimizer
learning_rate = 1e-3  # peak
max_iters = 1000  # total iterations
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0  # clip the global gradient norm to this (0 = off)
# schedule
decay_lr = True  # linear warmup, then cosine to min_lr
warmup_iters = 50
lr_decay_iters = 1000  # usually max_iters
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

if reinit_unseen not in ("none", "init", "norm"):
    sys.exit(f"config error: reinit_unseen must be none | init | norm, got {reinit_unseen!r}")
if curriculum not in ("none", "length", "difficulty"):
    sys.exit(f"config error: curriculum must be none | length | difficulty, got {curriculum!r}")
if batch_size < 1 or length_pieces < 1 or eval_prompts < 0 or eval_max_new_tokens < 1 or eval_show < 0:
    sys.exit("config error: need batch_size >= 1, length_pieces >= 1, eval_prompts >= 0, eval_max_new_tokens >= 1, "
             "eval_show >= 0")
if teacher and grad_checkpointing:
    sys.exit("config error: grad_checkpointing takes the loss without the full logits, which distillation (teacher) needs")
ddp, grad_accum, dtype, ctx, compile = common.setup(device, backend, dtype, compile, seed,
                                                    gradient_accumulation_steps, out_dir)
master = ddp.master
if master:
    print(f"conversations per iteration: {gradient_accumulation_steps * batch_size} ({ddp.world_size} "
          f"processes x {grad_accum} micro-steps x {batch_size}); device {ddp.device}, dtype {dtype}")

# -----------------------------------------------------------------------------
# the checkpoint to start from, and its tokenizer

# a model from elsewhere lacks the chat tokens: they are appended, and its embedding grows
ckpt, ckpt_path, resumed, tok, _ = posttrain.post_training_start(init_from, out_dir, verbose=master)
meta = ckpt["meta"]
block_size = ckpt["model_args"]["block_size"]
end_id, pad_id = tok.special_id("<|end|>"), tok.special_id("<|endoftext|>")
base = ckpt.get("base", ckpt_path) if resumed else init_from  # the pretrained weights under it all

# -----------------------------------------------------------------------------
# data: conversations rendered by the chat template, once

data_dir = posttrain.task_data(sft_dataset, ddp)
paths = {split: os.path.join(data_dir, f"{split}.jsonl") for split in ("train", "val")}


def load_split(split):
    """-> the conversations of a split that fit in block_size + 1 tokens: their rows (the JSON
    objects) and their (ids, loss_mask)."""
    rows, blank = read_conversations(paths[split])
    kept, rendered = [], []
    for row in rows:
        ids, mask = tok.render_conversation(row["messages"])
        if len(ids) - 1 <= block_size:  # inputs are ids[:-1], targets ids[1:]
            kept.append(row)
            rendered.append((ids, mask))
    if master:
        n_tok, n_loss = sum(len(ids) for ids, _ in rendered), sum(sum(m) for _, m in rendered)
        print(f"{split}: {len(kept)} conversations, {n_tok:,} tokens ({n_loss:,} of them assistant tokens); "
              f"dropped {len(rows) - len(kept)} longer than block_size + 1 = {block_size + 1} tokens; "
              f"{blank} blank lines")
    if not kept:
        raise ValueError(f"{paths[split]}: no conversation fits in block_size + 1 = {block_size + 1} tokens")
    return kept, rendered


try:
    train_rows, train_seqs = load_split("train")
    val_rows, val_seqs = load_split("val")
except ValueError as e:
    sys.exit(f"data error: {e}")

# the curriculum's level of each training conversation: its difficulty field, else its length
use_difficulty = curriculum == "difficulty" and all("difficulty" in r for r in train_rows)
if curriculum == "difficulty" and not use_difficulty and master:
    print("curriculum: some conversations have no difficulty field; ordering by length instead")
levels = [r["difficulty"] if use_difficulty else len(ids) for r, (ids, _) in zip(train_rows, train_seqs)]
if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in levels):
    sys.exit("data error: the difficulty field must be a number in every training conversation")


# the first epoch of a curriculum runs from easy to hard, later epochs are plain shuffles
stream = posttrain.EpochStream(len(train_seqs), seed, batch_size, grad_accum, ddp,
                               first_epoch=levels if curriculum != "none" else None)


def get_batch(seqs):
    """Conversations (ids, loss_mask) -> inputs X and targets Y (B, T), T the longest less one.
    Right padding: each row starts at position 0, as forward's default positions assume, and
    causal attention never lets a real token see the padding after it. Y is -1 (no loss) on the
    padding and wherever the next token is not the assistant's."""
    T = max(len(ids) for ids, _ in seqs) - 1
    X = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    Y = torch.full((len(seqs), T), -1, dtype=torch.long)
    for b, (ids, mask) in enumerate(seqs):
        n = len(ids) - 1
        X[b, :n] = torch.tensor(ids[:-1])
        Y[b, :n] = torch.tensor([t if m else -1 for t, m in zip(ids[1:], mask[1:])])
    return X.to(ddp.device), Y.to(ddp.device)


# -----------------------------------------------------------------------------
# model, optimizer, checkpoint

try:
    model = common.model_from_checkpoint(ckpt, ckpt_path, None if resumed else common.training_args(config),
                                         quantize=quantize, quant_group_size=quant_group_size, trains=not eval_only)
except ValueError as e:
    sys.exit(f"init_from: {e}")
unseen = meta.get("unseen_ids") or []
if reinit_unseen != "none" and unseen and not resumed and not eval_only:
    posttrain.reset_token_rows(model, unseen, match_norm=reinit_unseen == "norm",
                               generator=torch.Generator().manual_seed(seed))
    if master:
        print(f"re-initialised the embedding rows of the {len(unseen)} ids the pretraining text never contained "
              f"({reinit_unseen})")
# what this run's checkpoints call unseen is what its own data never shows either: a later stage
# must not restart the rows SFT has just taught
seen_here = {t for ids, _ in train_seqs for t in ids}
meta = dict(meta, unseen_ids=[i for i in unseen if i not in seen_here])
if train_embeddings and model.config.lora_rank > 0:
    # Adapters alone cannot fix an embedding the base never learned: tiny shakespeare has no digits
    # and no chat tokens, so their rows were only ever pushed down as outputs and all point the
    # same way, and a frozen table can neither tell 3 from 7 nor learn to say <|end|>. The usual
    # remedy (PEFT's modules_to_save) is to train the table as well.
    model.wte.weight.requires_grad_(True)
model.grad_checkpointing = grad_checkpointing
# batches vary in length: dynamic=True compiles one graph for all of them
raw_model, model, optimizer, scaler = common.prepare_training(model, ddp, dtype, compile, weight_decay, learning_rate,
                                                              (beta1, beta2), resume_from=ckpt if resumed else None,
                                                              dynamic=True, ctx=ctx)

teacher_model = (common.load_teacher(teacher, meta, ddp, distill_loss, distill_alpha, distill_temperature)
                 if teacher else None)


def checkpoint():
    common.save_training_checkpoint(os.path.join(out_dir, "ckpt.pt"), ddp, raw_model, optimizer, scaler, ctx.dtype,
                                    **loop.state(), config=config, meta=meta, stage="sft", base=base)


def save_weights(name):
    common.save_weights(os.path.join(out_dir, name), ddp, raw_model, iter_num=loop.iter_num,
                        best_metric=loop.best_metric, config=config, meta=meta, stage="sft", base=base)


loop = common.Loop(config, ddp, ckpt if resumed else None, checkpoint, lambda: save_weights("best.pt"))
ckpt = None  # free it

# -----------------------------------------------------------------------------
# evaluation: assistant-token losses, and greedy answers to held-out prompts

eval_order = torch.randperm(len(train_seqs), generator=torch.Generator().manual_seed(1000)).tolist()
eval_seqs = {  # fixed batches, the same in every run, so eval losses are comparable
    "train": [train_seqs[i] for i in eval_order[: eval_iters * batch_size]],
    "val": val_seqs[: eval_iters * batch_size],
}
eval_batches = {split: [get_batch(seqs[k : k + batch_size]) for k in range(ddp.rank * batch_size, len(seqs), ddp.world_size * batch_size)]
                for split, seqs in eval_seqs.items()}
gen_examples = posttrain.held_out_prompts(val_rows, eval_prompts, tok)
test_path = os.path.join(data_dir, "test.jsonl")
try:
    test_rows = read_conversations(test_path)[0] if test_prompts and os.path.isfile(test_path) else []
except ValueError as e:
    sys.exit(f"data error: {e}")
test_examples = posttrain.held_out_prompts(test_rows, test_prompts, tok)
test_examples = [ex for ex in test_examples if len(ex["prompt"]) < block_size]
# the test split at the end: no pass@k, every cell
evals = posttrain.Evals(tok, ctx, eval_batch_size, eval_max_new_tokens, 0, eval_show, (), seed, out_dir)


def n_loss_tokens(Y):
    return (Y >= 0).sum()


# -----------------------------------------------------------------------------
# training loop

while True:
    lr = loop.lr(optimizer)
    if loop.eval_due():
        t_eval = time.time()
        split_loss = {split: common.mean_loss(model, raw_model, batches, ctx, ddp, n_loss_tokens)
                      for split, batches in eval_batches.items()}
        loop.log("eval", train_loss=split_loss["train"], val_loss=split_loss["val"], lr=lr, s=time.time() - t_eval)
        if gen_examples:
            t_gen = time.time()
            answers = posttrain.answer_prompts(raw_model, gen_examples, tok, ctx, ddp, eval_batch_size,
                                               eval_max_new_tokens)
            loop.log("answers", **metrics(gen_examples, answers), s=time.time() - t_gen)
            if master and eval_show:
                posttrain.write_samples(os.path.join(out_dir, "samples.txt"), gen_examples, answers, loop.iter_num,
                                        eval_show)
        loop.evaluated(split_loss["val"])
    if loop.done():
        break

    # ---- the training step --------------------------------------------------------------
    indices = [stream.indices(loop.iter_num, m) for m in range(grad_accum)]
    pieces = [piece for idx in indices
              for piece in posttrain.length_pieces(idx, lambda i: len(train_seqs[i][0]), length_pieces)]
    batches = [get_batch([train_seqs[i] for i in piece]) for piece in pieces]
    # the loss is the mean over every assistant token of the iteration, across pieces, micro-steps and
    # processes: each piece's mean is weighted by its share of the tokens (DDP averages the
    # gradients over processes, hence the mean count per process in the denominator)
    n_mean = ddp.all_reduce_mean(sum(n_loss_tokens(Y) for _, Y in batches).float())
    ce, kd = torch.zeros((), device=ddp.device), torch.zeros((), device=ddp.device)
    real = padded = flops = level_sum = 0
    for k, (X, Y) in enumerate(batches):
        if ddp.enabled:  # gradients are averaged across processes only on the last piece
            model.require_backward_grad_sync = k == len(batches) - 1
        with ctx:
            x = model(X)  # (B, T, n_embd): the hidden states
            if teacher_model is None:
                loss = raw_model.loss(x, Y)  # <- SFT: Y is -1 on every token that is not the assistant's
            else:  # the logits once, for the cross-entropy and the distillation term both
                logits = raw_model.logits(x)
                loss = cross_entropy(logits, Y)
            share = n_loss_tokens(Y) / n_mean
            ce += (loss * share).detach()
            if teacher_model is not None:  # <- distillation, on the assistant's tokens only (Y -1 elsewhere)
                with torch.no_grad():
                    teacher_logits = teacher_model.logits(teacher_model(X))
                loss, part = losses.distilled(loss, logits, teacher_logits, Y, distill_alpha, distill_temperature,
                                              distill_loss, distill_beta, tok.n_vocab)
                kd += (part * share).detach()
            loss = loss * share
            loss = loss + raw_model.aux_loss() * (len(pieces[k]) / (grad_accum * batch_size))  # MoE: load balancing
        scaler.scale(loss).backward()
        real += sum(len(train_seqs[i][0]) - 1 for i in pieces[k])
        padded += X.numel()
        flops += raw_model.flops_per_token(X.size(1)) * X.numel()
        level_sum += sum(levels[i] for i in pieces[k])
    grad_norm = common.optimizer_step(raw_model, optimizer, scaler, grad_clip)
    # --------------------------------------------------------------------------------------

    if loop.step_done(ce, tokens=real, flops=flops, kd=kd if teacher_model is not None else None, lr=lr,
                      grad_norm=grad_norm, pad=1 - real / padded,
                      level=level_sum / (grad_accum * batch_size) if curriculum != "none" else None,
                      **(raw_model.moe_stats() or {})):  # MoE: the routing of the last micro-step
        break

if raw_model.config.lora_rank > 0 and not eval_only and not loop.nonfinite and master:
    save_weights("merged.pt")
    adapters = {"lora": lora_state_dict(raw_model)}
    if raw_model.wte.weight.requires_grad:  # trained with them: it goes with them
        adapters["embedding"] = raw_model.wte.weight.detach().clone()
    common.save_checkpoint({**adapters, "model_args": asdict(raw_model.config), "iter_num": loop.iter_num,
                            "quantization": raw_model.quantization,  # the base they were trained on
                            "config": config, "git": common.git_commit(), "stage": "sft", "base": base},
                           os.path.join(out_dir, "lora.pt"))
    print(f"saved {os.path.join(out_dir, 'merged.pt')} (adapters merged) and {os.path.join(out_dir, 'lora.pt')} "
          f"(the adapters{' and the embedding' if 'embedding' in adapters else ''}, for the base {base})")
posttrain.evaluate_test(loop, raw_model, test_examples, [], evals)
loop.close(raw_model)
