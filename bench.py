"""
Benchmark: what the KV cache buys, and how fast the model trains, on a randomly initialised model
(no data, no checkpoint). Prints a table; --json=PATH writes the same figures as JSON.

    python bench.py                                  # CPU, fp32, 6 layers x 384, vocab 65
    python bench.py --device=cuda --dtype=bfloat16   # one GPU
    python bench.py --sections=decode --nocache=false --decode_lengths=128,512
    python bench.py --sections=decode,train --n_expert=8 --n_expert_active=2   # decode a MoE model, train it and dense
    python bench.py --sections=decode --nocache=false --split_linear=true  # the split-weight matmul, and without
    python bench.py --sections=profile               # where one decode step spends its time
    python bench.py --sections=quant                 # fp32 / bf16 / int8 / int4 decode, 6x384 and GPT-2 124M
    python bench.py --sections=qlora_memory          # peak RSS of full, LoRA, QLoRA int8 / int4 training steps
    python bench.py --sections=rl_vs_trl --n_layer=4 --n_head=4 --n_embd=192 --pos_emb=rope --norm=rmsnorm \
        --mlp=swiglu --grpo_iters=7                  # grpo.py against TRL's GRPOTrainer, phase by phase

Sections:
  decode   batch 1, a prompt_len-token prompt, N new greedy tokens: tokens/s with the cache and
           without it (the whole context recomputed each step), the speedup, same tokens or not;
           with split_linear also with autotune.split_linear's split-weight matmul on every weight
           it fits, alternating with the plain model (split_tok_s, and split_vs_plain, the median
           of plain / split times: above 1 the split path is faster), and what autotune's
           measurement of the decode chooses here
  hf       the same shape as transformers' GPT2LMHeadModel (random weights), its generate with its
           default cache against ours, greedy, alternating in one run: tokens/s and the median ratio
           (skipped with a message where transformers is not installed)
  rolling  a sliding-window rope model generating 1x, 4x, 16x its window: tokens/s and KV bytes
  batch    decode tokens/s (all rows together) for several batch sizes, with the cache
  train    one training step (forward, backward, AdamW): tokens/s and MFU, dense, MoE (n_expert's
           model, or 8 experts top-2) and LoRA, in float32 and in bf16 autocast, and which one
           dtype=auto takes here
  prefill  prompt tokens/s for a prefill_len-token prompt
  grpo     one GRPO iteration of grpo.py on a random model: its time split into generation,
           scoring and update, rollout tokens/s, beside batched decode at the same batch size
  ppo      the same for one PPO iteration of ppo.py (as many completions, one per prompt)
  rl_vs_trl  grpo.py against TRL's GRPOTrainer on the same work (a LlamaForCausalLM of this shape,
           the same grpo_prompts prompts as the same tokens, grpo_group samples of 16 tokens, beta
           0.04), alternating rl_rounds rounds of grpo_iters iterations in one process: median
           seconds per phase (generation, reward, reference, optimizer, the rest: the policy's
           forward and backward) on each side and the median over rounds of ours / TRL's (skipped
           with a message where trl is not installed; rope, rmsnorm and swiglu only)
  profile  a torch.profiler table of one decode step at position ~500
  quant    decode tokens/s, batch 1, N = quant_new_tokens, for each of quant_shapes in fp32, bf16
           (model.to(bfloat16)), int8 and int4 (quantize.quantize over a quant_base model), and int8 /
           int4 with the LM head quantized as well (+head), the precisions alternated within every
           repeat; the kernel each quantized matmul ran (quantize.QUANT_KERNELS)
  qlora_memory  peak resident memory (VmHWM) of memory_steps training steps at memory_shape: full
           fine-tune, LoRA on an fp32 base, on an int8 base, on an int4 base; each in a fresh process
           (section memory_one), so that no variant's peak is another's

Timing: warm-up runs, then the median of `repeats` runs, synchronising the GPU around each; two
paths compared side by side alternate, run after run. Run it alone on the machine: it warns when
other processes keep a core busy (measured over a second at the start).
"""

import collections
import contextlib
import copy
import functools
import gc
import importlib.util
import io
import json as jsonlib
import os
import platform
import random
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, fields
from unittest import mock

import torch

import autotune
import bpe
import common
import posttrain
import quantize
from configurator import configure
from model import GPT, GPTConfig, KVCache

# -----------------------------------------------------------------------------
# I/O
json = ""  # write the figures to this path as JSON as well
sections = "decode,hf,rolling,batch,train,prefill"  # any of decode,hf,rolling,batch,train,prefill,grpo,ppo,rl_vs_trl,quant,qlora_memory,profile
# model (GPT-2's architecture by default, to compare with other GPT-2 implementations)
vocab_size = 65
block_size = 1024
n_layer = 6
n_head = 6
n_embd = 384
n_kv_head = None
pos_emb = "learned"  # learned | sinusoidal | rope | none
norm = "layernorm"
mlp = "gelu"
bias = False
# mixture-of-experts: n_expert > 0 makes every section's model a MoE one; train times it beside dense
n_expert = 0  # routed experts per MoE layer (0 = dense; the train section then times 8 experts, top-2)
n_expert_active = 2  # top-k
moe_every = 1  # every k-th layer MoE
n_shared_expert = 0
expert_hidden = None  # None = the dense MLP's hidden size split over the experts a token uses
# decode
prompt_len = 16  # tokens in the prompt
decode_lengths = (128, 256, 512, 1000)  # new tokens (capped at block_size - prompt_len)
nocache = True  # also time the uncached path (minutes on a CPU at N = 1000)
split_linear = False  # also time the split-weight matmul (autotune.split_linear, on every weight it fits) beside plain
# rolling cache
rolling_window = 128  # sliding_window of the rolling-cache model (rope)
rolling_sinks = 4  # its n_sink
rolling_multiples = (1, 4, 16)  # generate this many windows' worth of tokens
# batched decode
batch_sizes = (1, 8, 32)
batch_new_tokens = 128
# training step
train_batch = 8  # sequences per step
train_block = 256  # tokens per sequence
# hf: transformers' generate on the same shape
hf_lengths = (512,)  # new tokens
# grpo: one iteration of grpo.py
grpo_prompts = 16  # prompts per iteration
grpo_group = 8  # samples per prompt
grpo_iters = 3  # iterations timed (the first, with its warm-up, is dropped); rl_vs_trl: per round and side
rl_rounds = 3  # rl_vs_trl: rounds, each grpo_iters iterations of ours then grpo_iters steps of TRL's
# prefill
prefill_len = 512
# quantized decode; a shape is n_layer x n_head x n_embd : vocab_size (GPT-2 124M is 12x12x768:50304)
quant_shapes = ("6x6x384:65", "12x12x768:50304")
quant_precisions = ("fp32", "bf16", "int8", "int4", "int8+head", "int4+head")  # +head: the LM head quantized too
quant_new_tokens = 512  # new tokens per decode (capped at block_size - prompt_len)
quant_group_size = 64  # int4: inputs that share one scale
quant_base = "bfloat16"  # int8 / int4: the dtype of all they leave in floating point, activations included
# QLoRA memory: peak RSS of a few training steps, one fresh process per variant
memory_shape = "12x12x768:50304"
memory_variants = ("full", "lora", "lora-int8", "lora-int4")  # full fine-tune; LoRA on an fp32, int8, int4 base
memory_batch = 4  # sequences per step
memory_block = 256  # tokens per sequence
memory_steps = 2
memory_lora_rank = 8  # on c_q and c_v, as the LoRA figures were measured
memory_grad_checkpointing = False  # recompute each block in the backward pass (model.grad_checkpointing)
# timing and system
repeats = 3  # timed runs per figure (median); the uncached decode runs once
device = "auto"
dtype = "float32"  # float32 | bfloat16 | float16 (autocast)
compile = False  # compile the decode step (autotune.compile_decode, kept where faster) and the training step
threads = 0  # torch.set_num_threads (0 = torch's default)
seed = 1337
# -----------------------------------------------------------------------------


def sync():
    if device_type == "cuda":
        torch.cuda.synchronize()


def timed(fn, n=None):
    """Median seconds of fn() over n runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(n or repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def model_args():
    return {f.name: globals()[f.name] for f in fields(GPTConfig) if f.name in globals()}


def build(**overrides):
    args = {**model_args(), **overrides}
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**args)).to(dev).eval()
    if compile:
        choice, eager_ms, compiled_ms = autotune.compile_decode(model)
        print(f"compile_decode: eager step {eager_ms:.2f} ms, compiled {compiled_ms:.2f} ms: {choice}")
    return model


def bench_decode(model):
    rows = []
    prompt = torch.randint(0, vocab_size, (1, prompt_len), device=dev)
    split = None
    if split_linear:  # a copy whose every weight the threads divide takes the split-weight matmul
        path = autotune.split_linear(copy.deepcopy(model))
        print(f"split    {torch.get_num_threads()} threads: {path or 'nothing to split'} "
              "(what autotune.split_linear chooses here, timing 16 decoded tokens both ways)")
        split = copy.deepcopy(model)
        autotune.split_linear(split, everywhere=True)
    for n in decode_lengths:
        n = min(n, block_size - prompt_len)
        out = {}
        with amp:
            t = timed(lambda: out.__setitem__("cache", model.generate(prompt, n, temperature=0)))
            row = {"n": n, "cache_tok_s": n / t}
            if split is not None:  # alternating with the plain model, run after run
                t_plain, t_split = alternate(lambda: model.generate(prompt, n, temperature=0),
                                             lambda: out.__setitem__("split", split.generate(prompt, n, temperature=0)))
                row.update(cache_tok_s=n / statistics.median(t_plain), split_tok_s=n / statistics.median(t_split),
                           split_vs_plain=statistics.median(a / b for a, b in zip(t_plain, t_split)),
                           split_same_tokens=bool(torch.equal(out["cache"], out["split"])))
            if nocache:
                t = timed(lambda: out.__setitem__("nocache", model.generate(prompt, n, temperature=0, use_cache=False)), 1)
                row.update(nocache_tok_s=n / t, speedup=row["cache_tok_s"] * t / n,
                           same_tokens=bool(torch.equal(out["cache"], out["nocache"])))
        rows.append(row)
        print_row("decode", row)
    return rows


def bench_hf(model):
    """transformers' GPT2LMHeadModel.generate (its default cache, greedy) against ours on the same
    shape, alternating: -> rows with both tokens/s and the median of the ratios ours / theirs."""
    try:
        import transformers
    except ImportError:
        print("hf       skipped: transformers is not installed (pip install transformers)")
        return []
    if (pos_emb, norm, mlp) != ("learned", "layernorm", "gelu"):
        print("hf       skipped: GPT2LMHeadModel has learned positions, layernorm and gelu")
        return []
    cfg = transformers.GPT2Config(vocab_size=vocab_size, n_positions=block_size, n_embd=n_embd, n_layer=n_layer,
                                  n_head=n_head, activation_function="gelu")
    torch.manual_seed(seed)
    theirs = transformers.GPT2LMHeadModel(cfg).to(dev).eval()
    prompt = torch.randint(0, vocab_size, (1, prompt_len), device=dev)
    rows = []
    for n in hf_lengths:
        n = min(n, block_size - prompt_len)

        def ours_run():
            with amp:
                model.generate(prompt, n, temperature=0)

        def theirs_run():
            with torch.no_grad(), amp:
                theirs.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                attention_mask=torch.ones_like(prompt), pad_token_id=0)

        t_ours, t_theirs = alternate(ours_run, theirs_run)
        row = {"n": n, "ours_tok_s": n / statistics.median(t_ours), "hf_tok_s": n / statistics.median(t_theirs),
               "ratio": statistics.median(b / a for a, b in zip(t_ours, t_theirs)),
               "transformers": transformers.__version__}
        rows.append(row)
        print_row("hf", row)
    return rows


def alternate(*fns, n=None):
    """Time the functions in turn, n times each after one warm-up of each, so that whatever else
    the machine does falls on all of them alike: -> a list of times per function."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(n or repeats):
        for fn, out in zip(fns, times):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            out.append(time.perf_counter() - t0)
    return times


def bench_rolling():
    model = build(pos_emb="rope", sliding_window=rolling_window, n_sink=rolling_sinks, block_size=rolling_window)
    cfg = model.config
    rows = []
    prompt = torch.randint(0, vocab_size, (1, prompt_len), device=dev)
    for m in rolling_multiples:
        n = m * rolling_window
        result = {}

        def run():  # prefill and decode by hand, to read the cache's size at the end
            decode = model.compiled_decode_step or model.decode_step
            cache = KVCache(cfg, 1, prompt_len + n, static=compile)
            with torch.no_grad(), amp:
                token = model.prefill(prompt, None, cache).argmax(-1, keepdim=True)
                for t in range(n - 1):
                    token = decode(token, torch.full((1, 1), prompt_len + t, device=dev), cache).argmax(-1, keepdim=True)
            result["kv_bytes"] = cache.nbytes()

        t = timed(run)
        row = {"n": n, "window": rolling_window, "tok_s": n / t, "kv_bytes": result["kv_bytes"]}
        rows.append(row)
        print_row("rolling", row)
    return rows


def bench_batch(model):
    rows = []
    for B in batch_sizes:
        prompt = torch.randint(0, vocab_size, (B, prompt_len), device=dev)
        with amp:
            t = timed(lambda: model.generate(prompt, batch_new_tokens, temperature=0))
        row = {"batch": B, "n": batch_new_tokens, "tok_s": B * batch_new_tokens / t}
        rows.append(row)
        print_row("batch", row)
    return rows


def bench_train():
    E, k = (n_expert, n_expert_active) if n_expert else (8, 2)  # the MoE model asked for, or 8 experts top-2
    moe = f"moe {E}x top-{k}" + (f" every {moe_every}" if moe_every > 1 else "") + \
        (f" +{n_shared_expert} shared" if n_shared_expert else "")
    variants = {"dense": dict(n_expert=0, n_shared_expert=0), moe: dict(n_expert=E, n_expert_active=k),
                "lora r8 q,v": dict(lora_rank=8, lora_alpha=16.0, lora_targets=("c_q", "c_v"))}
    peak = common.peak_flops(device_type)
    # the training precisions to time: the one asked for, and where dtype is auto on a CPU with bf16
    # instructions both candidates, side by side, and the one auto takes (choose_cpu_dtype's rule)
    chosen = common.pick_dtype(dtype, device_type)
    precisions = ["float32", "bfloat16"] if chosen == "auto" else [chosen]
    rows = []
    for name, overrides in variants.items():
        torch.manual_seed(seed)
        model = GPT(GPTConfig(**{**model_args(), "block_size": max(train_block, block_size), **overrides})).to(dev)
        opt = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), device_type)
        step_model = torch.compile(model) if compile else model
        x = torch.randint(0, vocab_size, (train_batch, train_block), device=dev)

        def step(precision):
            with common.autocast(device_type, precision):
                loss = model.loss(step_model(x), x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        times = dict(zip(precisions, alternate(*[lambda p=p: step(p) for p in precisions])))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        med = {p: statistics.median(t) for p, t in times.items()}
        auto = "bfloat16" if chosen == "auto" and med["float32"] >= 1.2 * med["bfloat16"] else precisions[0]
        for precision, t in med.items():
            tok_s = train_batch * train_block / t
            row = {"variant": name, "dtype": precision, "tok_s": tok_s,
                   "mfu": model.flops_per_token(train_block) * tok_s / peak,
                   "params": model.num_params(non_embedding=False), "active": model.num_params(active=True),
                   "trainable": trainable,
                   "auto_picks": auto == precision if chosen == "auto" else None}
            rows.append({k: v for k, v in row.items() if v is not None})
            print_row("train", rows[-1])
    return rows


def bench_prefill(model):
    n = min(prefill_len, block_size)
    prompt = torch.randint(0, vocab_size, (1, n), device=dev)

    def run():
        with torch.no_grad(), amp:
            model(prompt, cache=KVCache(model.config, 1, n + 1))

    row = {"n": n, "tok_s": n / timed(run)}
    print_row("prefill", row)
    return [row]


def rl_start(tmp, **tasks_args):
    """What the RL stages start from in tmp: base.pt, this shape's random weights with the byte tokenizer
    (vocab 320), and data/tasks's prompts (train_per_cell 50, val_per_cell 5, or tasks_args) in
    tmp/tasks. -> (the checkpoint's path, the tasks folder, the tokenizer)"""
    here = os.path.dirname(os.path.abspath(__file__))
    tok = bpe.byte_tokenizer(bpe.SPECIAL_TOKENS)
    cfg = GPTConfig(**{**model_args(), "vocab_size": 320, "block_size": 256})
    torch.manual_seed(seed)
    meta = {"tokenizer": "byte", "vocab_size": 320, "n_vocab": tok.n_vocab, "tokenizer_state": tok.state()}
    common.save_checkpoint({"model": GPT(cfg).state_dict(), "model_args": asdict(cfg), "meta": meta},
                           os.path.join(tmp, "base.pt"))
    tasks = os.path.join(tmp, "tasks")
    args = {"train_per_cell": 50, "val_per_cell": 5, **tasks_args}
    subprocess.run([sys.executable, os.path.join(here, "data", "tasks", "prepare.py"), f"--out_dir={tasks}",
                    *(f"--{k}={v}" for k, v in args.items())], check=True, capture_output=True)
    return os.path.join(tmp, "base.pt"), tasks, tok


def bench_rl(script):
    """grpo.py or ppo.py itself, a few iterations on this shape's random weights (byte tokenizer) and
    the task prompts, timed by its own log: generation, scoring and update seconds per iteration,
    and rollout tokens/s, beside batched decode of the same number of rows. PPO samples one
    completion per prompt: it gets grpo_prompts x grpo_group prompts, the same number of rows."""
    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as tmp:
        base, tasks, _ = rl_start(tmp)
        batch_args = [f"--prompts_per_iter={grpo_prompts}", f"--samples_per_prompt={grpo_group}"] if script == "grpo" else \
            [f"--prompts_per_iter={grpo_prompts * grpo_group}"]
        args = [sys.executable, os.path.join(here, f"{script}.py"), f"--init_from={base}",
                f"--prompt_dataset={tasks}", f"--out_dir={os.path.join(tmp, 'out')}", f"--max_iters={grpo_iters}",
                *batch_args, "--eval_interval=1000", "--eval_prompts=0", "--pass_k_prompts=0", f"--device={dev}",
                f"--dtype={dtype}", f"--compile={compile}"]
        env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
        res = subprocess.run(args, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            print(f"{script:8s} failed:\n{res.stderr[-2000:]}")
            return []
        with open(os.path.join(tmp, "out", "log.jsonl")) as f:
            steps = [r for r in map(jsonlib.loads, f) if "gen_s" in r][1:]  # the first warms up
    rows_n = grpo_prompts * grpo_group
    prompt = torch.randint(0, vocab_size, (rows_n, prompt_len), device=dev)
    model = build(vocab_size=320)
    with amp:
        t = timed(lambda: model.generate(prompt, 16, temperature=1.0))
    med = {k: statistics.median(r[k] for r in steps) for k in ("gen_s", "score_s", "update_s", "rollout_tok_s", "len")}
    row = {"rows": rows_n, **med, "iter_s": med["gen_s"] + med["score_s"] + med["update_s"],
           "batched_decode_tok_s": rows_n * 16 / t}
    print_row(script, row)
    return [row]


class PhaseClock:
    """Seconds per phase of each iteration of a training loop, from the outside: timed(fn, phase)
    is fn adding the seconds of each call to that phase, end() closes an iteration (the time since
    the last end() is its "iteration"; the first of a run, with its warm-up, has no start and is
    dropped). rows: one dict per iteration, "rest" = iteration minus the phases timed."""

    def __init__(self):
        self.rows, self.current, self.t_end = [], {}, None

    def timed(self, fn, phase, when=lambda: True):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if when():
                    sync()
                    self.current[phase] = self.current.get(phase, 0.0) + time.perf_counter() - t0
        return run

    def add(self, phase, seconds):
        self.current[phase] = self.current.get(phase, 0.0) + seconds

    def end(self, *_, **__):
        sync()
        now = time.perf_counter()
        if self.t_end is not None:
            row = {"iteration": now - self.t_end, **self.current}
            row["rest"] = row["iteration"] - sum(self.current.values())
            self.rows.append(row)
        self.current, self.t_end = {}, now

    def new_run(self):
        self.current, self.t_end = {}, None


RL_PHASES = ("generation", "reward", "reference", "optimizer", "rest", "iteration")


def bench_rl_vs_trl():
    """grpo.py against TRL's GRPOTrainer at this shape, alternating in this process: rl_rounds
    rounds, each grpo_iters iterations of grpo.py (run in-process) then grpo_iters steps of TRL,
    the first of each run dropped. The same work on both sides: a LlamaForCausalLM of this shape
    (rope, rmsnorm, swiglu, tied embeddings, random weights), the same 16 prompts every iteration
    (grpo_prompts of data/tasks's RL cells), grpo_group samples of 16 tokens each, the KL to a frozen
    reference at beta 0.04, one optimizer step per iteration. TRL gets a byte-level BPE with no
    merges and our chat template in Jinja, so its prompts are the same tokens as ours; min_new_tokens
    makes it generate all 16 (random weights rarely stop ours early, and a batch runs until its last
    row stops). Each side's phases are timed by wrapping its own functions: generation (ours
    posttrain.rollout, TRL _generate), reward, reference (the frozen model's log-probs), optimizer
    (clip and step), rest (the iteration minus those: the policy's forward, loss and backward, and
    the bookkeeping). -> rows of median seconds per phase, ours and TRL's, and the median over the
    rounds of each round's ratio ours / TRL (below 1: ours is faster)."""
    try:
        import datasets
        import tokenizers
        import transformers
        import trl
    except ImportError:
        print("rl_vs_trl skipped: trl is not installed (pip install trl)")
        return []
    if (pos_emb, norm, mlp, bias) != ("rope", "rmsnorm", "swiglu", False):
        print("rl_vs_trl skipped: TRL's side is a LlamaForCausalLM: --pos_emb=rope --norm=rmsnorm --mlp=swiglu")
        return []
    precision = common.pick_dtype(dtype, device_type)
    if precision not in ("float32", "bfloat16"):
        print("rl_vs_trl skipped: both sides take one precision, --dtype=float32 or --dtype=bfloat16")
        return []

    class TRLPhases(transformers.TrainerCallback):
        """The optimizer's step and the end of each of TRL's steps, into a PhaseClock."""

        def __init__(self, clock):
            self.clock, self.t0 = clock, 0.0

        def on_pre_optimizer_step(self, *args, **kwargs):
            self.t0 = time.perf_counter()

        def on_optimizer_step(self, *args, **kwargs):
            self.clock.add("optimizer", time.perf_counter() - self.t0)

        def on_step_end(self, *args, **kwargs):
            self.clock.end()

    here = os.path.dirname(os.path.abspath(__file__))
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as tmp:
        base, tasks, tok = rl_start(tmp, train_per_cell=20, val_per_cell=2)
        # the same grpo_prompts prompts every iteration on both sides: a train split of just those,
        # from grpo.py's default cells
        with open(os.path.join(tasks, "train.jsonl")) as f:
            rows = [r for r in map(jsonlib.loads, f)
                    if f"{r['task']}/{r['difficulty']}" in ("add/3", "sub/2", "sub/3", "sort/2", "sort/3")]
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
        rows = [rows[i] for i in order[:grpo_prompts]]
        with open(os.path.join(tasks, "train.jsonl"), "w") as f:
            f.writelines(jsonlib.dumps(r) + "\n" for r in rows)
        questions = [r["messages"][:-1] for r in rows]
        ours_len = [len(tok.render_prompt(q)) for q in questions]

        # TRL's side: a Llama of the same shape and a byte-level tokenizer that makes the same tokens
        alphabet = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
        byte_level = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={c: i for i, c in enumerate(alphabet)},
                                                                merges=[]))
        byte_level.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        byte_level.decoder = tokenizers.decoders.ByteLevel()
        byte_level.add_special_tokens(list(bpe.SPECIAL_TOKENS))
        hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=byte_level, eos_token="<|end|>",
                                                      pad_token="<|endoftext|>")
        hf_tok.chat_template = ("<|endoftext|>{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
                                "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
        trl_len = [len(hf_tok.apply_chat_template(q, add_generation_prompt=True, tokenize=True)["input_ids"])
                   for q in questions]
        cfg = GPTConfig(**{**model_args(), "vocab_size": 320})
        llama = transformers.LlamaConfig(
            vocab_size=320, hidden_size=n_embd, intermediate_size=cfg.mlp_hidden, num_hidden_layers=n_layer,
            num_attention_heads=n_head, num_key_value_heads=cfg.n_kv_head or n_head, max_position_embeddings=256,
            rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_weights,
            pad_token_id=hf_tok.pad_token_id, eos_token_id=hf_tok.eos_token_id, bos_token_id=None)
        torch.manual_seed(seed)
        theirs_path = os.path.join(tmp, "llama")
        transformers.LlamaForCausalLM(llama).save_pretrained(theirs_path)
        hf_tok.save_pretrained(theirs_path)
        dataset = datasets.Dataset.from_dict({"prompt": questions})
        print(f"rl_vs_trl prompts: {len(questions)}, {min(ours_len)}-{max(ours_len)} tokens (mean "
              f"{statistics.mean(ours_len):.1f}) with our byte tokenizer and chat template, "
              f"{min(trl_len)}-{max(trl_len)} (mean {statistics.mean(trl_len):.1f}) with TRL's tokenizer: "
              f"{'the same' if ours_len == trl_len else 'NOT the same'}; trl {trl.__version__}, "
              f"transformers {transformers.__version__}")

        rewards = random.Random(seed)

        def reward(completions, **kwargs):  # random rewards, so that the groups' advantages vary
            return [rewards.random() for _ in completions]

        ours, theirs = PhaseClock(), PhaseClock()
        rounds, ours_lengths, trl_lengths = [], [], []
        for r in range(rl_rounds):
            # ours: grpo.py itself, in this process, its functions timed from the outside
            ours.new_run()
            start = len(ours.rows)
            argv = ["grpo.py", f"--init_from={base}", f"--prompt_dataset={tasks}", "--rl_tasks=",
                    "--rl_cell_weights=rows", f"--out_dir={os.path.join(tmp, f'ours{r}')}",
                    f"--max_iters={grpo_iters}", f"--prompts_per_iter={grpo_prompts}", f"--samples_per_prompt={grpo_group}",
                    "--max_new_tokens=16", "--kl_coef=0.04", "--mask_truncated=false", "--eval_interval=100000",
                    "--eval_prompts=0", "--pass_k_prompts=0", "--test_prompts=0", f"--device={dev}",
                    f"--dtype={precision}", f"--compile={compile}", f"--seed={seed}"]
            step_done = common.Loop.step_done

            def ended(loop, *args, **kwargs):  # grpo.py calls it once per iteration, after the update
                ours.end()
                return step_done(loop, *args, **kwargs)

            with contextlib.ExitStack() as stack:
                for obj, name, phase in ((posttrain, "rollout", "generation"),
                                         (posttrain.TaskReward, "__call__", "reward"),
                                         (posttrain.Reference, "logprobs", "reference"),
                                         (common, "optimizer_step", "optimizer")):
                    stack.enter_context(mock.patch.object(obj, name, ours.timed(getattr(obj, name), phase)))
                stack.enter_context(mock.patch.object(common.Loop, "step_done", ended))
                stack.enter_context(mock.patch.object(sys, "argv", argv))
                stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
                runpy.run_path(os.path.join(here, "grpo.py"), run_name="__main__")
            with open(os.path.join(tmp, f"ours{r}", "log.jsonl")) as f:
                ours_lengths += [row["len"] for row in map(jsonlib.loads, f) if "len" in row]
            # TRL: a fresh trainer, its methods timed the same way
            theirs.new_run()
            tstart = len(theirs.rows)
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                args = trl.GRPOConfig(
                    output_dir=os.path.join(tmp, f"theirs{r}"), per_device_train_batch_size=grpo_prompts * grpo_group,
                    num_generations=grpo_group, max_completion_length=16, generation_kwargs={"min_new_tokens": 16},
                    beta=0.04, loss_type="grpo", learning_rate=3e-5, max_steps=grpo_iters,
                    gradient_checkpointing=False, bf16=precision == "bfloat16", use_cpu=device_type == "cpu",
                    report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=seed)
                trainer = trl.GRPOTrainer(model=theirs_path, reward_funcs=reward, args=args, train_dataset=dataset,
                                          processing_class=hf_tok, callbacks=[TRLPhases(theirs)])
                trainer._generate = theirs.timed(trainer._generate, "generation")
                trainer._calculate_rewards = theirs.timed(trainer._calculate_rewards, "reward")
                trainer._get_per_token_logps_and_entropies = theirs.timed(
                    trainer._get_per_token_logps_and_entropies, "reference", when=lambda: not torch.is_grad_enabled())
                trainer._clip_grad_norm = theirs.timed(trainer._clip_grad_norm, "optimizer")
                trainer.train()
            trl_lengths += [row["completions/mean_length"] for row in trainer.state.log_history
                            if "completions/mean_length" in row]
            rounds.append((ours.rows[start:], theirs.rows[tstart:]))
            del trainer
            gc.collect()

    def median(rs, k):
        return statistics.median(row.get(k, 0.0) for row in rs)

    out = []
    for phase in RL_PHASES:
        row = {"phase": phase, "ours_s": median(ours.rows, phase), "trl_s": median(theirs.rows, phase),
               "ratio": statistics.median(median(a, phase) / max(median(b, phase), 1e-9) for a, b in rounds)}
        out.append(row)
        print_row("rl_vs_trl", row)
    has_ppo = hasattr(trl, "PPOTrainer") or importlib.util.find_spec("trl.experimental.ppo") is not None
    print(f"rl_vs_trl {len(ours.rows)} iterations of ours, {len(theirs.rows)} of TRL's, in {rl_rounds} "
          f"round{'s' * (rl_rounds != 1)}; "
          f"completions of {statistics.mean(ours_lengths):.1f} tokens (ours: a row may stop early, the batch runs "
          f"on), {statistics.mean(trl_lengths):.1f} (TRL); PPO not compared: "
          f"{'this section times GRPO only' if has_ppo else f'trl {trl.__version__} has no PPOTrainer'}")
    return out


def profile_decode(model):
    from torch.profiler import ProfilerActivity, profile

    cache = KVCache(model.config, 1, 600)
    token = torch.zeros((1, 1), dtype=torch.long, device=dev)
    with torch.no_grad(), amp:
        model(torch.zeros((1, 500), dtype=torch.long, device=dev), cache=cache)
        step = lambda t: model.decode_step(token, torch.full((1, 1), t, device=dev), cache)  # noqa: E731
        for t in range(500, 510):
            step(t)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == "cuda" else [])
        with profile(activities=activities) as prof:
            for t in range(510, 530):
                step(t)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def parse_shape(spec):
    """"12x12x768:50304" -> dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50304)."""
    dims, _, vocab = spec.partition(":")
    try:
        n_layer, n_head, n_embd = (int(v) for v in dims.split("x"))
        return dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=int(vocab) if vocab else vocab_size)
    except ValueError:
        sys.exit(f"config error: a shape is n_layer x n_head x n_embd : vocab_size (12x12x768:50304), got {spec!r}")


def weight_bytes(model):
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def bench_quant():
    base = getattr(torch, quant_base)
    rows = []
    for spec in quant_shapes:
        shape = parse_shape(spec)
        torch.manual_seed(seed)
        reference = GPT(GPTConfig(**{**model_args(), **shape})).to(dev).eval()
        models = {}
        for p in quant_precisions:
            if p == "fp32":
                models[p] = reference
            elif p == "bf16":
                models[p] = copy.deepcopy(reference).to(torch.bfloat16)
            elif p.removesuffix("+head") in ("int8", "int4"):
                bits = int(p[3])
                group = quant_group_size if bits == 4 else None
                head = p.endswith("+head")
                models[p] = quantize.quantize(copy.deepcopy(reference).to(base), bits, group, quantize_head=head)
            else:
                sys.exit(f"config error: quant_precisions are fp32 | bf16 | int8 | int4 | int8+head | int4+head, got {p!r}")
        n = min(quant_new_tokens, block_size - prompt_len)
        prompt = torch.randint(0, shape["vocab_size"], (1, prompt_len), device=dev)
        for m in models.values():  # warm up; the first decode step measures the paths (quantize.QUANT_PATHS)
            m.generate(prompt, 4, temperature=0)
        times = {p: [] for p in models}
        for _ in range(repeats):  # alternating: a machine that slows down mid-run slows every precision
            for p, m in models.items():
                sync()
                t0 = time.perf_counter()
                m.generate(prompt, n, temperature=0)
                sync()
                times[p].append(time.perf_counter() - t0)
        fp32 = n / statistics.median(times["fp32"]) if "fp32" in times else None
        for p, m in models.items():
            tok_s = n / statistics.median(times[p])
            row = {"shape": spec, "precision": p, "n": n, "tok_s": tok_s, "vs_fp32": tok_s / fp32 if fp32 else None,
                   "weight_mb": weight_bytes(m) / 2**20,
                   "kernels": dict(collections.Counter(w.last_path for w in quantize.quantized_weights(m)))}
            rows.append(row)
            print_row("quant", row)
        del models, reference
        gc.collect()
    return rows


def vm_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def bench_memory_one(variant):
    """One variant of qlora_memory, in this process: build, quantize, then the peak of a few steps."""
    bits = {"full": None, "lora": None, "lora-int8": 8, "lora-int4": 4}.get(variant, "?")
    if bits == "?":
        sys.exit(f"config error: memory_variants are full | lora | lora-int8 | lora-int4, got {variant!r}")
    shape = parse_shape(memory_shape)
    args = {**model_args(), **shape, "block_size": memory_block}
    if variant != "full":
        args.update(lora_rank=memory_lora_rank, lora_targets=("c_q", "c_v"))
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**args)).to(dev)
    if bits:
        quantize.quantize(model, bits, quant_group_size if bits == 4 else None)
    model.grad_checkpointing = memory_grad_checkpointing
    gc.collect()
    built = vm_kb("VmRSS")
    try:  # reset the high-water mark to the present RSS: the peak is then the training steps'
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    opt = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), device_type)
    x = torch.randint(0, shape["vocab_size"], (memory_batch, memory_block), device=dev)
    for _ in range(memory_steps):
        with amp:
            loss = model.loss(model(x), x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = vm_kb("VmHWM")
    row = {"variant": variant, "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
           "weight_mb": weight_bytes(model) / 2**20, "built_mb": built / 1024, "peak_mb": peak / 1024,
           "over_built_mb": (peak - built) / 1024, "peak_reset": reset}
    if device_type == "cuda":
        row["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def bench_qlora_memory():
    rows = []
    passed = [f"--{k}={v}" for k, v in config.items() if k not in ("sections", "memory_variants", "json")]
    # large tensors from their own mmap, returned to the system when freed: RSS then follows what lives
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    for variant in memory_variants:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "row.json")
            res = subprocess.run([sys.executable, os.path.abspath(__file__), "--sections=memory_one",
                                  f"--memory_variants={variant}", f"--json={out}", *passed],
                                 env=env, capture_output=True, text=True)
            if res.returncode != 0:
                sys.exit(f"qlora_memory: the {variant} process failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
            with open(out) as f:
                row = jsonlib.load(f)["memory_one"]
        lora = next((r["peak_mb"] for r in rows if r["variant"] == "lora"), None)
        row["vs_lora"] = row["peak_mb"] / lora if lora else None
        rows.append(row)
        print_row("memory", row)
    return rows


def print_row(section, row):
    cells = []
    for k, v in row.items():
        if isinstance(v, float):  # mfu, seconds and ratios to three decimals, rates to one
            v = f"{v:.3f}" if k in ("mfu", "ratio") or k.endswith("_s") and not k.endswith("tok_s") else f"{v:,.1f}"
        elif isinstance(v, int) and k in ("kv_bytes", "params", "active", "trainable"):
            v = f"{v:,}"
        cells.append(f"{k}={v}")
    print(f"{section:8s} " + "  ".join(cells), flush=True)


def busy_cores(seconds=1.0):
    """How many cores other processes keep busy, measured over `seconds` while this one sleeps:
    the busy share of /proc/stat's CPU time times the core count (Linux). Elsewhere the 1-minute
    load average, which also counts a process that has just ended."""

    def busy_total():
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
        idle = ticks[3] + ticks[4]  # idle and iowait
        return sum(ticks) - idle, sum(ticks)

    try:
        b0, t0 = busy_total()
        time.sleep(seconds)
        b1, t1 = busy_total()
        return (b1 - b0) / max(t1 - t0, 1) * (os.cpu_count() or 1)
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def machine():
    """What produced the figures: CPU model, torch version, threads; and a warning when another
    process is using the CPU (timings would be off)."""
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    if device_type == "cuda":
        cpu += f", GPU {torch.cuda.get_device_name()}"
    load = busy_cores()
    if load > 0.5:
        print(f"warning: other processes keep {load:.2f} cores busy: the timings will be off")
    return {"cpu": cpu, "torch": torch.__version__, "threads": torch.get_num_threads(), "load": round(load, 2)}


if __name__ == "__main__":
    config = configure(globals())
    if threads:
        torch.set_num_threads(threads)
    dev = common.pick_device(device)
    device_type = "cuda" if dev.startswith("cuda") else dev
    amp = common.autocast(device_type, common.pick_dtype(dtype, device_type))
    wanted = [s for s in sections.split(",") if s]
    unknown = set(wanted) - {"decode", "hf", "rolling", "batch", "train", "prefill", "grpo", "ppo", "rl_vs_trl",
                             "profile", "quant", "qlora_memory", "memory_one"}
    if unknown:
        sys.exit(f"config error: unknown sections {sorted(unknown)}")
    if wanted == ["memory_one"]:  # a child of qlora_memory: nothing else in this process
        row = bench_memory_one(memory_variants[0])
        with open(json, "w") as f:
            jsonlib.dump({"memory_one": row}, f)
        sys.exit(0)
    info = machine()
    model = build()
    active = f" ({n_expert} experts, top-{n_expert_active}: {model.num_params(active=True) / 1e6:.2f}M active)"
    print(f"model: {model.num_params() / 1e6:.2f}M parameters{active if n_expert else ''}, {n_layer} layers x {n_embd}, "
          f"vocab {vocab_size}; device {dev}, dtype {dtype}; {info['cpu']}, torch {info['torch']}, threads {info['threads']}")
    results = {"config": config, "device": dev, "machine": info}
    if "decode" in wanted:
        results["decode"] = bench_decode(model)
    if "hf" in wanted:
        results["hf"] = bench_hf(model)
    if "rolling" in wanted:
        results["rolling"] = bench_rolling()
    if "batch" in wanted:
        results["batch"] = bench_batch(model)
    if "train" in wanted:
        results["train"] = bench_train()
    if "prefill" in wanted:
        results["prefill"] = bench_prefill(model)
    for script in ("grpo", "ppo"):
        if script in wanted:
            results[script] = bench_rl(script)
    if "rl_vs_trl" in wanted:
        results["rl_vs_trl"] = bench_rl_vs_trl()
    if "profile" in wanted:
        profile_decode(model)
    del model
    if "quant" in wanted:
        results["quant"] = bench_quant()
    if "qlora_memory" in wanted:
        results["qlora_memory"] = bench_qlora_memory()
    if json:
        with open(json, "w") as f:
            jsonlib.dump(results, f, indent=2)
        print(f"wrote {json}")
