"""
Plumbing shared by every stage script: config parsing, device and dtype, DDP, checkpoints,
reading conversation files, logging, the learning-rate schedule. Nothing in here is a training step; the physics of each
stage stays in its own script.

The config mechanism, as in nanoGPT but checked. A script declares its settings as module
globals and then calls

    config = configure(globals())

which applies, in order, every `config/*.py` file and every `--key=value` argument found on the
command line. For example:

    python train.py config/tiny_shakespeare.py --batch_size=32 --compile=false

An unknown key fails (from a file or the command line), an int is accepted where a float is
expected, true/false/1/0 parse as booleans, and a wrong type raises ValueError naming the key.
"""

import ast
import contextlib
import copy
import gc
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time

import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------
# config

_SIMPLE_TYPES = (bool, int, float, str, type(None), tuple, list)
_TRUE = {"true", "True", "1", "yes"}
_FALSE = {"false", "False", "0", "no"}


def config_keys(g):
    """The settings of a script: its public module globals of simple types, except CONSTANTS."""
    return [k for k, v in g.items() if not k.startswith("_") and not k.isupper() and isinstance(v, _SIMPLE_TYPES)]


def parse_value(key, default, value):
    """Convert `value` (a string from the command line, or any object from a config file) to the
    type of `default`. Raises ValueError naming the key, the expected type and the value given."""

    def fail(expected):
        raise ValueError(f"config key {key!r} expects {expected}, got {value!r}")

    if isinstance(default, bool):  # before int: bool is a subclass of int
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value in _TRUE | _FALSE:
            return value in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        fail("a bool (true/false/1/0)")
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
            try:  # accept "1e4" for an int when it is a whole number
                f = float(value)
                if f.is_integer():
                    return int(f)
            except ValueError:
                pass
        fail("an int")
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        fail("a float")
    if isinstance(default, str):
        if isinstance(value, str):
            return value
        fail("a str")
    if isinstance(default, (tuple, list)):
        if isinstance(value, str):
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                # a bare comma-separated list: --lora_targets=q,v
                value = tuple(s for s in value.split(",") if s)
        if isinstance(value, (str, int, float)):  # a single item: --decode_lengths=512
            value = (value,)
        if isinstance(value, (tuple, list)):
            return type(default)(value)
        fail("a tuple")
    # default None: the setting is optional; take a Python literal if it is one, else the string
    if isinstance(value, str):
        if value in ("None", "none", "null"):
            return None
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    return value


def configure(g, argv=None, verbose=True, stream=None):
    """Override the settings in `g` (a script's globals()) from config files and --key=value
    arguments. Returns the resolved config as a dict, which is also written back into `g`, and
    prints it (to stdout, or `stream`)."""
    if argv is None:  # called by a script: a bad setting ends it with the message, no traceback
        try:
            return configure(g, sys.argv[1:], verbose, stream)
        except ValueError as e:
            sys.exit(f"config error: {e}")
    keys = config_keys(g)
    config = {k: g[k] for k in keys}
    for arg in argv:
        if not arg.startswith("--"):
            # a config file: run it in a namespace seeded with the current values, so it may read
            # them (lr_decay_iters = max_iters), then take back every plain value it set
            if not os.path.isfile(arg):
                raise ValueError(f"config file {arg!r} not found (and not a --key=value argument)")
            ns = dict(config)
            with open(arg) as f:
                exec(compile(f.read(), arg, "exec"), ns)
            for k, v in ns.items():
                if k.startswith("_") or k == "__builtins__" or callable(v) or type(v).__name__ == "module":
                    continue
                if k not in config:
                    raise ValueError(f"unknown config key {k!r} in {arg}")
                if v is not config[k]:
                    config[k] = parse_value(k, g[k], v)
        else:
            key, sep, value = arg[2:].partition("=")  # only the first '=' splits
            if not sep:
                raise ValueError(f"expected --key=value, got {arg!r}")
            if key not in config:
                raise ValueError(f"unknown config key {key!r} on the command line")
            config[key] = parse_value(key, g[key], value)
    g.update(config)
    if verbose:
        print("config: " + " ".join(f"{k}={v!r}" for k, v in config.items()), file=stream or sys.stdout)
    return config


# -----------------------------------------------------------------------------
# device, dtype, distributed


def pick_device(device="auto"):
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(dtype, device_type):
    """auto: bf16 on a GPU that supports it, else fp16 (with a GradScaler) on CUDA. On a CPU, auto
    stays "auto" when the CPU has bf16 instructions (AVX512-BF16 or AMX): whether bf16 is faster
    there depends on the model's shapes, so choose_cpu_dtype settles it by measurement once the
    model exists; without them, float32."""
    if dtype == "auto":
        if device_type == "cuda":
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "auto" if device_type == "cpu" and cpu_has_bf16() else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be auto | float32 | bfloat16 | float16, got {dtype!r}")
    if dtype == "float16" and device_type != "cuda":
        raise ValueError(f"dtype float16 needs CUDA (a GradScaler); use bfloat16 or float32 on {device_type}")
    return dtype


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
    faster = med["float32"] >= min_speedup * med["bfloat16"]
    return ("bfloat16" if faster and finite else "float32"), med


class Autocast:
    """`with ctx:` runs forward passes in the run's precision: autocast to dtype, or nothing in
    float32. dtype may be settled after the model exists (set it before the first `with`), which
    is how dtype=auto on a CPU is decided by measurement."""

    def __init__(self, device_type, dtype):
        self.device_type, self.dtype = device_type, dtype
        self._stack = []

    def __enter__(self):
        self._stack.append(autocast(self.device_type, self.dtype))
        return self._stack[-1].__enter__()

    def __exit__(self, *exc):
        return self._stack.pop().__exit__(*exc)


def autocast(device_type, dtype):
    """The mixed-precision context for forward passes; a no-op in float32."""
    if dtype in ("float32", "auto"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))


class Distributed:
    """Who we are under torchrun (or alone). rank 0 is the master: it alone writes files and logs."""

    def __init__(self, device="auto", backend="auto"):
        self.enabled = int(os.environ.get("RANK", -1)) != -1
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.master = self.rank == 0
        device = pick_device(device)
        if self.enabled:
            if device.startswith("cuda"):
                device = f"cuda:{self.local_rank}"
                torch.cuda.set_device(device)
            if backend == "auto":
                backend = "nccl" if device.startswith("cuda") else "gloo"
            dist.init_process_group(backend=backend)
        self.device = device
        self.device_type = "cuda" if device.startswith("cuda") else device.split(":")[0]

    def all_reduce_mean(self, x):
        if self.enabled:
            dist.all_reduce(x, op=dist.ReduceOp.SUM)
            x /= self.world_size
        return x

    def any(self, flag):
        """True on every rank if it is True on any rank (to stop together)."""
        if not self.enabled:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def gather_objects(self, obj):
        """A list of obj from every process, in rank order (a list of one when alone)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def check_in_sync(self, model):
        """A cheap guard against silent divergence: every process must end with the same
        parameters. Exits with the digests if they differ."""
        if not self.enabled:
            return
        digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in model.parameters())).hexdigest()
        digests = self.gather_objects(digest)
        if self.master:
            if len(set(digests)) != 1:
                sys.exit(f"DDP error: the processes ended with different parameters: {digests}")
            print(f"ddp: parameters identical on all {self.world_size} processes")

    def close(self):
        if self.enabled and dist.is_initialized():
            # Collectives leave work objects in reference cycles; freed only at interpreter exit,
            # after the group is gone, gloo's threads abort the process (about 1 run in 20 here)
            gc.collect()
            dist.barrier()  # leave together: a process torn down mid-exchange aborts its peers
            dist.destroy_process_group()


def compile_works(device):
    """Whether torch.compile runs here (it needs triton on a GPU, a C++ compiler on a CPU):
    compile something tiny and see, so that a platform without it falls back to eager."""
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(4, device=device))
        return True
    except Exception as e:
        print(f"torch.compile does not work here ({type(e).__name__}: {str(e)[:200]}); running eager")
        return False


def setup(device, backend, dtype, compile, seed, gradient_accumulation_steps, out_dir):
    """The start of every training script: processes, device, precision, seeds, out_dir.
    -> (ddp, micro-steps of this process, the resolved dtype, its autocast context, compile).
    gradient_accumulation_steps is summed over the processes; None for a stage that has none
    (the RL stages cut their batch into minibatches instead), which then gets None back."""
    ddp = Distributed(device, backend)
    if gradient_accumulation_steps is not None and gradient_accumulation_steps % ddp.world_size:
        sys.exit(f"config error: gradient_accumulation_steps={gradient_accumulation_steps} is not divisible "
                 f"by the {ddp.world_size} processes")
    dtype = pick_dtype(dtype, ddp.device_type)
    # inductor on a CPU compiles slowly for small gains at this scale; on a GPU, only where it works
    compile = compile and ddp.device_type == "cuda" and compile_works(ddp.device)
    torch.manual_seed(seed + ddp.rank)  # dropout draws from the global RNG; batches never do
    if ddp.device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if ddp.master:
        os.makedirs(out_dir, exist_ok=True)
    micro_steps = None if gradient_accumulation_steps is None else gradient_accumulation_steps // ddp.world_size
    return ddp, micro_steps, dtype, Autocast(ddp.device_type, dtype), compile


def peak_flops(device_type):
    """Dense bf16 peak of known GPUs from their spec sheets; elsewhere (CPU) the measured rate of
    a large float32 matmul, so MFU on a CPU reads as a share of what its matmuls can do."""
    if device_type == "cuda":
        name = torch.cuda.get_device_name()
        for key, flops in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40", 181e12),
                           ("A10", 125e12), ("4090", 165e12), ("3090", 71e12)):
            if key in name:
                return flops
    n = 1024
    g = torch.Generator(device_type).manual_seed(0)  # not the global RNG: dropout draws from it
    a, b = (torch.randn(n, n, device=device_type, generator=g) for _ in range(2))
    for _ in range(2):
        a @ b
    t0 = time.perf_counter()
    for _ in range(8):
        a @ b
    if device_type == "cuda":
        torch.cuda.synchronize()
    return 8 * 2 * n**3 / (time.perf_counter() - t0)


# -----------------------------------------------------------------------------
# learning-rate schedule


def optimizer_step(model, optimizer, scaler, grad_clip):
    """The end of every training step: unscale fp16 gradients, clip their global norm to
    grad_clip (0 = off), step, update the scaler, clear the gradients. -> the norm before clipping."""
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return norm


def lr_at(it, learning_rate, warmup_iters, lr_decay_iters, min_lr, decay_lr=True):
    """Linear warmup from learning_rate/warmup_iters (never 0 at step 0) to learning_rate, whatever
    decay_lr says (a fresh AdamW's first steps are the largest); then with decay_lr cosine to
    min_lr at lr_decay_iters and min_lr after, without it learning_rate."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / warmup_iters
    if not decay_lr:
        return learning_rate
    if it >= lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


# -----------------------------------------------------------------------------
# checkpoints


def save_checkpoint(obj, path):
    """torch.save to a temporary file, flushed to disk, then renamed over the old one, and the
    rename flushed too: a crash or a power loss mid-save leaves the previous checkpoint intact
    (without the fsyncs the rename can reach the disk before the data does)."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def load_checkpoint(path):
    """Load a checkpoint to the CPU (weights_only: no code runs from the file), with errors that
    say what is wrong instead of a pickle traceback. A Hugging Face model folder (config.json
    inside) is read as one too, see hf_checkpoint."""
    if os.path.isfile(os.path.join(path, "config.json")):  # a Hugging Face folder
        return hf_checkpoint(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {path} is damaged or not a checkpoint: {type(e).__name__}: {e}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise ValueError(f"checkpoint {path} has no 'model' and 'model_args': not written by this repository")
    return ckpt


def without_scalar_head(state, model_args):
    """A state dict and model_args as those of the same GPT without its scalar head: how ppo.py
    saves a policy whose value head shares its backbone, so that it loads as a plain policy."""
    return {k: v for k, v in state.items() if not k.startswith("score_head.")}, dict(model_args, scalar_head=False)


def save_training_checkpoint(path, ddp, model, optimizer, scaler, dtype=None, drop_scalar_head=False,
                             **info):
    """Everything needed to resume exactly: the unwrapped, uncompiled model, its config, the
    optimizer, the scaler and every process's RNG state, plus the stage's info (iter_num,
    best_val_loss, config, meta, stage ...). drop_scalar_head: save the model without its scalar
    head (without_scalar_head; the stage stores the head in info). Every process must call it
    (the RNG states are gathered); only the master writes."""
    torch_states = ddp.gather_objects(torch.get_rng_state())
    cuda_states = ddp.gather_objects(torch.cuda.get_rng_state()) if ddp.device_type == "cuda" else []
    if not ddp.master:
        return
    state, model_args = model.state_dict(), model.config.to_dict()
    if drop_scalar_head:
        state, model_args = without_scalar_head(state, model_args)
    save_checkpoint({
        "model": state,
        "model_args": model_args,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": {"torch": torch_states, "cuda": cuda_states},
        "dtype": dtype,  # the precision the run trains in, which a resume keeps
        "quantization": model.quantization,  # None, or how the state dict's quantized weights are stored
        **info,
        "git": git_commit(),
    }, path)


def restore_training_state(ckpt, ddp, optimizer, scaler):
    """The other half of save_training_checkpoint: optimizer, scaler and this process's RNG."""
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    rng = ckpt["rng"]
    torch.set_rng_state(rng["torch"][ddp.rank % len(rng["torch"])])
    if ddp.device_type == "cuda" and rng.get("cuda"):
        torch.cuda.set_rng_state(rng["cuda"][ddp.rank % len(rng["cuda"])])


def prepare_training(model, ddp, dtype, compile, weight_decay, learning_rate, betas, resume_from=None,
                     dynamic=None, ctx=None, head_lr_scale=1.0):
    """Put a model on the device with its AdamW and fp16 grad scaler (their state and the RNG
    restored from the checkpoint resume_from, when resuming), print its size, then compile it
    and wrap it for DDP. -> (model, the model to call in the loop, optimizer, scaler); the first
    is the plain module, for checkpoints, generation and flop counts. dynamic is passed on to
    torch.compile (True where batch shapes vary). ctx, setup's Autocast: where its dtype is still
    "auto" (a CPU with bf16 instructions), a training step of this model is timed in float32 and
    in bf16 and the faster is set. head_lr_scale: a scalar head's rate relative to the rest
    (configure_optimizers)."""
    model.to(ddp.device)
    if ctx is not None and ctx.dtype == "auto":  # a CPU with bf16 instructions: measure which is faster
        if resume_from is not None and resume_from.get("dtype") in ("float32", "bfloat16"):
            ctx.dtype = resume_from["dtype"]  # what the run chose: a resume must compute what it did
        else:
            ctx.dtype, times = choose_cpu_dtype(training_step_timer(model, ddp.device))
            if ddp.master:
                print(f"dtype auto: a training step takes {times['float32'] * 1000:.0f} ms in float32, "
                      f"{times['bfloat16'] * 1000:.0f} ms in bfloat16 autocast: using {ctx.dtype}")
        dtype = ctx.dtype
    scaler = torch.amp.GradScaler(ddp.device_type, enabled=(dtype == "float16"))
    optimizer = model.configure_optimizers(weight_decay, learning_rate, betas, ddp.device_type, head_lr_scale)
    if resume_from is not None:
        restore_training_state(resume_from, ddp, optimizer, scaler)
    if ddp.master:
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"parameters: {model.num_params() / 1e6:.2f}M ({n_trainable / 1e6:.3f}M trainable)")
    wrapped = model
    if compile:
        if ddp.master:
            print("compiling the model (a minute or so)...")
        wrapped = torch.compile(wrapped, dynamic=dynamic)
    if ddp.enabled:  # the model's only buffers are quantized weights, the same on every process:
        # broadcasting them from rank 0 before every forward (DDP's default) would move the whole base
        wrapped = torch.nn.parallel.DistributedDataParallel(
            wrapped, device_ids=[ddp.local_rank] if ddp.device_type == "cuda" else None, broadcast_buffers=False)
    return model, wrapped, optimizer, scaler


def choose_decode_dtype(model, device):
    """dtype=auto for decoding on a CPU with bf16 instructions: time one decode step of the model in
    float32 and of a bf16 copy, alternating, at about the middle of a 256-token context, and keep
    the bf16 copy only where it is faster by 20%. -> (the model to decode with, its dtype)."""
    from model import KVCache

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


def training_step_timer(model, device, batch=4):
    """step(dtype): one forward and backward of model on a fixed random batch of (batch,
    min(block_size, 256)) tokens under that dtype's autocast, gradients cleared after; -> the loss.
    For choose_cpu_dtype."""
    T = min(model.config.block_size, 256)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, model.config.vocab_size, (batch, T + 1), generator=g).to(device)

    def step(dtype):
        with autocast(torch.device(device).type, dtype):
            _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def model_from_checkpoint(ckpt, path, train_args=None, quantize="none", quant_group_size=64, trains=False,
                          resuming=False):
    """The GPT a checkpoint holds. The architecture is the checkpoint's; of train_args (a script's
    model settings) only what is training-only may change it: dropout, the lora_* fields (a plain
    checkpoint fine-tuned with adapters) and scalar_head (an SFT model becoming a reward model,
    with a fresh head). A resume passes none, or only scalar_head with resuming=True (ppo.py's
    shared value head, stored beside the policy). A LoRA checkpoint starting a new stage (given
    train_args, not resuming) has its adapters merged first. A quantized checkpoint loads as it
    was stored (its "quantization" entry); quantize (none | int8 | int4, int4 in groups of
    quant_group_size) is a stage's setting, applied after loading, see quantize_model; trains: the
    stage will train it."""
    from model import GPT, GPTConfig

    extra = set(train_args or {}) - {"scalar_head"}
    if resuming and extra:
        raise ValueError(f"resuming {path}: only scalar_head may be added, not {sorted(extra)}")
    if train_args is not None and not resuming and ckpt["model_args"].get("lora_rank", 0) > 0:
        # a LoRA checkpoint starting a new stage: its adapters are folded into the weights first, so
        # the model starts as what it computes, and fresh adapters start from that (their
        # reference, the weights with adapters off, is then the starting policy, not its base)
        inner = model_from_checkpoint(ckpt, path)
        ckpt = {"model": inner.merged_state_dict(), "model_args": dict(ckpt["model_args"], lora_rank=0)}
    model_args = dict(ckpt["model_args"])
    for k, v in (train_args or {}).items():
        if k in ("dropout", "scalar_head") or k.startswith("lora_"):
            model_args[k] = v
    model = GPT(GPTConfig(**model_args))
    stored = ckpt.get("quantization")
    if stored:  # the same layout first, then the stored integers and scales load into it
        model.quantize(stored["bits"], stored["group_size"], stored["quantize_head"])
    state = clean_state_dict(ckpt["model"])
    if not model.config.scalar_head:  # a reward model used as a policy: its head is not needed
        state = {k: v for k, v in state.items() if not k.startswith("score_head.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any("lora_" not in k and not k.startswith("score_head.") for k in missing):
        raise ValueError(f"checkpoint {path} does not fit the model: missing {missing}, unexpected {unexpected}")
    return quantize_model(model, quantize, quant_group_size, trains)


QUANTIZE = {"none": None, "int8": 8, "int4": 4}  # a stage's quantize setting -> bits


def quantize_model(model, quantize, group_size=64, trains=False):
    """A stage's quantize setting applied to a model (GPT.quantize, weight-only): none | int8 | int4,
    int4 in groups of group_size inputs (the stage's quant_group_size). A model loaded quantized
    keeps the format it was stored in: asking for another is refused (quantizing twice compounds
    the rounding), as is training a quantized model without adapters (trains and lora_rank 0: its
    quantized weights are frozen, so only the norms and the embedding would learn). -> the model;
    ValueError naming the setting."""
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be none | int8 | int4, got {quantize!r}")
    bits = QUANTIZE[quantize]
    stored = model.quantization
    if bits is not None and stored and (stored["bits"], stored["group_size"]) != (bits, group_size if bits == 4 else None):
        group = f" in groups of {stored['group_size']}" if stored["bits"] == 4 else ""
        raise ValueError(f"quantize={quantize}: the checkpoint is stored as int{stored['bits']}{group}; quantizing it "
                         f"again would compound the rounding (load it with quantize=none, as stored)")
    if bits is not None and not stored:
        try:
            model.quantize(bits, group_size if bits == 4 else None)
        except ValueError as e:
            raise ValueError(f"quantize={quantize} (quant_group_size={group_size}): {e}") from None
    if trains and model.quantization and model.config.lora_rank == 0:
        raise ValueError(f"quantize: an int{model.quantization['bits']} model trains only with adapters on its "
                         "frozen weights (lora_rank > 0, QLoRA), or is evaluated (eval_only=True)")
    return model


def load_start(init_from, out_dir):
    """The checkpoint a stage starts from: out_dir/ckpt.pt when init_from is "resume", else the
    checkpoint init_from names. -> (checkpoint, its path, resumed). Exits with a one-line message
    when it is missing or damaged."""
    resumed = init_from == "resume"
    path = os.path.join(out_dir, "ckpt.pt") if resumed else init_from
    try:
        return load_checkpoint(path), path, resumed
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"init_from={init_from}: {e}")


def save_weights(path, ddp, model, drop_scalar_head=False, **info):
    """The plain model, for sampling and the next stage (best.pt, merged.pt): with LoRA the adapters
    are folded in and model_args says lora_rank 0, so it loads like any other checkpoint; on a
    quantized base (QLoRA) that dequantizes it, once, here (the merged weights are full-precision
    numbers). A quantized model without adapters is saved as it is, smaller, its format recorded.
    drop_scalar_head leaves a scalar head out too (a policy's value head). info (iter_num, config,
    meta, stage ...) goes in beside it. Only the master writes."""
    if not ddp.master:
        return
    cfg, quantization = model.config.to_dict(), model.quantization
    if cfg["lora_rank"] > 0:
        state, cfg, quantization = model.merged_state_dict(), dict(cfg, lora_rank=0), None
    else:
        state = model.state_dict()
    if drop_scalar_head:
        state, cfg = without_scalar_head(state, cfg)
    save_checkpoint({"model": state, "model_args": cfg, "quantization": quantization, **info, "git": git_commit()}, path)


@torch.no_grad()
def mean_loss(model, batches, ctx, ddp, weight=None):
    """The mean of model(X, Y)'s loss over fixed (X, Y) batches, in eval mode, over every process's
    batches: each batch weighted by weight(Y) (its number of loss tokens, say), else equally."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, device=ddp.device)  # (weighted sum of losses, sum of weights)
    for X, Y in batches:
        with ctx:
            _, loss = model(X, Y)
        w = weight(Y).float() if weight else torch.ones((), device=ddp.device)
        total += torch.stack((loss.float() * w, w))
    if ddp.enabled:
        dist.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1]).item()


def load_teacher(path, meta, ddp, distill_loss, distill_alpha, distill_temperature):
    """A distillation teacher (train.py and sft.py): a checkpoint of this repository, frozen, in eval
    mode, on the device. It must share the student's tokenizer (compared from both metas: the
    message names both). The distillation settings are checked too, and the master says what the
    loss is. -> the teacher model; exits with a one-line message when anything is wrong."""
    try:
        if distill_loss not in ("forward_kl", "reverse_kl", "jsd") or not 0.0 <= distill_alpha <= 1.0:
            raise ValueError(f"distill_loss must be forward_kl | reverse_kl | jsd and 0 <= distill_alpha <= 1, "
                             f"got {distill_loss!r} and {distill_alpha}")
        ckpt = load_checkpoint(path)
        if "meta" not in ckpt:
            raise ValueError(f"teacher {path} carries no tokenizer (meta): not a checkpoint of this repository")
        check_same_tokenizer(ckpt["meta"], f"teacher {path}", meta, "the student")
        teacher = model_from_checkpoint(ckpt, path).to(ddp.device).eval().requires_grad_(False)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"teacher: {e}")
    if ddp.master:
        print(f"teacher {path}: {teacher.num_params() / 1e6:.2f}M parameters; loss = {1 - distill_alpha:g} CE "
              f"+ {distill_alpha:g} T^2 {distill_loss} at T = {distill_temperature:g}")
    return teacher


class RewardModel:
    """A reward.py checkpoint as a frozen scorer for the RL stages:

        rm = common.RewardModel("out-reward/ckpt.pt", device, policy_meta=meta)
        rewards = rm(idx, last, pos)   # (N,), normalised

    scores each row of a batch of rendered conversations at its last real token (last, see
    model.last_index) and returns (r - reward_mean) / reward_std with the statistics the
    checkpoint stores, so that rewards are about unit-sized whatever the reward model's scale.
    policy_meta: the policy's tokenizer must be the reward model's (checked)."""

    def __init__(self, path, device, policy_meta=None):
        ckpt = load_checkpoint(path)
        if ckpt.get("stage") != "reward" or not ckpt["model_args"].get("scalar_head"):
            raise ValueError(f"{path} is not a reward model (stage {ckpt.get('stage')!r}): train one with reward.py")
        if policy_meta is not None:
            check_same_tokenizer(ckpt["meta"], f"reward model {path}", policy_meta, "the policy")
        self.model = model_from_checkpoint(ckpt, path).to(device).eval().requires_grad_(False)
        self.mean, self.std = ckpt.get("reward_mean", 0.0), ckpt.get("reward_std", 1.0)
        self.path = path

    @torch.no_grad()
    def __call__(self, idx, last, pos=None):
        return (self.model.sequence_scores(idx, last, pos).float() - self.mean) / max(self.std, 1e-6)


def catch_ctrl_c():
    """Make the first Ctrl-C a request to stop: the training loop polls stop["requested"],
    finishes its iteration, saves a checkpoint and exits. A second Ctrl-C aborts at once."""
    stop = {"requested": False}

    def on_sigint(signum, frame):
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        print("\nCtrl-C: finishing this iteration, saving a checkpoint, then exiting (again to abort)")

    signal.signal(signal.SIGINT, on_sigint)
    return stop


def clean_state_dict(state_dict):
    """Drop the prefixes torch.compile and DDP put in front of parameter names."""
    out = {}
    for k, v in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def git_commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def load_meta(data_dir):
    """A dataset's meta.json, with its tokenizer's complete state folded in, so that a checkpoint
    carrying the meta can rebuild the tokenizer without the data folder."""
    path = os.path.join(data_dir, "meta.json")
    with open(path) as f:
        meta = json.load(f)
    import bpe

    meta["tokenizer_state"] = bpe.load_from_meta(path).state()
    return meta


def tokenizer_from_meta(meta):
    import bpe

    return bpe.Tokenizer.from_state(meta["tokenizer_state"])


def describe_tokenizer(meta):
    state = meta.get("tokenizer_state") or {}
    merges = state.get("merges")
    size = f", {len(merges)} merges" if merges else ""
    return f"{meta.get('tokenizer', state.get('kind', '?'))} ({meta.get('n_vocab', '?')} ids{size})"


def check_same_tokenizer(meta_a, name_a, meta_b, name_b):
    """Two models, or a model and a dataset, must map text to the same ids: compare the tokenizers
    their metas carry. Raises ValueError naming both when they differ."""
    if meta_a.get("tokenizer_state") == meta_b.get("tokenizer_state"):
        return
    try:  # states of different kinds may still describe one tokenizer (gpt2 and an hf GPT-2)
        same = tokenizer_from_meta(meta_a).same_ids_as(tokenizer_from_meta(meta_b))
    except (KeyError, TypeError, ValueError, RuntimeError):
        same = False
    if not same:
        raise ValueError(f"{name_a} uses the {describe_tokenizer(meta_a)} tokenizer but {name_b} uses the "
                         f"{describe_tokenizer(meta_b)} tokenizer: the ids mean different things")


# -----------------------------------------------------------------------------
# Hugging Face model folders


def hf_checkpoint(folder):
    """A Hugging Face model folder (GPT-2 or Llama layout, with its byte-level BPE tokenizer) as a
    checkpoint of ours: {"model", "model_args", "meta", "stage": "hf"}. meta carries the
    tokenizer's state, so what a stage writes from it never needs the folder again."""
    import bpe
    from model import from_hf

    config, state_dict = from_hf(folder)
    tok = bpe.from_hf(folder)
    if tok.n_vocab > config.vocab_size:
        raise ValueError(f"{folder}: the tokenizer has {tok.n_vocab} ids, the model only {config.vocab_size}")
    meta = {"tokenizer": tok.kind, "vocab_size": config.vocab_size, "n_vocab": tok.n_vocab,
            "special_tokens": tok.special_tokens, "tokenizer_state": tok.state(), "source": os.path.abspath(folder)}
    return {"model": state_dict, "model_args": config.to_dict(), "meta": meta, "stage": "hf"}


def add_chat_tokens(tok, meta, verbose=True):
    """-> (tokenizer, meta) with the chat template's special tokens (bpe.SPECIAL_TOKENS). Ours
    reserve them; a tokenizer from elsewhere lacks some, and they are appended. Where the model
    has no rows for them, meta's vocab_size grows (to a multiple of 64) and the caller grows the
    model to it with GPT.resize_vocab(meta["vocab_size"])."""
    import bpe

    new = tok.with_special_tokens(bpe.SPECIAL_TOKENS)
    if new is tok:
        return tok, meta
    vocab_size = max(meta["vocab_size"], bpe.padded_vocab_size(new.n_vocab, 64))
    if verbose:
        added = [name for name in new.special_tokens if name not in tok.special_tokens]
        print(f"tokenizer: appended {' '.join(added)} as ids {tok.n_vocab}..{new.n_vocab - 1}; " +
              (f"the token embedding (and an untied head) grows from {meta['vocab_size']} to {vocab_size} rows"
               if vocab_size > meta["vocab_size"] else f"the model's {vocab_size} rows already cover them"))
    meta = dict(meta, tokenizer=new.kind, vocab_size=vocab_size, n_vocab=new.n_vocab,
                special_tokens=new.special_tokens, tokenizer_state=new.state())
    return new, meta


# -----------------------------------------------------------------------------
# conversations (SFT data, RL prompts)

CHAT_ROLES = ("system", "user", "assistant")


def has_chat_template(tok):
    """Can this tokenizer render a conversation for a reply (bpe.Tokenizer.render_prompt with the
    <|user|>, <|assistant|> and <|end|> tokens), as a fine-tuned model's does?"""
    return hasattr(tok, "render_prompt") and {"<|user|>", "<|assistant|>", "<|end|>"} <= set(tok.special_tokens)


def read_conversations(path, require_assistant=True):
    """The conversations of a JSONL file, one JSON object per line, in either format:

        {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
        {"prompt": "...", "completion": "..."}      (a user message and an assistant message)

    -> (rows, blank): each row is the line's object with "messages" in the first format (any
    other fields, such as answer, task and difficulty, kept as they are), and blank is the number
    of blank lines skipped. A line that is neither format raises ValueError naming the file and
    the line, as does a conversation with no assistant message when require_assistant."""

    def parse(obj):
        obj["messages"] = messages_of(obj)
        if require_assistant and not any(m["role"] == "assistant" for m in obj["messages"]):
            raise ValueError("no assistant message, so nothing to learn from")
        return obj

    return _read_jsonl(path, parse)


def messages_of(obj):
    """The messages of one conversation object, in either format of read_conversations, checked:
    roles from CHAT_ROLES, string contents. Raises ValueError saying what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or set(m) != {"role", "content"}:
                raise ValueError(f"message {i} must be an object with exactly 'role' and 'content', got {m!r:.80}")
            if m["role"] not in CHAT_ROLES:
                raise ValueError(f"message {i} has role {m['role']!r}, expected one of {', '.join(CHAT_ROLES)}")
            if not isinstance(m["content"], str):
                raise ValueError(f"message {i} has a content that is not a string: {m['content']!r:.80}")
        return messages
    if "prompt" in obj and "completion" in obj:
        if not isinstance(obj["prompt"], str) or not isinstance(obj["completion"], str):
            raise ValueError("'prompt' and 'completion' must be strings")
        return [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["completion"]}]
    raise ValueError(f"expected a 'messages' list or 'prompt' and 'completion', found keys {sorted(obj)}")


def _read_jsonl(path, parse):
    """parse(obj) of every non-blank line of a JSONL file -> (rows, blank lines). Any error, JSON or
    parse's ValueError, is raised as a ValueError naming the file and the line."""
    rows, blank, n = [], 0, 0
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no file {path}")
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    blank += 1
                    continue
                try:
                    rows.append(parse(json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
                except ValueError as e:
                    raise ValueError(f"{path} line {n}: {e}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} line {n + 1}: not UTF-8 text") from None
    return rows, blank


def read_preferences(path):
    """The preference pairs of a JSONL file, one per line, in TRL's formats:

        {"prompt": "..." or [messages], "chosen": "...", "rejected": "..."}   explicit prompt
        {"chosen": [messages], "rejected": [messages]}                        implicit: the common
                                                                              prefix is the prompt
    chosen and rejected are assistant replies: strings, or (explicit form) a list of one assistant
    message; in the implicit form each must end in exactly one assistant message after the shared
    prefix. Optional: margin (a number), task, difficulty, answer. -> (rows, blank), each row
    {"prompt": [messages], "chosen": str, "rejected": str, ...the optional fields}. A malformed
    line raises ValueError naming the file and the line."""

    def reply(value, what):
        if isinstance(value, str):
            return value
        if (isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict)
                and value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str)):
            return value[0]["content"]
        raise ValueError(f"'{what}' must be a string or a list of one assistant message, got {value!r:.80}")

    def parse(obj):
        if not isinstance(obj, dict):
            raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
        if "chosen" not in obj or "rejected" not in obj:
            raise ValueError(f"expected 'chosen' and 'rejected', found keys {sorted(obj)}")
        if "prompt" in obj:
            prompt = obj["prompt"]
            if isinstance(prompt, str):
                prompt = [{"role": "user", "content": prompt}]
            messages_of({"messages": prompt})  # checks roles and contents
            chosen, rejected = reply(obj["chosen"], "chosen"), reply(obj["rejected"], "rejected")
        else:
            c, r = messages_of({"messages": obj["chosen"]}), messages_of({"messages": obj["rejected"]})
            n = 0
            while n < min(len(c), len(r)) and c[n] == r[n]:
                n += 1
            if len(c) != n + 1 or len(r) != n + 1 or c[n]["role"] != "assistant" or r[n]["role"] != "assistant":
                raise ValueError("implicit pairs must share every message but a final assistant reply")
            prompt, chosen, rejected = c[:n], c[n]["content"], r[n]["content"]
        if not prompt:
            raise ValueError("the prompt is empty")
        margin = obj.get("margin", 0.0)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)):  # null included
            raise ValueError(f"'margin' must be a number, got {margin!r:.40}")
        row = {k: obj[k] for k in ("margin", "task", "difficulty", "answer") if k in obj}
        return {**row, "prompt": prompt, "chosen": chosen, "rejected": rejected}

    return _read_jsonl(path, parse)


def render_pairs(rows, tok, max_len):
    """Preference rows -> (pairs, report): each pair the chosen and the rejected conversation rendered
    by the chat template, (ids, reply mask) each, beside its row; report counts what was left out,
    so that it can be printed: pairs whose replies are equal, and pairs longer than max_len tokens."""
    pairs, same, long = [], 0, 0
    for row in rows:
        if row["chosen"] == row["rejected"]:
            same += 1
            continue
        # the reply mask covers the final reply and its <|end|> only: an earlier assistant turn of a
        # multi-turn prompt is prompt, the same in both, and must not count as reply tokens
        n_prompt = len(tok.render_prompt(row["prompt"]))
        c, r = (tok.render_conversation(row["prompt"] + [{"role": "assistant", "content": row[k]}])
                for k in ("chosen", "rejected"))
        c, r = ((ids, [0] * n_prompt + mask[n_prompt:]) for ids, mask in (c, r))
        if max(len(c[0]), len(r[0])) > max_len:
            long += 1
            continue
        pairs.append((c, r, row))
    return pairs, {"identical": same, "too_long": long}


class EpochStream:
    """The order in which training visits n examples: a fresh shuffle per epoch, so example k of
    the run's stream is position k % n of epoch k // n. The batch of (iteration, micro-step, rank)
    depends only on those and the seed, so a resumed run draws exactly the batches an
    uninterrupted one would have, with no state to carry. first_epoch (a key per example) orders
    the first epoch by it, shuffled within equal keys: a curriculum. cells (a key per example,
    such as "add/3") visits the cells evenly instead, whatever their sizes: position k of the
    stream is cell k % C of the C cells (in sorted order), and within that cell position k // C
    of its own stream of shuffled epochs (an RL stage's rl_cell_weights=uniform)."""

    def __init__(self, n, seed, batch_size, grad_accum, ddp, first_epoch=None, cells=None):
        self.n, self.seed, self.batch_size, self.grad_accum = n, seed, batch_size, grad_accum
        self.rank, self.world_size = ddp.rank, ddp.world_size
        self.first_epoch = first_epoch
        self._orders = {}
        self.cells = None
        if cells is not None:
            members = {}
            for i, c in enumerate(cells):
                members.setdefault(c, []).append(i)
            self.cells = [(members[c], EpochStream(len(members[c]), seed * 7919 + j, 1, 1, ddp))
                          for j, c in enumerate(sorted(members))]

    def order(self, epoch):
        if epoch not in self._orders:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.n, generator=g).tolist()
            if self.first_epoch is not None and epoch == 0:
                order.sort(key=lambda i: self.first_epoch[i])  # stable: the shuffle survives within a key
            self._orders = {epoch: order, **{e: o for e, o in self._orders.items() if e == epoch - 1}}
        return self._orders[epoch]

    def at(self, k):
        """The example at position k of the run's stream."""
        if self.cells is None:
            return self.order(k // self.n)[k % self.n]
        members, stream = self.cells[k % len(self.cells)]
        j = k // len(self.cells)
        return members[stream.order(j // len(members))[j % len(members)]]

    def indices(self, it, micro_step):
        start = ((it * self.grad_accum + micro_step) * self.world_size + self.rank) * self.batch_size
        return [self.at(k) for k in range(start, start + self.batch_size)]


def pair_batch(pairs, pad_id, device):
    """Pairs (render_pairs') -> the 2B conversations, chosen ones first, in one right-padded batch:
    idx (2B, T), reply mask (2B, T) True on the reply's tokens and its <|end|>, lengths (2B,).
    One forward over both halves: the reward model reads idx at lengths - 1, DPO scores the reply
    tokens of idx with logprobs."""
    seqs = [c for c, _, _ in pairs] + [r for _, r, _ in pairs]
    T = max(len(ids) for ids, _ in seqs)
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for b, (ids, m) in enumerate(seqs):
        idx[b, : len(ids)] = torch.tensor(ids)
        mask[b, : len(ids)] = torch.tensor(m, dtype=torch.bool)
    lengths = torch.tensor([len(ids) for ids, _ in seqs])
    return idx.to(device), mask.to(device), lengths.to(device)


def preference_splits(folders, tok, max_len, eval_pairs=0, train=True, verbose=True):
    """The preference pairs of the folders of a preference_dataset setting (under data/, or absolute),
    each folder's train.jsonl and val.jsonl read (read_preferences) and rendered (render_pairs, at
    most max_len tokens a conversation). -> (the train pairs of every folder in one list, [] unless
    train; {folder name: its first eval_pairs val pairs (0 = all)}). verbose prints what each file
    gave and left out. A missing or malformed file raises FileNotFoundError or ValueError."""
    root = os.path.dirname(os.path.abspath(__file__))

    def load(folder, split):
        path = os.path.join(folder if os.path.isabs(folder) else os.path.join(root, "data", folder), f"{split}.jsonl")
        rows, blank = read_preferences(path)
        pairs, left_out = render_pairs(rows, tok, max_len)
        if verbose:
            print(f"{path}: {len(pairs)} pairs; left out {left_out['identical']} with chosen == rejected and "
                  f"{left_out['too_long']} longer than {max_len} tokens; {blank} blank lines")
        return pairs

    train_pairs = [p for f in folders for p in load(f, "train")] if train else []
    val_pairs = {os.path.basename(os.path.normpath(f)): load(f, "val")[: eval_pairs or None] for f in folders}
    return train_pairs, val_pairs


# -----------------------------------------------------------------------------
# the frame of every training loop


def set_lr(optimizer, lr):
    """Every group's rate to lr, times the group's own lr_scale (1 unless configure_optimizers set
    one) -> lr."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


class Loop:
    """The part of a training loop that is the same in every stage: the iteration counter, when to
    evaluate and save, the step lines (loss, ms, tok_s, mfu, eta), the stop on a non-finite loss,
    Ctrl-C, and the closing lines. The stage keeps its own loop and calls this at four places:

        loop = common.Loop(config, ddp, resume_from, checkpoint, save_best)
        while True:
            lr = loop.lr(optimizer)           # the schedule's rate for this iteration
            if loop.eval_due():
                ... evaluate, loop.log("eval", val_loss=...) ...
                loop.evaluated(val_loss)      # best_val_loss, ckpt.pt and best.pt
            if loop.done():
                break
            ... the stage's training step ...
            if loop.step_done(loss, tokens=n, flops=f, grad_norm=g, lr=lr, **more):
                break                         # a non-finite loss, or Ctrl-C (checkpoint saved)
        loop.close(raw_model)

    config is the stage's resolved settings: out_dir, max_iters, eval_interval, log_interval,
    eval_only, always_save_checkpoint, the schedule's keys and the wandb_* keys are read from it by name. checkpoint()
    and save_best() write out_dir/ckpt.pt (with **loop.state() in it) and out_dir/best.pt.
    resume_from is the checkpoint being resumed, or None. metric names what evaluated() is given,
    lower being better (the RL stages follow err_rl, not a loss); the checkpoint keeps it as
    best_val_loss either way.

    Exact resume: the checkpoint records the last evaluated iteration (a Ctrl-C checkpoint is
    written after the iteration counter moved on, possibly onto an eval boundary that was not
    evaluated yet) and the loss accumulated since the last step line, so a resumed run logs,
    evaluates and saves exactly what the uninterrupted run would have.
    """

    def __init__(self, config, ddp, resume_from, checkpoint, save_best, metric="val loss"):
        self.ddp, self.checkpoint, self.save_best, self.metric = ddp, checkpoint, save_best, metric
        self.config = config
        self.max_iters, self.eval_interval = config["max_iters"], config["eval_interval"]
        self.log_interval, self.eval_only = config["log_interval"], config["eval_only"]
        self.always_save = config["always_save_checkpoint"]
        self.out_dir = config["out_dir"]
        state = resume_from or {}
        self.iter_num = state.get("iter_num", 0)
        self.best_val_loss = state.get("best_val_loss", float("inf"))
        self.best_iter = state.get("best_iter")  # the iteration best.pt holds, once this run wrote one
        # older checkpoints were always written right after an eval, except Ctrl-C ones
        self.last_eval_iter = state.get("last_eval_iter", self.iter_num if resume_from else -1)
        pending = state.get("pending_loss", (0.0, 0))
        self.loss_sum = torch.tensor(float(pending[0]), device=ddp.device)
        self.steps_since_log = pending[1]
        self.tokens = self.flops = 0.0
        self.start_iter, self.t_start, self.t_log = self.iter_num, time.time(), time.time()
        self.nonfinite = False
        # a resumed run, or a lone evaluation, appends to the log; a fresh run starts it anew
        self.logger = Logger(self.out_dir, ddp.master, config.get("wandb_log", False), config.get("wandb_project"),
                             config.get("wandb_run_name"), config, resume=resume_from is not None or self.eval_only)
        self.peak = peak_flops(ddp.device_type) if ddp.master else 1.0
        self.stop = catch_ctrl_c()

    def log(self, prefix, **values):
        self.logger.log(self.iter_num, prefix, iter=self.iter_num, **values)

    def lr(self, optimizer):
        """The learning rate of this iteration by the stage's schedule (config's learning_rate,
        warmup_iters, lr_decay_iters, min_lr, decay_lr: see lr_at), set on optimizer. -> it."""
        c = self.config
        return set_lr(optimizer, lr_at(self.iter_num, c["learning_rate"], c["warmup_iters"], c["lr_decay_iters"],
                                       c["min_lr"], c["decay_lr"]))

    def eval_due(self):
        if self.eval_only:
            return True
        boundary = self.iter_num % self.eval_interval == 0 or self.iter_num == self.max_iters
        return boundary and self.iter_num != self.last_eval_iter

    def evaluated(self, val_loss):
        """After an eval: keep the best val loss; save ckpt.pt (always_save_checkpoint, a new best
        or the last iteration) and best.pt (a new best), except at iteration 0 and in eval_only.
        -> whether val_loss is a new best."""
        improved = val_loss < self.best_val_loss
        self.best_val_loss = min(self.best_val_loss, val_loss)
        self.last_eval_iter = self.iter_num
        if not self.eval_only and self.iter_num > 0:
            if improved:
                self.best_iter = self.iter_num  # before the checkpoint, which carries it
            if self.always_save or improved or self.iter_num == self.max_iters:
                self.checkpoint()
            if improved:
                self.save_best()
        return improved

    def done(self):
        return self.eval_only or self.iter_num >= self.max_iters

    def state(self):
        """What a checkpoint needs of the loop. Every process must call it (a collective)."""
        pending = self.ddp.all_reduce_mean(self.loss_sum.detach().clone())
        return dict(iter_num=self.iter_num, best_val_loss=self.best_val_loss, best_iter=self.best_iter,
                    last_eval_iter=self.last_eval_iter, pending_loss=(pending.item(), self.steps_since_log))

    def step_done(self, loss, tokens=0, flops=0.0, **metrics):
        """After the optimizer step: count the iteration, and at every log_interval print and log
        the mean loss since the last line (over the processes), timing and the stage's metrics
        (floats or one-element tensors, logged as they are now). tokens and flops are this
        process's for this iteration; tok_s and mfu add up every process's. Then the stops:
        a non-finite loss ends the run keeping the last good checkpoint; Ctrl-C (polled every
        iteration alone, every log_interval under DDP, where polling costs an all-reduce) saves
        ckpt.pt. -> True when the run must stop."""
        self.iter_num += 1
        self.steps_since_log += 1
        self.loss_sum += loss.detach() if torch.is_tensor(loss) else loss
        self.tokens += tokens
        self.flops += flops
        at_log = self.iter_num % self.log_interval == 0 or self.iter_num == self.max_iters
        if at_log:
            n = self.steps_since_log
            totals = torch.tensor([self.loss_sum.item() / n, self.tokens, self.flops], dtype=torch.float64,
                                  device=self.ddp.device)
            loss_avg, tokens_all, flops_all = (self.ddp.all_reduce_mean(totals) * torch.tensor(
                [1.0, self.ddp.world_size, self.ddp.world_size], dtype=torch.float64, device=self.ddp.device)).tolist()
            dt = (time.time() - self.t_log) / n
            self.loss_sum.zero_()
            self.steps_since_log, self.tokens, self.flops, self.t_log = 0, 0.0, 0.0, time.time()
            if not math.isfinite(loss_avg):
                self.nonfinite = True
                self.log("stop", loss=loss_avg)
                if self.ddp.master:
                    print(f"the loss is {loss_avg} at iter {self.iter_num}: stopping. The last good checkpoint is "
                          f"{os.path.join(self.out_dir, 'ckpt.pt')}; try a lower learning_rate or a grad_clip.")
                return True
            rates = step_rates(tokens_all, flops_all, dt * n, self.ddp.world_size, self.peak)
            values = {k: (v.item() if torch.is_tensor(v) else v) for k, v in metrics.items()}
            self.log(None, loss=loss_avg, **values, ms=dt * 1000, **rates,
                     eta=f"{(self.max_iters - self.iter_num) * dt / 60:.1f}m")
        if (at_log or not self.ddp.enabled) and self.ddp.any(self.stop["requested"]):
            self.checkpoint()
            if self.ddp.master:
                print(f"saved {os.path.join(self.out_dir, 'ckpt.pt')} at iter {self.iter_num}; "
                      "resume with --init_from=resume")
            return True
        return False

    def close(self, model):
        """The end of the run: the processes must agree on the weights; the closing line; exit 1
        after a non-finite loss."""
        self.ddp.check_in_sync(model)
        if self.ddp.master and not self.nonfinite and not self.eval_only:
            print(f"done: {self.iter_num - self.start_iter} iterations in {time.time() - self.t_start:.1f}s, "
                  f"best {self.metric} {self.best_val_loss:.4f}")
        self.logger.close()
        self.ddp.close()
        if self.nonfinite:
            sys.exit(1)


def step_rates(tokens, flops, seconds, world_size, peak):
    """tokens and flops done by all world_size processes in `seconds` -> tok_s, and mfu against
    world_size devices of `peak` FLOP/s each (omitted where no flops were counted)."""
    rates = {"tok_s": round(tokens / seconds) if tokens else None}
    rates["mfu"] = flops / seconds / (world_size * peak) if flops else None
    return rates


# -----------------------------------------------------------------------------
# answering held-out prompts (the eval of SFT and of every post-training stage)


def held_out_prompts(rows, n, tok):
    """Up to n conversations (rows of read_conversations) as prompts with reference answers, taken
    round-robin over the (task, difficulty) cells so that every cell is measured even in a small
    eval. The prompt is the conversation up to its last assistant message, rendered by the chat
    template; the reference is the answer field, else that message. -> a list of examples, dicts
    with prompt (ids), answer, question and, where the row has them, task, difficulty and format."""
    cells = {}
    for row in rows:
        cells.setdefault((row.get("task"), row.get("difficulty")), []).append(row)
    picked = [c[k] for k in range(max(map(len, cells.values()), default=0)) for c in cells.values() if k < len(c)][:n]
    out = []
    for row in picked:
        last = max(i for i, m in enumerate(row["messages"]) if m["role"] == "assistant")
        history = row["messages"][:last]
        ex = {"prompt": tok.render_prompt(history), "answer": row.get("answer", row["messages"][last]["content"]),
              "question": next((m["content"] for m in reversed(history) if m["role"] == "user"), "")}
        ex.update({k: row[k] for k in ("task", "difficulty", "format") if k in row})  # format: cot is graded
        out.append(ex)                                                                 # by its Answer: line
    return out


@torch.no_grad()
def answer_prompts(model, examples, tok, ctx, ddp, batch_size, max_new_tokens, temperature=0.0, num_samples=1,
                   seed=0):
    """Answers of `model` to examples (held_out_prompts'), batched, each process a share, each
    answer ending at <|end|> (not included). temperature 0: greedy, one answer per example, a list
    of strings. Otherwise num_samples sampled answers per example (the samples of a prompt share
    its prefill), drawn from generators seeded by (seed, batch), a list of lists of strings."""
    end = tok.special_id("<|end|>")
    mine = sorted(range(ddp.rank, len(examples), ddp.world_size), key=lambda i: len(examples[i]["prompt"]))
    per_batch = max(1, batch_size // num_samples)
    answers = {}
    for k in range(0, len(mine), per_batch):  # similar lengths together: less left padding
        idx = mine[k : k + per_batch]
        prompts = [torch.tensor(examples[i]["prompt"], device=ddp.device) for i in idx]
        g = torch.Generator(ddp.device).manual_seed(hash((seed, idx[0])) % 2**63)
        with ctx:
            out = model.complete(prompts, max_new_tokens, num_samples, temperature, stop_tokens=end, generator=g,
                                 vocab_limit=tok.n_vocab)
        texts = [tok.decode(row[m & (row != end)].tolist()) for row, m in zip(out.idx, out.mask)]
        for j, i in enumerate(idx):
            group = texts[j * num_samples : (j + 1) * num_samples]
            answers[i] = group[0] if temperature == 0 else group
    for part in ddp.gather_objects(answers):
        answers.update(part)
    return [answers[i] for i in range(len(examples))]


def write_samples(path, examples, answers, iter_num, n_show, exact_match):
    """Append n_show (prompt, reference, answer) examples, the same ones at every eval, to path."""
    import random

    shown = random.Random(0).sample(range(len(examples)), min(n_show, len(examples)))
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"=== iter {iter_num}\n")
        for i in sorted(shown):
            ex = examples[i]
            f.write(f"[{ex.get('task', 'all')}/{ex.get('difficulty', 'all')}] prompt: {ex['question']!r}\n"
                    f"  reference: {ex['answer']!r}\n  answer:    {answers[i]!r}"
                    f"{'  (exact)' if exact_match(ex, answers[i]) else ''}\n")


# -----------------------------------------------------------------------------
# the RL stages' prompts, rewards and evaluation (grpo.py and ppo.py share them)


# the folders data/tasks/prepare.py writes, by name under data/, and its arguments for each
TASK_DATASETS = {"tasks": [], "tasks_cot": ["--cot=True"],
                 "tasks_cot_rl": ["--cot=True", "--extra_train_difficulties=4"], "tasks_mix": ["--cot_share=0.15"]}


def task_data(name, ddp):
    """The folder of a conversations dataset (a name under data/, or an absolute path) holding
    train.jsonl and val.jsonl; one data/tasks/prepare.py writes (TASK_DATASETS) is generated when
    missing, once, by the master process. Exits with a message when the files are not there."""
    root = os.path.dirname(os.path.abspath(__file__))
    folder = name if os.path.isabs(name) else os.path.join(root, "data", name)
    paths = [os.path.join(folder, f"{split}.jsonl") for split in ("train", "val")]
    if not all(os.path.isfile(p) for p in paths):
        if ddp.master and name in TASK_DATASETS:
            print(f"data/{name} is missing: generating it")
            args = TASK_DATASETS[name] + ([f"--out_dir={folder}"] if name != "tasks" else [])
            if subprocess.run([sys.executable, os.path.join(root, "data", "tasks", "prepare.py"), *args]).returncode:
                sys.exit(f"could not generate data/{name}; see the message above")
        ddp.barrier()
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            sys.exit(f"dataset {name!r}: no {', '.join(missing)}")
    return folder


def post_training_start(init_from, out_dir, eval_only=False):
    """The start of a post-training stage (reward, GRPO, PPO, DPO): load_start, the tokenizer the
    checkpoint's meta carries, and the path of the reference, the starting policy (a resumed run,
    or a stage's checkpoint being measured, keeps the one its first run started from).
    -> (checkpoint, its path, resumed, tokenizer, reference path). Exits with a one-line message
    when the checkpoint carries no tokenizer."""
    ckpt, path, resumed = load_start(init_from, out_dir)
    if "meta" not in ckpt:
        sys.exit(f"{path} carries no tokenizer (meta): post-training needs a checkpoint of this repository")
    reference_path = ckpt.get("reference", path) if resumed or eval_only else init_from
    return ckpt, path, resumed, tokenizer_from_meta(ckpt["meta"]), reference_path


def rl_prompts(config, tok, block_size, ddp):
    """The prompts of an RL stage, from config's prompt_dataset (a folder under data/, or absolute,
    whose train.jsonl, val.jsonl and test.jsonl hold conversations with an "answer"; test.jsonl is
    optional) -> a dict of lists of held_out_prompts' examples:

        train       the training prompts of the rl_tasks cells (all cells when it names none)
        dev         eval_prompts prompts of val.jsonl over every cell: the evals during training
        pass_dev    pass_k_prompts prompts of val.jsonl of the trained cells, for pass@k
        test        test_prompts prompts of test.jsonl over every cell: answered once, at the end
        pass_test   pass_k_prompts prompts of test.jsonl of the trained cells

    A training prompt's completion may take min(max_new_tokens, block_size - its length) tokens
    (model.complete); a prompt that leaves no room at all is left out, and a trained cell left with
    no prompt is a config error naming it. The master prints how many prompts each cell keeps.
    A data/tasks/prepare.py folder is generated when missing (task_data). Exits with a one-line
    message on a data error."""
    data_dir = task_data(config["prompt_dataset"], ddp)
    cells, max_new_tokens = config["rl_tasks"], config["max_new_tokens"]
    test_path = os.path.join(data_dir, "test.jsonl")
    try:
        train_rows, _ = read_conversations(os.path.join(data_dir, "train.jsonl"))
        val_rows, _ = read_conversations(os.path.join(data_dir, "val.jsonl"))
        test_rows = read_conversations(test_path)[0] if os.path.isfile(test_path) else []
        trained = cell_rows(train_rows, cells)
        out = {"train": held_out_prompts(trained, len(trained), tok),
               "dev": held_out_prompts(val_rows, config["eval_prompts"], tok),
               "pass_dev": held_out_prompts(cell_rows(val_rows, cells), config["pass_k_prompts"], tok),
               "test": held_out_prompts(test_rows, config["test_prompts"], tok),
               "pass_test": held_out_prompts(cell_rows(test_rows, cells) if test_rows else [],
                                             config["pass_k_prompts"], tok)}
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"data error: {e}" + ("; run python data/tasks/prepare.py" if isinstance(e, FileNotFoundError) else ""))
    if any("answer" not in row for row in train_rows[:100]):
        sys.exit(f"data error: {data_dir}/train.jsonl has rows without an 'answer': nothing to check rewards against")
    kept, shorter = {}, {}
    for ex in out["train"]:
        room = block_size - len(ex["prompt"])
        c = cell_key(ex)
        kept.setdefault(c, 0)
        kept[c] += room > 0
        shorter[c] = shorter.get(c, 0) + (0 < room < max_new_tokens)
    empty = sorted(c for c, n in kept.items() if n == 0)
    if empty:
        sys.exit(f"config error: the cells {', '.join(empty)} keep no training prompt: every one is "
                 f"block_size {block_size} tokens or longer")
    out["train"] = [ex for ex in out["train"] if len(ex["prompt"]) < block_size]
    if ddp.master:
        print("prompts: " + ", ".join(f"{c} {n}" + (f" ({shorter[c]} with room for fewer than {max_new_tokens} new "
                                                    f"tokens)" if shorter[c] else "") for c, n in sorted(kept.items())) +
              f"; dev {len(out['dev'])}, test {len(out['test'])}" +
              ("" if test_rows else f" (no {test_path}: no test split)"))
    return out


def minibatches(n, num_minibatches, seed, rank, iter_num, epoch, device):
    """The rows 0..n-1 of an RL batch cut into num_minibatches minibatches for one optimizer pass:
    from a fresh shuffle seeded by (seed, rank, iter_num, epoch), so each pass groups the rows
    differently and a resumed run cuts them as the uninterrupted one did; with one minibatch, every
    row in order. -> a list of index tensors on device."""
    if num_minibatches == 1:
        return [torch.arange(n, device=device)]
    g = torch.Generator().manual_seed(hash((seed, rank, iter_num, epoch)) % 2**63)
    return list(torch.randperm(n, generator=g).to(device).tensor_split(num_minibatches))


def cell_key(example):
    """"add/3": an example's task/difficulty cell ("all/all" without those fields)."""
    return f"{example.get('task', 'all')}/{example.get('difficulty', 'all')}"


def timed(fn, *args):
    """fn(*args) and the seconds it took -> (result, seconds)."""
    t0 = time.time()
    return fn(*args), time.time() - t0


def rollout(model, examples, stream, iter_num, ddp, ctx, tok, config, samples):
    """The sampling of an RL iteration: this process's share of stream's batch (an EpochStream over
    examples), each prompt continued by `samples` completions in one batched generate with the KV
    cache (the samples of a prompt share its prefill), each stopping at <|end|>, with config's
    max_new_tokens, temperature, top_k and top_p, drawn from a generator seeded by (seed, rank,
    iter_num) so that a resumed run samples exactly what the uninterrupted run would have.
    -> (the examples, one per row: row p * samples + s is sample s of prompt p; model.Completions)."""
    batch = [examples[i] for i in stream.indices(iter_num, 0)]
    prompts = [torch.tensor(ex["prompt"], device=ddp.device) for ex in batch]
    g = torch.Generator(ddp.device).manual_seed(hash((config["seed"], ddp.rank, iter_num)) % 2**63)
    with ctx:
        out = model.complete(prompts, config["max_new_tokens"], samples, config["temperature"], config["top_k"] or None,
                             config["top_p"] if config["top_p"] < 1 else None, stop_tokens=tok.special_id("<|end|>"),
                             generator=g, vocab_limit=tok.n_vocab)
    return [ex for ex in batch for _ in range(samples)], out


class Reference:
    """The frozen policy an RL stage measures its KL against: the starting checkpoint (path) loaded
    once more, or, when the policy trains LoRA adapters, the policy itself with its adapters off
    (no copy at all).

        reference = common.Reference(policy, reference_path, device)
        with ctx:
            ref_logp = reference.logprobs(inputs, targets, pos, temperature, vocab_limit)  # no grad
    """

    def __init__(self, policy, path, device):
        self.policy, self.path, self.model = policy, path, None
        if policy.config.lora_rank == 0:
            self.model = model_from_checkpoint(load_checkpoint(path), path).to(device).eval().requires_grad_(False)

    def __str__(self):
        return self.path if self.model is not None else "the policy with adapters off"

    @torch.no_grad()
    def logprobs(self, idx, targets, pos, temperature, vocab_limit):
        if self.model is not None:
            return self.model.logprobs(idx, targets, pos, temperature, vocab_limit)
        with self.policy.adapters_off():
            return self.policy.logprobs(idx, targets, pos, temperature, vocab_limit)


def cell_rows(rows, cells):
    """The rows of read_conversations whose task/difficulty is one of cells ("add/3", ...; empty:
    all). Raises ValueError naming the cells that have no rows."""
    if not cells:
        return list(rows)
    wanted = set(cells)
    kept = [r for r in rows if f"{r.get('task')}/{r.get('difficulty')}" in wanted]
    missing = wanted - {f"{r.get('task')}/{r.get('difficulty')}" for r in kept}
    if missing:
        raise ValueError(f"no prompts for the cells {sorted(missing)}")
    return kept


def parse_weights(spec, names):
    """("score", "model=0.5") -> {"score": 1.0, "model": 0.5}: weighted terms by name, each one of
    names. Raises ValueError on anything else."""
    out = {}
    for item in spec:
        name, sep, w = item.partition("=")
        try:
            out[name] = float(w) if sep else 1.0
        except ValueError:
            raise ValueError(f"expected name or name=weight, got {item!r}") from None
        if name not in names:
            raise ValueError(f"unknown reward {name!r}, expected {' | '.join(names)}")
    if not out:
        raise ValueError("no reward named")
    return out


class TaskReward:
    """The sequence reward of sampled completions (model.Completions), the sum of weighted terms:

        score   the checker's score of the answer, in [0, 1] with partial credit (tasks.score)
        exact   1 for an exact match, else 0
        model   a reward model's score, normalised by its stored mean and std (RewardModel)
        format  1 when the response follows its task's format (tasks.follows_format)

    then missing_end_penalty subtracted from a completion that ran out of tokens without <|end|>.
    reward: the terms as parse_weights reads them, e.g. ("score",) or ("exact", "model=0.5")."""

    TERMS = ("score", "exact", "model", "format")

    def __init__(self, reward, tok, device, policy_meta, reward_model="", missing_end_penalty=0.0):
        from data.tasks import tasks

        self.tasks, self.tok = tasks, tok
        self.weights = parse_weights(reward, self.TERMS)
        self.end = tok.special_id("<|end|>")
        self.penalty = missing_end_penalty
        self.model = RewardModel(reward_model, device, policy_meta) if "model" in self.weights else None

    def texts(self, out):
        """The completions as text, without their <|end|>."""
        return [self.tok.decode(row[m & (row != self.end)].tolist()) for row, m in zip(out.idx, out.mask)]

    def __call__(self, examples, out):
        """examples: one per row of out (each row's task example, with answer, task, format ...).
        -> (rewards (N,) float32, the mean of each term for the log, the completions' texts)."""
        from model import last_index

        texts = self.texts(out)
        device = out.idx.device
        parts = {}
        for name, fn in (("score", self.tasks.score), ("exact", self.tasks.exact_match),
                         ("format", lambda ex, t: float(self.tasks.follows_format(ex, t)))):
            if name in self.weights:
                parts[name] = torch.tensor([fn(ex, t) for ex, t in zip(examples, texts)], device=device)
        if self.model is not None:
            # the reward model reads the completion's last real token: its <|end|>, or the last
            # token it had when it ran out
            parts["model"] = self.model(out.idx, last_index(out.mask), out.pos)
        rewards = sum(self.weights[k] * v.float() for k, v in parts.items())
        rewards = rewards - self.penalty * out.truncated.float()
        return rewards, {f"reward_{k}": v.float().mean().item() for k, v in parts.items()}, texts


def worked_share(examples, texts):
    """The share of texts (replies to examples) that are worked solutions, where the examples may
    be answered either way (a mixed dataset); None otherwise: the mechanism in an RL step line."""
    from data.tasks.tasks import reply_form

    if not any(ex.get("format") == "either" for ex in examples):
        return None
    return sum(reply_form(t) == "worked" for t in texts) / max(len(texts), 1)


def evaluate_policy(model, examples, pass_examples, tok, ctx, ddp, batch_size, max_new_tokens, pass_samples=8,
                    seed=0):
    """The RL stages' eval: greedy exact match and score per task and difficulty on examples
    (held_out_prompts'), and pass@k for k = 1, 4, 8 (those <= pass_samples) from pass_samples answers
    at temperature 1 on pass_examples, with the unbiased estimator. On a mixed dataset (examples
    that may be answered either way) also, from those samples, the share of sampled answers that
    are worked solutions per cell (swork/add/3 ...) and the exact match of the worked and of the
    direct ones (sem_worked, sem_direct): what RL can select from. -> (the dict the log takes,
    the greedy answers)."""
    from data.tasks.tasks import exact_match, metrics, reply_form

    answers = answer_prompts(model, examples, tok, ctx, ddp, batch_size, max_new_tokens)
    out = metrics(examples, answers)
    if pass_examples and pass_samples > 0:
        samples = answer_prompts(model, pass_examples, tok, ctx, ddp, batch_size, max_new_tokens, 1.0, pass_samples,
                                 seed=seed)
        correct = [int(sum(exact_match(ex, a) for a in group)) for ex, group in zip(pass_examples, samples)]
        for k in (1, 4, 8):
            if k <= pass_samples:
                out[f"pass@{k}"] = sum(pass_at_k(pass_samples, c, k) for c in correct) / len(correct)
        if any(ex.get("format") == "either" for ex in pass_examples):
            forms = {}  # cell -> [worked, all]; form -> [exact, all]
            for ex, group in zip(pass_examples, samples):
                for a in group:
                    worked = reply_form(a) == "worked"
                    f = forms.setdefault(cell_key(ex), [0, 0])
                    f[0], f[1] = f[0] + worked, f[1] + 1
                    e = forms.setdefault("worked" if worked else "direct", [0, 0])
                    e[0], e[1] = e[0] + exact_match(ex, a), e[1] + 1
            for key, (a, n) in sorted(forms.items()):
                out[f"swork/{key}" if "/" in key else f"sem_{key}"] = a / n
    return out, answers


def rl_error(stats, cells):
    """err_rl, the number the RL stages' best.pt follows: 1 - the mean greedy exact match over the
    trained cells ("add/3", ...) that stats (evaluate_policy's) measured, or over all prompts when
    cells is empty or none was measured. None when nothing was measured."""
    keys = [f"em/{c}" for c in cells if f"em/{c}" in stats] or [k for k in ("em",) if k in stats]
    return 1 - sum(stats[k] for k in keys) / len(keys) if keys else None


def evaluate_rl(loop, model, examples, pass_examples, tok, ctx, config, evaluated=True):
    """An RL stage's eval at the loop's iteration: evaluate_policy with the stage's settings
    (config's eval_batch_size, eval_max_new_tokens, pass_k_samples, seed), plus err_rl, the number
    best.pt follows: 1 - the mean greedy exact match over the trained cells (rl_tasks; all prompts
    when it names none). The stats go to the log as an "answers" line (with s, the seconds it
    took), eval_show examples to out_dir/samples.txt, and (evaluated) err_rl to loop.evaluated,
    which saves ckpt.pt, and best.pt at a new best. -> the stats ({} without prompts)."""
    from data.tasks.tasks import exact_match

    if not (examples or pass_examples):
        if evaluated:
            loop.evaluated(float("inf"))
        return {}
    t0 = time.time()
    ddp = loop.ddp
    stats, answers = evaluate_policy(model, examples, pass_examples, tok, ctx, ddp, config["eval_batch_size"],
                                     config["eval_max_new_tokens"], config["pass_k_samples"], seed=config["seed"])
    err_rl = rl_error(stats, config["rl_tasks"])
    if err_rl is not None:  # with no held-out prompts there is nothing to follow: no best.pt
        stats["err_rl"] = err_rl
    if ddp.master and config["eval_show"]:
        write_samples(os.path.join(config["out_dir"], "samples.txt"), examples, answers, loop.iter_num,
                      config["eval_show"], exact_match)
    loop.log("answers", **stats, s=time.time() - t0)
    if evaluated:
        loop.evaluated(stats.get("err_rl", float("inf")))
    return stats


def evaluate_test(loop, model, examples, pass_examples, tok, ctx, config, cells=()):
    """The test split, answered once at the end of a stage (or by eval_only): by the weights the
    dev split chose (out_dir/best.pt, when this run wrote one), else by model as it is. Logged as a
    "test" line: evaluate_policy's stats with the standard error of each cell's exact match
    (se/add/3 ...) and the mean over cells (the trained ones; every cell when cells is empty) with
    its own (em_cells, se_cells); the master prints the summary. -> the stats ({} without prompts)."""
    if not (examples or pass_examples):
        return {}
    t0, ddp = time.time(), loop.ddp
    source = f"iter {loop.iter_num}"
    if loop.best_iter is not None:  # written by the master during this run (or the run it resumes)
        ddp.barrier()
        path = os.path.join(config["out_dir"], "best.pt")
        model = model_from_checkpoint(load_checkpoint(path), path).to(ddp.device).eval()
        source = f"best.pt of iter {loop.best_iter}"
    stats, _ = evaluate_policy(model, examples, pass_examples, tok, ctx, ddp, config["eval_batch_size"],
                               config["eval_max_new_tokens"], config.get("pass_k_samples", 0), seed=config["seed"])
    for key in [k for k in stats if k.startswith("n/")]:
        p = stats["em/" + key[2:]]
        stats["se/" + key[2:]] = math.sqrt(p * (1 - p) / stats[key])
    mean, se = cells_mean(stats, cells)
    stats.update(em_cells=mean, se_cells=se)
    loop.log("test", **stats, of=source, s=time.time() - t0)
    if ddp.master:
        shown = [c for c in (cells or ()) if f"em/{c}" in stats]
        print(f"test, {len(examples)} prompts, {source}: exact match {stats['em']:.3f}; "
              f"{'the trained cells' if shown else 'mean over cells'} {mean:.3f} +- {se:.3f} (standard error)" +
              "".join(f"; {c} {stats['em/' + c]:.3f} +- {stats['se/' + c]:.3f}" for c in shown))
    return stats


def cells_mean(stats, cells=()):
    """The mean exact match over cells (every cell stats has when cells is empty or none of them
    was measured) and its standard error sqrt(sum of the cells' p (1 - p) / n) / the number of
    cells, from metrics' em/ and n/ keys. -> (mean, se); (nan, nan) when no cell was measured."""
    measured = [k[3:] for k in stats if k.startswith("em/")]
    chosen = [c for c in cells if c in measured] or measured
    if not chosen:
        return float("nan"), float("nan")
    ps = [stats[f"em/{c}"] for c in chosen]
    var = sum(p * (1 - p) / stats[f"n/{c}"] for p, c in zip(ps, chosen))
    return sum(ps) / len(ps), math.sqrt(var) / len(ps)


# -----------------------------------------------------------------------------
# statistics of the evaluations


def ranks(x):
    """Ranks 1..n of the values x (a list), ties given the mean of the ranks they span."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    out = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x, y):
    """Spearman's rank correlation: Pearson's correlation of the ranks (ties averaged), in [-1, 1];
    nan when either side is constant."""
    rx, ry = ranks(list(x)), ranks(list(y))
    n = len(rx)
    mx, my = sum(rx) / n, sum(ry) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx, sy = math.sqrt(sum((a - mx) ** 2 for a in rx)), math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (sx * sy) if sx > 0 and sy > 0 else float("nan")


def calibration(probs, outcomes, bins=10):
    """How well predicted probabilities match outcome frequencies. probs and outcomes (0 or 1) are
    lists; the probabilities are cut into equal-width bins. -> (ece, table): the expected
    calibration error sum over bins of (n_b / n) |accuracy_b - mean probability_b|, and per
    non-empty bin (low, high, n, mean probability, accuracy)."""
    n, ece, table = len(probs), 0.0, []
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        idx = [i for i, p in enumerate(probs) if lo <= p < hi or (b == bins - 1 and p == 1.0)]
        if not idx:
            continue
        conf = sum(probs[i] for i in idx) / len(idx)
        acc = sum(outcomes[i] for i in idx) / len(idx)
        ece += len(idx) / n * abs(acc - conf)
        table.append((lo, hi, len(idx), conf, acc))
    return ece, table


def pass_at_k(n, c, k):
    """The unbiased estimator of pass@k from n samples of which c are correct (Chen et al. 2021):
    1 - C(n - c, k) / C(n, k), the chance that k samples drawn from the n hold a correct one."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


# -----------------------------------------------------------------------------
# logging


class Logger:
    """One line per step: printed as key=value, appended to out_dir/log.jsonl, sent to wandb.
    Only the master process logs; the others get a Logger that does nothing."""

    def __init__(self, out_dir, enabled=True, wandb_log=False, wandb_project=None, wandb_run_name=None,
                 config=None, resume=False):
        self.enabled = enabled
        self.wandb = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        self.file = open(os.path.join(out_dir, "log.jsonl"), "a" if resume else "w")
        if wandb_log:
            import wandb  # only when asked for; WANDB_MODE=offline works without a network

            self.wandb = wandb.init(project=wandb_project, name=wandb_run_name, config=config)

    def log(self, step, prefix=None, **values):
        if not self.enabled:
            return
        # floats at full precision: rounding to a few decimals logged a KL of 3e-7 as 0, and to a few
        # digits made an int8 and an fp32 val loss equal; the printed line is the short one
        values = {k: v for k, v in values.items() if v is not None}
        print((prefix + " " if prefix else "") + " ".join(f"{k}={_fmt(v)}" for k, v in values.items()), flush=True)
        self.file.write(json.dumps(values) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self):
        if self.enabled:
            self.file.close()
            if self.wandb is not None:
                self.wandb.finish()


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e-2 or abs(v) >= 1e5 else f"{v:.4f}"
    return str(v)
