"""
What is fastest on this machine is timed on the real model, never assumed. Each choice here is
made once, before the work starts, and kept only where it measures faster beyond noise (faster):

    cpu_dtype        bf16 autocast or float32 for a training step, on a CPU with bf16 instructions
                     (common.prepare_training, when dtype=auto)
    decode_dtype     a bf16 copy of the model or the float32 one for decoding (sample.py, dtype=auto)
    compile_decode   torch.compile of the decode step over a static cache (sample.py, bench.py:
                     --compile=true), CUDA graphs on a GPU
    split_linear     the split-weight matmul of decoding, swapped into the Linears where it pays
                     (sample.py and bench.py: --split_linear=true)

quantize.py's kernel choice times its two paths with faster too. model.py knows none of this: a
forward is the same straight line whatever was chosen.
"""

import copy
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import KVCache, Linear


def faster(plain, trick, device, repeats=15, calls=4):
    """Time plain() and trick(), alternating -> True when trick's median time is below 0.9 of
    plain's: a trick is kept only where it is faster beyond noise."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        return time.perf_counter() - t0

    timed(plain), timed(trick)  # warm up both
    ratios = sorted(timed(trick) / max(timed(plain), 1e-9) for _ in range(repeats))
    return ratios[len(ratios) // 2] < 0.9


# -----------------------------------------------------------------------------
# bf16 or float32 on a CPU


def cpu_has_bf16():
    """Whether this CPU computes in bf16 natively (AVX512-BF16 or AMX), from /proc/cpuinfo: without
    those instructions bf16 is emulated and slower than float32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_cpu_dtype(step, repeats=3, min_speedup=1.2):
    """Settle dtype=auto on a CPU with bf16 instructions: time step(dtype) (one training step, or one
    decode step, of the real model; it returns its loss or logits) in float32 and in bfloat16,
    alternating, and take bf16 only when its median time is at least min_speedup faster and its
    output is finite. -> (dtype, {dtype: seconds})."""
    times = {"float32": [], "bfloat16": []}
    finite = True
    for dt in times:  # warm up both
        step(dt)
    for _ in range(repeats):
        for dt in times:
            t0 = time.perf_counter()
            out = step(dt)
            times[dt].append(time.perf_counter() - t0)
            if dt == "bfloat16":
                finite = finite and bool(torch.isfinite(out).all())
    med = {dt: sorted(v)[len(v) // 2] for dt, v in times.items()}
    faster_bf16 = med["float32"] >= min_speedup * med["bfloat16"]
    return ("bfloat16" if faster_bf16 and finite else "float32"), med


def cpu_dtype(model, device, batch=4):
    """The training dtype of model here: one forward and backward on a fixed random batch of (batch,
    min(block_size, 256)) tokens in float32 and under bf16 autocast (choose_cpu_dtype), gradients
    cleared after. -> (dtype, {dtype: seconds a step})."""
    T = min(model.config.block_size, 256)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, model.config.vocab_size, (batch, T + 1), generator=g).to(device)

    def step(dtype):
        with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=dtype == "bfloat16"):
            loss = model.loss(model(x[:, :-1]), x[:, 1:])
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.detach()

    return choose_cpu_dtype(step)


def decode_dtype(model, device):
    """dtype=auto for decoding on a CPU with bf16 instructions: time one decode step of the model in
    float32 and of a bf16 copy, alternating, at about the middle of a 256-token context, and keep
    the bf16 copy only where it is faster by 20%. -> (the model to decode with, its dtype)."""
    candidates = {"float32": model, "bfloat16": copy.deepcopy(model).to(torch.bfloat16)}
    L = max(1, min(model.config.block_size, 256) // 2)
    idx = torch.zeros(1, L, dtype=torch.long, device=device)
    pos = torch.arange(L, device=device)[None]

    @torch.no_grad()
    def step(dtype):
        m = candidates[dtype]
        cache = KVCache(m.config, 1, L + 9)
        m.prefill(idx, pos, cache)
        for t in range(8):
            logits = m.decode_step(idx[:, :1], pos[:, -1:] + 1 + t, cache)
        return logits

    dtype, _ = choose_cpu_dtype(step)
    return candidates[dtype], dtype


# -----------------------------------------------------------------------------
# a compiled decode step


def compile_decode(model, batch_size=1, measure=True):
    """Compile model.decode_step, as gpt-fast does: one graph per batch shape over a static cache
    (every slot, unwritten ones masked), and on a GPU CUDA graphs ("reduce-overhead"), which remove
    the per-kernel launch cost that dominates decoding a small model one token at a time. The
    weights are read at every call, so it stays valid as they train. With measure the compiled
    step and the eager one are timed, alternating, on batch_size rows at about the middle of the
    context, and model.generate uses the compiled one (model.compiled_decode_step) only where it is
    faster by 10%. -> "compiled" or "eager", and the two step times in ms."""
    on_gpu = model.wte.weight.is_cuda
    compiled = torch.compile(model.decode_step, mode="reduce-overhead" if on_gpu else None)
    if not measure:
        model.compiled_decode_step = compiled
        return "compiled", None, None
    cfg, dev = model.config, model.wte.weight.device
    L = max(1, min(cfg.block_size, 256) // 2)
    prompt = torch.zeros(batch_size, L, dtype=torch.long, device=dev)
    pos = torch.arange(L, device=dev)[None].expand(batch_size, L)

    def steps(step, static, n=8):
        cache = KVCache(cfg, batch_size, L + 2 * n + 2, static=static)
        with torch.no_grad():
            model.prefill(prompt, pos, cache)
            token = torch.zeros(batch_size, 1, dtype=torch.long, device=dev)
            step(token, pos[:, -1:] + 1, cache)  # compile / warm up on this cache
            if on_gpu:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for t in range(n):
                step(token, pos[:, -1:] + 2 + t, cache)
            if on_gpu:
                torch.cuda.synchronize()
        return (time.perf_counter() - t0) / n

    was_training = model.training
    model.eval()
    times = {"eager": [], "compiled": []}
    for _ in range(3):
        times["eager"].append(steps(model.decode_step, False))
        times["compiled"].append(steps(compiled, True))
    model.train(was_training)
    eager, comp = (sorted(v)[1] * 1000 for v in (times["eager"], times["compiled"]))
    choice = "compiled" if comp < 0.9 * eager else "eager"
    model.compiled_decode_step = compiled if choice == "compiled" else None
    return choice, eager, comp


# -----------------------------------------------------------------------------
# the split-weight matmul of decoding

# Decoding one row is a chain of matrix-vector products, bound by how fast the weights stream from
# memory. Whether PyTorch's own F.linear does that well depends on the CPU: where its BLAS runs them
# on one thread, cutting the weight's rows into one block per thread and running the blocks with
# one bmm was 2-3x faster; on another CPU the same trick was 2x slower (README, "The KV cache and
# bench.py"). So it is an opt-in swap, chosen once by timing the model's own decoding both ways
# (a weight timed alone is not the same work as a decode step); `python bench.py
# --split_linear=true` times decoding with it beside the plain model.
SPLIT_MAX_ROWS = 8  # more rows than this (a batch, a prefill): F.linear


def split_matmul(x, weight, bias, n):
    """x W^T + b with W's rows cut into n blocks, one bmm over the blocks: F.linear, up to rounding."""
    rows = x.numel() // x.size(-1)
    x2 = x.reshape(rows, x.size(-1))
    y = torch.bmm(weight.view(n, -1, weight.size(1)), x2.t().expand(n, -1, -1))  # (n, out/n, rows)
    y = y.reshape(weight.size(0), rows).t().reshape(*x.shape[:-1], weight.size(0))
    return y if bias is None else y + bias


class SplitLinear(Linear):
    """A Linear whose products of at most SPLIT_MAX_ROWS rows without gradients are split_matmul's
    over n blocks; the same parameters, taken over from the Linear it replaces, and state-dict keys."""

    def __init__(self, base, n):
        nn.Module.__init__(self)  # not nn.Linear.__init__, which would allocate a second weight
        self.in_features, self.out_features, self.n = base.in_features, base.out_features, n
        self.weight = base.weight
        self.register_parameter("bias", base.bias)

    def forward(self, x):
        if x.numel() // x.size(-1) > SPLIT_MAX_ROWS or torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        return split_matmul(x, self.weight, self.bias, self.n)


@torch.no_grad()
def split_linear(model, everywhere=False, new_tokens=16):
    """Swap a SplitLinear, one block per thread, into every plain Linear of model that fits (a float
    weight whose rows the threads divide, on a CPU, more than one thread) when greedy decoding of
    new_tokens measures faster with them than without (alternating; the whole decode step, since a
    weight timed alone sits in cache where in the model it streams from memory), or with everywhere
    regardless. -> "split" or "plain", what the model now takes ("" where nothing can be split)."""
    n = torch.get_num_threads()
    if n == 1 or model.wte.weight.device.type != "cpu":
        return ""
    sites = [(model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2], m)
             for name, m in model.named_modules()
             if type(m) is Linear and isinstance(m.weight, torch.Tensor) and m.out_features % n == 0]
    if not sites:
        return ""
    plain = [m for _, _, m in sites]
    split = [SplitLinear(m, n) for m in plain]

    def use(layers):
        for (parent, child, _), layer in zip(sites, layers):
            setattr(parent, child, layer)

    use(split)
    if everywhere:
        return "split"
    prompt = torch.zeros(1, 8, dtype=torch.long, device=model.wte.weight.device)
    decode = lambda layers: (use(layers), model.generate(prompt, new_tokens, temperature=0))  # noqa: E731
    keep = faster(lambda: decode(plain), lambda: decode(split), "cpu", repeats=7, calls=2)
    use(split if keep else plain)
    return "split" if keep else "plain"
