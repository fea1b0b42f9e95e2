"""
Benchmark: what the KV cache buys, and how fast the model trains, on a randomly initialised model
(no data, no checkpoint). Prints a table; --json=PATH writes the same figures as JSON.

    python bench.py                                  # CPU, fp32, 6 layers x 384, vocab 65
    python bench.py --device=cuda --dtype=bfloat16   # one GPU
    python bench.py --sections=decode --nocache=false --decode_lengths=128,512
    python bench.py --sections=profile               # where one decode step spends its time

Sections:
  decode   batch 1, a prompt_len-token prompt, N new greedy tokens: tokens/s with the cache and
           without it (the whole context recomputed each step), the speedup, same tokens or not
  rolling  a sliding-window rope model generating 1x, 4x, 16x its window: tokens/s and KV bytes
  batch    decode tokens/s (all rows together) for several batch sizes, with the cache
  train    one training step (forward, backward, AdamW): tokens/s and MFU, dense, MoE and LoRA
  prefill  prompt tokens/s for a prefill_len-token prompt
  profile  a torch.profiler table of one decode step at position ~500

Timing: warm-up runs, then the median of `repeats` runs, synchronising the GPU around each.
"""

import json as jsonlib
import statistics
import sys
import time
from dataclasses import fields

import torch

import common
from model import GPT, GPTConfig, KVCache

# -----------------------------------------------------------------------------
# I/O
json = ""  # write the figures to this path as JSON as well
sections = "decode,rolling,batch,train,prefill"  # any of decode,rolling,batch,train,prefill,profile
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
# decode
prompt_len = 16  # tokens in the prompt
decode_lengths = (128, 256, 512, 1000)  # new tokens (capped at block_size - prompt_len)
nocache = True  # also time the uncached path (minutes on a CPU at N = 1000)
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
# prefill
prefill_len = 512
# timing and system
repeats = 3  # timed runs per figure (median); the uncached decode runs once
device = "auto"
dtype = "float32"  # float32 | bfloat16 | float16 (autocast)
compile = False  # compile the decode step (model.compile_decode()) and the training step
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
        model.compile_decode()
    return model


def bench_decode(model):
    rows = []
    prompt = torch.randint(0, vocab_size, (1, prompt_len), device=dev)
    for n in decode_lengths:
        n = min(n, block_size - prompt_len)
        out = {}
        with amp:
            t = timed(lambda: out.__setitem__("cache", model.generate(prompt, n, temperature=0)))
            row = {"n": n, "cache_tok_s": n / t}
            if nocache:
                t = timed(lambda: out.__setitem__("nocache", model.generate(prompt, n, temperature=0, use_cache=False)), 1)
                row.update(nocache_tok_s=n / t, speedup=row["cache_tok_s"] * t / n,
                           same_tokens=bool(torch.equal(out["cache"], out["nocache"])))
        rows.append(row)
        print_row("decode", row)
    return rows


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
    variants = {"dense": {}}
    names = {f.name for f in fields(GPTConfig)}
    if "n_expert" in names:
        variants["moe 8x top-2"] = dict(n_expert=8, n_expert_active=2)
    if "lora_rank" in names:
        variants["lora r8 q,v"] = dict(lora_rank=8, lora_alpha=16.0, lora_targets=("c_q", "c_v"))
    peak = common.peak_flops(device_type)
    rows = []
    for name, overrides in variants.items():
        torch.manual_seed(seed)
        model = GPT(GPTConfig(**{**model_args(), "block_size": max(train_block, block_size), **overrides})).to(dev)
        opt = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), device_type)
        step_model = torch.compile(model) if compile else model
        x = torch.randint(0, vocab_size, (train_batch, train_block), device=dev)

        def step():
            with amp:
                _, loss = step_model(x, x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        t = timed(step)
        tok_s = train_batch * train_block / t
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        row = {"variant": name, "tok_s": tok_s, "mfu": model.flops_per_token(train_block) * tok_s / peak,
               "params": model.num_params(non_embedding=False), "trainable": trainable}
        rows.append(row)
        print_row("train", row)
    return rows


def bench_prefill(model):
    n = min(prefill_len, block_size)
    prompt = torch.randint(0, vocab_size, (1, n), device=dev)

    def run():
        with torch.no_grad(), amp:
            model(prompt, cache=KVCache(model.config, 1, n + 1), hidden=True)

    row = {"n": n, "tok_s": n / timed(run)}
    print_row("prefill", row)
    return [row]


def profile_decode(model):
    from torch.profiler import ProfilerActivity, profile

    cache = KVCache(model.config, 1, 600)
    token = torch.zeros((1, 1), dtype=torch.long, device=dev)
    with torch.no_grad(), amp:
        model(torch.zeros((1, 500), dtype=torch.long, device=dev), cache=cache, hidden=True)
        step = lambda t: model.lm_head(model(token, pos=torch.full((1, 1), t, device=dev), cache=cache, hidden=True)[0][:, -1])
        for t in range(500, 510):
            step(t)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == "cuda" else [])
        with profile(activities=activities) as prof:
            for t in range(510, 530):
                step(t)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def print_row(section, row):
    cells = []
    for k, v in row.items():
        if isinstance(v, float):
            v = f"{v:.3f}" if k == "mfu" else f"{v:,.1f}"
        elif isinstance(v, int) and k in ("kv_bytes", "params", "trainable"):
            v = f"{v:,}"
        cells.append(f"{k}={v}")
    print(f"{section:8s} " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    config = common.configure(globals())
    dev = common.pick_device(device)
    device_type = "cuda" if dev.startswith("cuda") else dev
    amp = common.autocast(device_type, dtype)
    wanted = [s for s in sections.split(",") if s]
    unknown = set(wanted) - {"decode", "rolling", "batch", "train", "prefill", "profile"}
    if unknown:
        sys.exit(f"config error: unknown sections {sorted(unknown)}")
    model = build()
    print(f"model: {model.num_params() / 1e6:.2f}M parameters, {n_layer} layers x {n_embd}, vocab {vocab_size}; "
          f"device {dev}, dtype {dtype}, threads {torch.get_num_threads()}")
    results = {"config": config, "device": dev}
    if "decode" in wanted:
        results["decode"] = bench_decode(model)
    if "rolling" in wanted:
        results["rolling"] = bench_rolling()
    if "batch" in wanted:
        results["batch"] = bench_batch(model)
    if "train" in wanted:
        results["train"] = bench_train()
    if "prefill" in wanted:
        results["prefill"] = bench_prefill(model)
    if "profile" in wanted:
        profile_decode(model)
    if json:
        with open(json, "w") as f:
            jsonlib.dump(results, f, indent=2)
        print(f"wrote {json}")
