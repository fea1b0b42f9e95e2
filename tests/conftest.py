"""What the tests share: tiny configs and seeded models, checkpoints and datasets written under
each test's own tmp_path (so pytest -n auto can run them on every core, in any order), and two
ways to run a script:
- run_script: a fresh interpreter, as a user runs it. Each script's smoke test, torchrun, and the
  runs that must start clean (Ctrl-C, a PYTHONPATH that hides a package) use it.
- run_forked: a child forked from the test process, which has imported torch already: the same
  run in its own process, less the ~1.5 s of CPU that `import torch` costs, which is most of a
  tiny run. Every other run of a script (resume, bad settings, a second run to compare) uses it.
"""

import json
import os
import random
import runpy
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict

# one thread per process, set before numpy and torch start their pools: the tests use tiny
# matrices, and pytest -n auto runs one process per core already
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n"
) * 40


def tiny(**kw):
    """A GPTConfig small enough for a test to run in milliseconds."""
    from model import GPTConfig

    args = dict(vocab_size=37, block_size=32, n_layer=2, n_head=4, n_embd=32, dropout=0.0)
    args.update(kw)
    return GPTConfig(**args)


def build(config, dtype=None, seed=0, sharpen=20.0):
    """A seeded GPT in eval mode, float64 unless told otherwise. Random init at std 0.02 gives
    near-uniform logits, and greedy ties would make token comparisons flaky: sharpen the head."""
    import torch

    from model import GPT

    torch.manual_seed(seed)
    model = GPT(config).to(dtype or torch.float64).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)
    return model


def save_byte_checkpoint(path, config, seed=0):
    """A seeded GPT with a sharpened head (decisive greedy choices) saved as a checkpoint with the
    byte tokenizer in its meta, as sample.py and sft.py read one. -> (the model in eval mode, tokenizer)"""
    import torch

    import bpe
    import common
    from model import GPT

    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    tok = bpe.byte_tokenizer(bpe.SPECIAL_TOKENS)
    meta = {"tokenizer": "byte", "vocab_size": config.vocab_size, "tokenizer_state": tok.state()}
    common.save_checkpoint({"model": model.state_dict(), "model_args": asdict(config), "meta": meta}, path)
    return model.eval(), tok


@pytest.fixture(autouse=True)
def one_thread():
    """Tests use tiny matrices: on a small machine extra threads only add synchronisation."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def one_quant_path(monkeypatch):
    """Pin the quantized matmul to one path (the dequantized weight) in this process and in the
    runs it forks. Left to measurement (quantize.QUANT_PATHS), a busy CPU can time the kernel
    faster in one run and slower in the next, and two runs compared bit for bit part ways."""
    import quantize

    monkeypatch.setattr(quantize, "QUANT_FORCE", "dequantize")


@pytest.fixture
def byte_dataset(tmp_path):
    """A tiny byte-level dataset folder (train.bin, val.bin, meta.json) made from TEXT."""
    import bpe

    out = tmp_path / "data"
    out.mkdir()
    tok = bpe.byte_tokenizer(bpe.SPECIAL_TOKENS)
    n = int(len(TEXT) * 0.9)
    train, val = tok.encode_ordinary(TEXT[:n]), tok.encode_ordinary(TEXT[n:])
    np.array(train, dtype=np.uint16).tofile(out / "train.bin")
    np.array(val, dtype=np.uint16).tofile(out / "val.bin")
    bpe.write_meta(str(out), tok, 64, len(train), len(val))
    return str(out)


def run_script(*args, check=True, timeout=300, env=None):
    """Run a stage script (or torchrun) from the repo root in a fresh interpreter, as a user would;
    return the CompletedProcess. Each script's smoke test runs it this way; run_forked is the same
    run without the new interpreter."""
    cmd = list(args) if args[0] == "torchrun" else [sys.executable, *args]
    if cmd[0] == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", *cmd[1:]]
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def run_forked(*args, check=True, timeout=300, env=None):
    """Run a stage script as run_script does, in a child process forked from this one: its own
    globals, RNG, exit code, stdout and stderr, and nothing it does comes back here, but it starts
    with this process's modules already imported, which saves the ~1.5 s of CPU that a fresh
    interpreter spends on `import torch` (the most of a tiny run). What a test sets on an imported
    module before the call (quantize.QUANT_FORCE, say) the child has too. env goes into the child's
    os.environ, too late for what an interpreter reads as it starts (PYTHONPATH: use run_script).
    torchrun goes to run_script."""
    if args[0] == "torchrun":
        return run_script(*args, check=check, timeout=timeout, env=env)
    script = os.path.join(ROOT, args[0])
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()  # or the child would write this process's buffered text again
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: what `python script args` does, then exit without returning to pytest
            code = 1
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                sys.stdout = open(1, "w", buffering=1, closefd=False)
                sys.stderr = open(2, "w", buffering=1, closefd=False)
                sys.stdin = open(os.devnull)
                # the warning filters a fresh interpreter starts with (Lib/warnings.py), not pytest's
                warnings.resetwarnings()
                warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
                for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                    warnings.simplefilter("ignore", category, append=True)
                os.environ.update(PYTHONUNBUFFERED="1", **(env or {}))
                os.chdir(ROOT)
                sys.argv = list(args)
                sys.path.insert(0, os.path.dirname(script))
                runpy.run_path(script, run_name="__main__")
                code = 0
            except SystemExit as e:  # as the interpreter ends: sys.exit("message") prints it and returns 1
                if e.code is None or isinstance(e.code, int):
                    code = e.code or 0
                else:
                    print(e.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        deadline = time.monotonic() + timeout
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                raise subprocess.TimeoutExpired(args, timeout)
            time.sleep(0.01)
        returncode = os.waitstatus_to_exitcode(done[1])
        out.seek(0)
        err.seek(0)
        stdout, stderr = (f.read().decode("utf-8", errors="replace") for f in (out, err))
    res = subprocess.CompletedProcess(list(args), returncode, stdout, stderr)
    if check and returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({returncode}):\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return res


# --- the RL stages (grpo.py, ppo.py) -----------------------------------------


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


@pytest.fixture
def rl_setup(tmp_path):
    """A tiny random SFT-like checkpoint and a few task prompts with answers. -> (checkpoint, data folder, tmp)"""
    from data.tasks.tasks import generate
    from model import GPTConfig

    base = str(tmp_path / "sft.pt")
    save_byte_checkpoint(base, GPTConfig(vocab_size=320, block_size=48, n_layer=1, n_head=2, n_embd=32))
    rng = random.Random(0)
    data = tmp_path / "tasks"
    data.mkdir()
    for split, n in (("train", 10), ("val", 3), ("test", 2)):
        write_jsonl(data / f"{split}.jsonl", [generate(t, d, rng) for t in ("add", "copy") for d in (1, 2)
                                              for _ in range(n)])
    return base, str(data), tmp_path


@pytest.fixture
def ab_policy(tmp_path):
    """A policy that says a or b at random (a tiny model trained for a few seconds on such text),
    and one prompt whose answer is eight a's: with partial credit the reward is about the share
    of a's, a dense signal from the first iteration. -> (checkpoint, data folder, tmp)"""
    import torch

    import bpe
    import common
    from model import GPT, GPTConfig

    tok = bpe.byte_tokenizer(bpe.SPECIAL_TOKENS)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=320, block_size=48, n_layer=1, n_head=2, n_embd=32)
    model = GPT(cfg)
    opt = model.configure_optimizers(0.0, 1e-2, (0.9, 0.99), "cpu")
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        x = torch.where(torch.rand(16, 33, generator=g) < 0.5, ord("a"), ord("b"))
        loss = model.loss(model(x[:, :-1]), x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    meta = {"tokenizer": "byte", "vocab_size": 320, "n_vocab": tok.n_vocab, "tokenizer_state": tok.state()}
    base = str(tmp_path / "ab.pt")
    common.save_checkpoint({"model": model.state_dict(), "model_args": asdict(cfg), "meta": meta}, base)
    data = tmp_path / "say"
    data.mkdir()
    row = {"messages": [{"role": "user", "content": "Say aaaaaaaa"}, {"role": "assistant", "content": "aaaaaaaa"}],
           "answer": "aaaaaaaa", "task": "say", "difficulty": 1}
    write_jsonl(data / "train.jsonl", [row] * 4)
    write_jsonl(data / "val.jsonl", [row])
    return base, str(data), tmp_path


@pytest.fixture
def rare_policy(tmp_path):
    """A policy that answers "Say aaaa" with bbbb nine times in ten and with aaaa the tenth
    (a tiny model fine-tuned for a few seconds on such replies): a rare first token that an exact
    reward pays for, what RL on a mixed dataset selects. -> (checkpoint, data folder, tmp)"""
    import torch

    import bpe
    import common
    from model import GPT, GPTConfig

    tok = bpe.byte_tokenizer(bpe.SPECIAL_TOKENS)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=320, block_size=48, n_layer=1, n_head=2, n_embd=32)
    model = GPT(cfg)
    opt = model.configure_optimizers(0.0, 1e-2, (0.9, 0.99), "cpu")
    user = [{"role": "user", "content": "Say aaaa"}]
    convs = [tok.render_conversation(user + [{"role": "assistant", "content": c * 4}]) for c in "ab"]
    x = torch.tensor([convs[0][0]] * 2 + [convs[1][0]] * 18)  # 1 in 10 says a's
    y = torch.tensor([[t if m else -1 for t, m in zip(ids[1:], mask[1:])] for ids, mask in [convs[0]] * 2 + [convs[1]] * 18])
    for _ in range(150):
        loss = model.loss(model(x[:, :-1]), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    meta = {"tokenizer": "byte", "vocab_size": 320, "n_vocab": tok.n_vocab, "tokenizer_state": tok.state()}
    base = str(tmp_path / "rare.pt")
    common.save_checkpoint({"model": model.state_dict(), "model_args": asdict(cfg), "meta": meta}, base)
    data = tmp_path / "say"
    data.mkdir()
    row = {"messages": user + [{"role": "assistant", "content": "aaaa"}], "answer": "aaaa", "task": "say",
           "difficulty": 1}
    write_jsonl(data / "train.jsonl", [row] * 4)
    write_jsonl(data / "val.jsonl", [row])
    return base, str(data), tmp_path
