"""
Plumbing shared by every stage script, after configurator.py has read its settings: device and
dtype, DDP, the data folders, checkpoints, the frame of the training loop, logging. Nothing in
here is a training step, and nothing is post-training machinery (that is posttrain.py): the
physics of each stage stays in its own script.
"""

import contextlib
import gc
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist

from autotune import cpu_dtype, cpu_has_bf16
from bpe import check_same_tokenizer
from convert import hf_checkpoint, merged_state_dict
from model import GPT, GPTConfig
from quantize import quantize_like, quantize_model

ROOT = os.path.dirname(os.path.abspath(__file__))

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
    there depends on the model's shapes, so autotune.cpu_dtype settles it by measurement once the
    model exists (prepare_training); without them, float32."""
    if dtype == "auto":
        if device_type == "cuda":
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "auto" if device_type == "cpu" and cpu_has_bf16() else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be auto | float32 | bfloat16 | float16, got {dtype!r}")
    if dtype == "float16" and device_type != "cuda":
        raise ValueError(f"dtype float16 needs CUDA (a GradScaler); use bfloat16 or float32 on {device_type}")
    return dtype

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
# the data folders


def data_dir(name):
    """A dataset setting's folder: a name under data/, or an absolute path."""
    return name if os.path.isabs(name) else os.path.join(ROOT, "data", name)


def prepare_missing(folder, files, ddp, command=None, hint=""):
    """Run command (a data/*/prepare.py, from the repository root, and its arguments) when folder
    lacks any of files: once, by the master, while the other processes wait. Exits with a message
    (and hint) when they are still missing."""
    paths = [os.path.join(folder, f) for f in files]
    if not all(os.path.isfile(p) for p in paths):
        if ddp.master and command:
            print(f"{folder} is missing: building it with python {' '.join(command)}", flush=True)
            if subprocess.run([sys.executable, os.path.join(ROOT, command[0]), *command[1:]]).returncode:
                sys.exit(f"could not build {folder}; see the message above")
        ddp.barrier()
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            sys.exit(f"no {', '.join(missing)}" + (f"; {hint}" if hint else ""))


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
    inside) is read as one too, see convert.hf_checkpoint."""
    if os.path.isfile(os.path.join(path, "config.json")):  # a Hugging Face folder
        return hf_checkpoint(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {path} is damaged or not a checkpoint: {type(e).__name__}: {e}") from None
    if isinstance(ckpt, dict) and "lora" in ckpt and "model" not in ckpt:  # sft.py's lora.pt
        raise ValueError(f"checkpoint {path} holds LoRA adapters alone, for the base {ckpt.get('base')}: load "
                         "merged.pt beside it (the adapters folded in), or see convert.load_lora_state_dict")
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
    optimizer, the scaler and every process's RNG state, plus the stage's info (Loop.state(),
    config, meta, stage ...). drop_scalar_head: save the model without its scalar
    head (without_scalar_head; the stage stores the head in info). Every process must call it
    (the RNG states are gathered); only the master writes."""
    torch_states = ddp.gather_objects(torch.get_rng_state())
    cuda_states = ddp.gather_objects(torch.cuda.get_rng_state()) if ddp.device_type == "cuda" else []
    if not ddp.master:
        return
    state, model_args = model.state_dict(), asdict(model.config)
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


# the GPTConfig fields a stage may set on a checkpoint it starts from: what only training uses (a
# MoE model's balancing weights among them: they weigh a loss, they are not the architecture)
TRAINING_FIELDS = ("dropout", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "moe_aux_coef", "moe_z_coef")


def training_args(config, **more):
    """The training-only model settings of a stage's config (TRAINING_FIELDS), and more (a reward
    model's scalar_head): model_from_checkpoint's train_args."""
    return {**{k: config[k] for k in TRAINING_FIELDS}, **more}


def model_from_checkpoint(ckpt, path, train_args=None, quantize="none", quant_group_size=64, trains=False,
                          resuming=False):
    """The GPT a checkpoint holds. The architecture is the checkpoint's; of train_args (a script's
    model settings) only what is training-only may change it: dropout, the lora_* fields (a plain
    checkpoint fine-tuned with adapters), a MoE model's moe_aux_coef and moe_z_coef (the weights
    of its balancing losses), and scalar_head (an SFT model becoming a reward model, with a fresh
    head). A resume passes none, or only scalar_head with resuming=True (ppo.py's
    shared value head, stored beside the policy). A LoRA checkpoint starting a new stage (given
    train_args, not resuming) has its adapters merged first. A quantized checkpoint loads as it
    was stored (its "quantization" entry); quantize (none | int8 | int4, int4 in groups of
    quant_group_size) is a stage's setting, applied after loading (quantize.quantize_model);
    trains: the stage will train it."""
    extra = set(train_args or {}) - {"scalar_head"}
    if resuming and extra:
        raise ValueError(f"resuming {path}: only scalar_head may be added, not {sorted(extra)}")
    if train_args is not None and not resuming and ckpt["model_args"].get("lora_rank", 0) > 0:
        # a LoRA checkpoint starting a new stage: its adapters are folded into the weights first, so
        # the model starts as what it computes, and fresh adapters start from that (their
        # reference, the weights with adapters off, is then the starting policy, not its base)
        inner = model_from_checkpoint(ckpt, path)
        ckpt = {"model": merged_state_dict(inner), "model_args": dict(ckpt["model_args"], lora_rank=0)}
    model_args = dict(ckpt["model_args"])
    for k, v in (train_args or {}).items():
        if k in TRAINING_FIELDS or k == "scalar_head":
            model_args[k] = v
    model = GPT(GPTConfig(**model_args))
    if ckpt.get("quantization"):  # the same layout first, then the stored integers and scales load into it
        quantize_like(model, ckpt["quantization"])
    state = ckpt["model"]
    if not model.config.scalar_head:  # a reward model used as a policy: its head is not needed
        state = {k: v for k, v in state.items() if not k.startswith("score_head.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any("lora_" not in k and not k.startswith("score_head.") for k in missing):
        raise ValueError(f"checkpoint {path} does not fit the model: missing {missing}, unexpected {unexpected}")
    return quantize_model(model, quantize, quant_group_size, trains)


def load_start(init_from, out_dir, verbose=True):
    """The checkpoint a stage starts from: out_dir/ckpt.pt when init_from is "resume", else the
    checkpoint init_from names; verbose says which. -> (checkpoint, its path, resumed). Exits with
    a one-line message when it is missing or damaged."""
    resumed = init_from == "resume"
    path = os.path.join(out_dir, "ckpt.pt") if resumed else init_from
    try:
        ckpt = load_checkpoint(path)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"init_from={init_from}: {e}")
    if verbose:
        print(f"resuming from {path} at iter {ckpt['iter_num']}" if resumed else f"starting from {path}")
    return ckpt, path, resumed


def save_weights(path, ddp, model, drop_scalar_head=False, **info):
    """The plain model, for sampling and the next stage (best.pt, merged.pt): with LoRA the adapters
    are folded in and model_args says lora_rank 0, so it loads like any other checkpoint; on a
    quantized base (QLoRA) that dequantizes it, once, here (the merged weights are full-precision
    numbers). A quantized model without adapters is saved as it is, smaller, its format recorded.
    drop_scalar_head leaves a scalar head out too (a policy's value head). info (iter_num, config,
    meta, stage ...) goes in beside it. Only the master writes."""
    if not ddp.master:
        return
    cfg, quantization = asdict(model.config), model.quantization
    if cfg["lora_rank"] > 0:
        state, cfg, quantization = merged_state_dict(model), dict(cfg, lora_rank=0), None
    else:
        state = model.state_dict()
    if drop_scalar_head:
        state, cfg = without_scalar_head(state, cfg)
    save_checkpoint({"model": state, "model_args": cfg, "quantization": quantization, **info, "git": git_commit()}, path)


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


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


# -----------------------------------------------------------------------------
# the training step's plumbing


def prepare_training(model, ddp, dtype, compile, weight_decay, learning_rate, betas, resume_from=None,
                     dynamic=None, ctx=None, head_lr_scale=1.0):
    """Put a model on the device with its AdamW and fp16 grad scaler (their state and the RNG
    restored from the checkpoint resume_from, when resuming), print its size, then compile it
    and wrap it for DDP. -> (model, the module to call for the hidden states in the loop, optimizer,
    scaler); the first is the plain GPT, for its heads (loss, logprobs, scores), checkpoints,
    generation and flop counts. dynamic is passed on to
    torch.compile (True where batch shapes vary). ctx, setup's Autocast: where its dtype is still
    "auto" (a CPU with bf16 instructions), a training step of this model is timed in float32 and
    in bf16 and the faster is set. head_lr_scale: a scalar head's rate relative to the rest
    (configure_optimizers)."""
    model.to(ddp.device)
    if ctx is not None and ctx.dtype == "auto":  # a CPU with bf16 instructions: measure which is faster
        if resume_from is not None and resume_from.get("dtype") in ("float32", "bfloat16"):
            ctx.dtype = resume_from["dtype"]  # what the run chose: a resume must compute what it did
        else:
            ctx.dtype, times = cpu_dtype(model, ddp.device)
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


def set_lr(optimizer, lr):
    """Every group's rate to lr, times the group's own lr_scale (1 unless configure_optimizers set
    one) -> lr."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


@torch.no_grad()
def mean_loss(model, raw_model, batches, ctx, ddp, weight=None):
    """The mean of raw_model.loss(model(X), Y) over fixed (X, Y) batches, in eval mode, over every
    process's batches (model: what the stage calls for the hidden states, compiled or not;
    raw_model: the GPT whose head takes the loss): each batch weighted by weight(Y) (its number of
    loss tokens, say), else equally."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, device=ddp.device)  # (weighted sum of losses, sum of weights)
    for X, Y in batches:
        with ctx:
            loss = raw_model.loss(model(X), Y)
        w = weight(Y).float() if weight else torch.ones((), device=ddp.device)
        total += torch.stack((loss.float() * w, w))
    if ddp.enabled:
        dist.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1]).item()


# -----------------------------------------------------------------------------
# the frame of every training loop


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


@dataclass(frozen=True)
class LoopSettings:
    """The settings every stage's loop reads, under the names every stage gives them (a test checks
    that each stage script defines them all): taken from the stage's config once, at the start."""

    out_dir: str
    max_iters: int
    eval_interval: int
    log_interval: int
    eval_only: bool
    always_save_checkpoint: bool  # ckpt.pt at every eval, not only at a new best and the end
    learning_rate: float  # the schedule: lr_at
    warmup_iters: int
    lr_decay_iters: int
    min_lr: float
    decay_lr: bool
    wandb_log: bool
    wandb_project: str
    wandb_run_name: str

    @classmethod
    def of(cls, config):
        missing = [f.name for f in fields(cls) if f.name not in config]
        if missing:
            raise ValueError(f"the stage has no setting {', '.join(missing)}, which its training loop needs")
        return cls(**{f.name: config[f.name] for f in fields(cls)})


class Loop:
    """The part of a training loop that is the same in every stage: the iteration counter, the
    learning-rate schedule, when to evaluate and save, the step lines (loss, ms, tok_s, mfu, eta),
    the stop on a non-finite loss, Ctrl-C, and the closing lines. The stage keeps its own loop
    and calls this at four places:

        loop = common.Loop(config, ddp, resume_from, checkpoint, save_best)
        while True:
            lr = loop.lr(optimizer)           # the schedule's rate for this iteration
            if loop.eval_due():
                ... evaluate, loop.log("eval", val_loss=...) ...
                loop.evaluated(val_loss)      # best_metric, ckpt.pt and best.pt
            if loop.done():
                break
            ... the stage's training step ...
            if loop.step_done(loss, tokens=n, flops=f, grad_norm=g, lr=lr, **more):
                break                         # a non-finite loss, or Ctrl-C (checkpoint saved)
        loop.close(raw_model)

    config is the stage's resolved settings (LoopSettings takes what the loop needs from it, and
    the log and wandb record all of it). checkpoint() and save_best() write out_dir/ckpt.pt (with
    **loop.state() in it) and out_dir/best.pt. resume_from is the checkpoint being resumed, or
    None. metric names what evaluated() is given, lower being better: val_loss, or err_rl in the
    RL stages; best_metric keeps the best of it. A fresh run starts out_dir's log.jsonl and
    samples.txt anew; a resumed run or a lone evaluation appends to them.

    Exact resume: the checkpoint records the last evaluated iteration (a Ctrl-C checkpoint is
    written after the iteration counter moved on, possibly onto an eval boundary that was not
    evaluated yet) and the loss accumulated since the last step line, so a resumed run logs,
    evaluates and saves exactly what the uninterrupted run would have.
    """

    def __init__(self, config, ddp, resume_from, checkpoint, save_best, metric="val_loss"):
        self.settings = s = LoopSettings.of(config)
        self.ddp, self.checkpoint, self.save_best, self.metric = ddp, checkpoint, save_best, metric
        state = resume_from or {}
        self.iter_num = state.get("iter_num", 0)
        # best_val_loss: what checkpoints called it before it held err_rl in the RL stages too
        self.best_metric = state.get("best_metric", state.get("best_val_loss", float("inf")))
        self.best_iter = state.get("best_iter")  # the iteration best.pt holds, once this run wrote one
        self.last_eval_iter = state.get("last_eval_iter", -1)
        pending = state.get("pending_loss", (0.0, 0))
        self.loss_sum = torch.tensor(float(pending[0]), device=ddp.device)
        self.steps_since_log = pending[1]
        self.tokens = self.flops = 0.0
        self.start_iter, self.t_start, self.t_log = self.iter_num, time.time(), time.time()
        self.nonfinite = False
        appends = resume_from is not None or s.eval_only
        if ddp.master and not appends and os.path.isfile(os.path.join(s.out_dir, "samples.txt")):
            os.remove(os.path.join(s.out_dir, "samples.txt"))  # the stage appends to it at every eval
        self.logger = Logger(s.out_dir, ddp.master, s.wandb_log, s.wandb_project, s.wandb_run_name, config,
                             resume=appends)
        self.peak = peak_flops(ddp.device_type) if ddp.master else 1.0
        self.stop = catch_ctrl_c()

    def log(self, prefix, **values):
        self.logger.log(self.iter_num, prefix, iter=self.iter_num, **values)

    def lr(self, optimizer):
        """The learning rate of this iteration by the stage's schedule (see lr_at), set on
        optimizer. -> it."""
        s = self.settings
        return set_lr(optimizer, lr_at(self.iter_num, s.learning_rate, s.warmup_iters, s.lr_decay_iters, s.min_lr,
                                       s.decay_lr))

    def eval_due(self):
        if self.settings.eval_only:
            return True
        boundary = self.iter_num % self.settings.eval_interval == 0 or self.iter_num == self.settings.max_iters
        return boundary and self.iter_num != self.last_eval_iter

    def evaluated(self, value):
        """After an eval, the value of the metric: keep the best; save ckpt.pt (always_save_checkpoint,
        a new best or the last iteration; not at iteration 0) and best.pt (a new best, the start's
        included); nothing in eval_only. -> whether value is a new best."""
        improved = value < self.best_metric
        self.best_metric = min(self.best_metric, value)
        self.last_eval_iter = self.iter_num
        if not self.settings.eval_only:
            if improved:
                self.best_iter = self.iter_num  # before the checkpoints, which carry it
            if self.iter_num > 0 and (self.settings.always_save_checkpoint or improved
                                      or self.iter_num == self.settings.max_iters):
                self.checkpoint()
            if improved:  # at iteration 0 too: a run that only gets worse keeps its start as best.pt
                self.save_best()
        return improved

    def done(self):
        return self.settings.eval_only or self.iter_num >= self.settings.max_iters

    def state(self):
        """What a checkpoint needs of the loop. Every process must call it (a collective)."""
        pending = self.ddp.all_reduce_mean(self.loss_sum.detach().clone())
        return dict(iter_num=self.iter_num, metric=self.metric, best_metric=self.best_metric, best_iter=self.best_iter,
                    last_eval_iter=self.last_eval_iter, pending_loss=(pending.item(), self.steps_since_log))

    def step_done(self, loss, tokens=0, flops=0.0, **metrics):
        """After the optimizer step: count the iteration, and at every log_interval print and log
        the mean loss since the last line (over the processes), timing and the stage's metrics
        (floats or one-element tensors, logged as they are now, or lists: a MoE model's load per
        expert, which log.jsonl keeps and the printed line leaves out). tokens and flops are this
        process's for this iteration; tok_s and mfu add up every process's. Then the stops:
        a non-finite loss ends the run keeping the last good checkpoint; Ctrl-C (polled every
        iteration alone, every log_interval under DDP, where polling costs an all-reduce) saves
        ckpt.pt. -> True when the run must stop."""
        self.iter_num += 1
        self.steps_since_log += 1
        self.loss_sum += loss.detach() if torch.is_tensor(loss) else loss
        self.tokens += tokens
        self.flops += flops
        at_log = self.iter_num % self.settings.log_interval == 0 or self.iter_num == self.settings.max_iters
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
                          f"{os.path.join(self.settings.out_dir, 'ckpt.pt')}; try a lower learning_rate or a grad_clip.")
                return True
            rates = step_rates(tokens_all, flops_all, dt * n, self.ddp.world_size, self.peak)
            values = {k: (v.item() if torch.is_tensor(v) else v) for k, v in metrics.items()}
            self.log(None, loss=loss_avg, **values, ms=dt * 1000, **rates,
                     eta=f"{(self.settings.max_iters - self.iter_num) * dt / 60:.1f}m")
        if (at_log or not self.ddp.enabled) and self.ddp.any(self.stop["requested"]):
            self.checkpoint()
            if self.ddp.master:
                print(f"saved {os.path.join(self.settings.out_dir, 'ckpt.pt')} at iter {self.iter_num}; "
                      "resume with --init_from=resume")
            return True
        return False

    def close(self, model):
        """The end of the run: the processes must agree on the weights; the closing line; exit 1
        after a non-finite loss."""
        self.ddp.check_in_sync(model)
        if self.ddp.master and not self.nonfinite and not self.settings.eval_only:
            print(f"done: {self.iter_num - self.start_iter} iterations in {time.time() - self.t_start:.1f}s, "
                  f"best {self.metric} {self.best_metric:.4f}")
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
# logging


class Logger:
    """One line per step: printed as key=value, appended to out_dir/log.jsonl, sent to wandb.
    A list (a MoE model's load per layer and expert) is too long for the printed line: it goes to
    log.jsonl as it is and to wandb one number per key (load/1/3: layer 1, expert 3). Only the
    master process logs; the others get a Logger that does nothing."""

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
        print((prefix + " " if prefix else "") + " ".join(f"{k}={_fmt(v)}" for k, v in values.items()
                                                          if not isinstance(v, list)), flush=True)
        self.file.write(json.dumps(values) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(dict(kv for k, v in values.items() for kv in _spread(k, v)), step=step)

    def close(self):
        if self.enabled:
            self.file.close()
            if self.wandb is not None:
                self.wandb.finish()


def _spread(key, value):
    """(key, value) pairs, a list spread into one pair per item: load/1/3 for value[1][3]."""
    if not isinstance(value, list):
        return [(key, value)]
    return [kv for i, v in enumerate(value) for kv in _spread(f"{key}/{i}", v)]


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e-2 or abs(v) >= 1e5 else f"{v:.4f}"
    return str(v)
