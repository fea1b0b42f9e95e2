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
    """auto: bf16 on a GPU that supports it, else fp16 (with a GradScaler) on CUDA, fp32 elsewhere."""
    if dtype == "auto":
        if device_type == "cuda":
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be auto | float32 | bfloat16 | float16, got {dtype!r}")
    if dtype == "float16" and device_type != "cuda":
        raise ValueError(f"dtype float16 needs CUDA (a GradScaler); use bfloat16 or float32 on {device_type}")
    return dtype


def autocast(device_type, dtype):
    """The mixed-precision context for forward passes; a no-op in float32."""
    if dtype == "float32":
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
    -> (ddp, micro-steps of this process, the resolved dtype, its autocast context, compile)."""
    ddp = Distributed(device, backend)
    if gradient_accumulation_steps % ddp.world_size:
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
    return ddp, gradient_accumulation_steps // ddp.world_size, dtype, autocast(ddp.device_type, dtype), compile


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
    """Linear warmup from learning_rate/warmup_iters (never 0 at step 0), then cosine to min_lr at
    lr_decay_iters, then min_lr."""
    if not decay_lr:
        return learning_rate
    if it < warmup_iters:
        return learning_rate * (it + 1) / warmup_iters
    if it >= lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


# -----------------------------------------------------------------------------
# checkpoints


def save_checkpoint(obj, path):
    """torch.save to a temporary file, then rename over the old one: a crash mid-save leaves the
    previous checkpoint intact."""
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


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


def save_training_checkpoint(path, ddp, model, optimizer, scaler, **info):
    """Everything needed to resume exactly: the unwrapped, uncompiled model, its config, the
    optimizer, the scaler and every process's RNG state, plus the stage's info (iter_num,
    best_val_loss, config, meta, stage ...). Every process must call it (the RNG states are
    gathered); only the master writes."""
    torch_states = ddp.gather_objects(torch.get_rng_state())
    cuda_states = ddp.gather_objects(torch.cuda.get_rng_state()) if ddp.device_type == "cuda" else []
    if not ddp.master:
        return
    save_checkpoint({
        "model": model.state_dict(),
        "model_args": model.config.to_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": {"torch": torch_states, "cuda": cuda_states},
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
                     dynamic=None):
    """Put a model on the device with its AdamW and fp16 grad scaler (their state and the RNG
    restored from the checkpoint resume_from, when resuming), print its size, then compile it
    and wrap it for DDP. -> (model, the model to call in the loop, optimizer, scaler); the first
    is the plain module, for checkpoints, generation and flop counts. dynamic is passed on to
    torch.compile (True where batch shapes vary)."""
    model.to(ddp.device)
    scaler = torch.amp.GradScaler(ddp.device_type, enabled=(dtype == "float16"))
    optimizer = model.configure_optimizers(weight_decay, learning_rate, betas, ddp.device_type)
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
    if ddp.enabled:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            wrapped, device_ids=[ddp.local_rank] if ddp.device_type == "cuda" else None)
    return model, wrapped, optimizer, scaler


def model_from_checkpoint(ckpt, path, train_args=None):
    """The GPT a checkpoint holds. The architecture is the checkpoint's; of train_args (a script's
    model settings) only what is training-only may change it: dropout and the lora_* fields, so
    a plain checkpoint can be fine-tuned with adapters. A resume passes none."""
    from model import GPT, GPTConfig

    model_args = dict(ckpt["model_args"])
    for k, v in (train_args or {}).items():
        if k == "dropout" or k.startswith("lora_"):
            model_args[k] = v
    model = GPT(GPTConfig(**model_args))
    missing, unexpected = model.load_state_dict(clean_state_dict(ckpt["model"]), strict=False)
    if unexpected or any("lora_" not in k for k in missing):  # only fresh adapters may be missing
        raise ValueError(f"checkpoint {path} does not fit the model: missing {missing}, unexpected {unexpected}")
    return model


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


def read_conversations(path, require_assistant=True):
    """The conversations of a JSONL file, one JSON object per line, in either format:

        {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
        {"prompt": "...", "completion": "..."}      (a user message and an assistant message)

    -> (rows, blank): each row is the line's object with "messages" in the first format (any
    other fields, such as answer, task and difficulty, kept as they are), and blank is the number
    of blank lines skipped. A line that is neither format raises ValueError naming the file and
    the line, as does a conversation with no assistant message when require_assistant."""

    def messages_of(obj):
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

    rows, blank, n = [], 0, 0
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    blank += 1
                    continue
                try:
                    obj = json.loads(line)
                    obj["messages"] = messages_of(obj)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
                except ValueError as e:
                    raise ValueError(f"{path} line {n}: {e}") from None
                if require_assistant and not any(m["role"] == "assistant" for m in obj["messages"]):
                    raise ValueError(f"{path} line {n}: no assistant message, so nothing to learn from")
                rows.append(obj)
    except UnicodeDecodeError:
        raise ValueError(f"{path} line {n + 1}: not UTF-8 text") from None
    return rows, blank


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
        values = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in values.items() if v is not None}
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
