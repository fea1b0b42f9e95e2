"""train.py: the loss and its accumulation, the schedule, exact resume, DDP, and the script end to end."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import common
from conftest import ROOT, TEXT, run_forked, run_script
from model import GPT, GPTConfig

# dtype=auto would time float32 against bf16 in every run, and two runs compared bit for bit
# could then take different ones on a loaded CPU
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
        "--eval_iters=2", "--log_interval=1", "--warmup_iters=2", "--device=cpu", "--compile=false", "--dtype=float32"]


TEXT_FOR_BPE = TEXT * 3


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32))
    opt = model.configure_optimizers(0.0, 3e-3, (0.9, 0.95), "cpu")
    x = torch.randint(0, 50, (4, 16))
    y = torch.roll(x, -1, dims=1)
    for _ in range(150):
        loss = model.loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_gradient_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)).double()
    x, y = torch.randint(0, 50, (8, 16)), torch.randint(0, 50, (8, 16))
    big = model.loss(model(x), y)
    big.backward()
    g_big = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    total = 0.0
    for k in range(4):  # what train.py does: each micro-step's loss divided by the micro-steps
        loss = model.loss(model(x[2 * k : 2 * k + 2]), y[2 * k : 2 * k + 2])
        (loss / 4).backward()
        total += loss.item() / 4
    assert abs(total - big.item()) < 1e-12
    for p, g in zip(model.parameters(), g_big):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)


def test_lr_schedule_key_steps():
    kw = dict(learning_rate=1.0, warmup_iters=10, lr_decay_iters=110, min_lr=0.1)
    assert common.lr_at(0, **kw) == pytest.approx(0.1)  # never 0 at step 0
    assert common.lr_at(9, **kw) == pytest.approx(1.0)
    assert common.lr_at(10, **kw) == pytest.approx(1.0)
    assert common.lr_at(60, **kw) == pytest.approx(0.55)  # half way down the cosine
    assert common.lr_at(110, **kw) == pytest.approx(0.1)
    assert common.lr_at(500, **kw) == pytest.approx(0.1)
    # without decay the warmup still happens (a fresh AdamW's first steps are its largest), then the rate holds
    assert [common.lr_at(i, **kw, decay_lr=False) for i in (0, 3, 9, 10, 500)] == pytest.approx([0.1, 0.4, 1.0, 1.0, 1.0])


def test_resume_is_bit_identical(byte_dataset, tmp_path):
    # a hybrid MoE stack by train.py's own settings (layer 0 dense, layer 1 four experts, top-2, one
    # shared), so that both kinds of MLP resume: routing is a function of the weights and the batch,
    # and the resumed run routes every token as the straight one did (the dense model resumes in
    # the Ctrl-C tests below)
    common_args = ["train.py", *TINY, f"--dataset={byte_dataset}", "--dropout=0.1", "--eval_interval=3",
                   "--lr_decay_iters=6", "--n_expert=4", "--n_expert_active=2", "--n_shared_expert=1", "--moe_every=2",
                   "--moe_aux_coef=0.1", "--moe_z_coef=0.01"]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    res = run_forked(*common_args, "--max_iters=6", f"--out_dir={straight}")
    line = next(line for line in res.stdout.splitlines() if line.startswith("iter=1 "))
    assert "aux_loss=" in line and "z_loss=" in line and "load_cv=" in line and " load=" not in line  # load: log.jsonl
    run_forked(*common_args, "--max_iters=3", f"--out_dir={split}")
    run_forked(*common_args, "--max_iters=6", f"--out_dir={split}", "--init_from=resume")
    rows = lambda d: [(r["iter"], r["loss"], r["aux_loss"], r["z_loss"], r["load_cv"], r["load"])  # noqa: E731
                      for r in read_log(d) if "loss" in r]
    assert rows(straight) == rows(split) and len(rows(straight)) == 6
    assert all(len(r[-1]) == 1 and len(r[-1][0]) == 4 for r in rows(straight))  # one MoE layer, 4 experts
    a = torch.load(os.path.join(straight, "ckpt.pt"), weights_only=True)
    b = torch.load(os.path.join(split, "ckpt.pt"), weights_only=True)
    assert a["iter_num"] == b["iter_num"] == 6
    assert (a["model_args"]["n_expert"], a["model_args"]["moe_every"], a["model_args"]["moe_aux_coef"]) == (4, 2, 0.1)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_script_end_to_end(byte_dataset, tmp_path):
    out = str(tmp_path / "out")
    res = run_script("train.py", *TINY, f"--dataset={byte_dataset}", "--max_iters=8", "--eval_interval=4",
                     f"--out_dir={out}", "--eval_sample_tokens=16")
    rows = read_log(out)
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    assert [r["iter"] for r in steps] == list(range(1, 9))
    assert {"iter", "loss", "lr", "grad_norm", "ms", "tok_s", "mfu"} <= steps[0].keys()
    assert [r["iter"] for r in evals] == [0, 4, 8]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    ckpt = common.load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ckpt["iter_num"] == 8 and ckpt["config"]["max_iters"] == 8 and ckpt["git"]
    assert ckpt["meta"]["tokenizer_state"] and os.path.isfile(os.path.join(out, "best.pt"))
    assert "config: out_dir=" in res.stdout
    # evaluating the run again in its own out_dir appends to its log and leaves its checkpoint alone
    run_forked("train.py", *TINY, f"--dataset={byte_dataset}", f"--out_dir={out}", "--init_from=resume",
               "--eval_only=True")
    after = read_log(out)
    assert after[: len(rows)] == rows and [r["iter"] for r in after[len(rows):]] == [8]
    assert common.load_checkpoint(os.path.join(out, "ckpt.pt"))["iter_num"] == 8


def test_two_process_ddp_keeps_ranks_identical(byte_dataset, tmp_path):
    # a hybrid stack, layer 0 dense and layer 1 MoE: both kinds of MLP under gloo. Each process
    # routes its own batch; an expert no token of a process chose still gets a (zero) gradient
    # from it, so DDP's all-reduce finds every parameter on every process
    res = run_script("torchrun", "--standalone", "--nproc_per_node=2", "train.py", *TINY,
                     f"--dataset={byte_dataset}", "--max_iters=4", "--eval_interval=4", "--n_expert=4", "--moe_every=2",
                     "--gradient_accumulation_steps=2", f"--out_dir={tmp_path / 'ddp'}")
    assert "parameters identical on all 2 processes" in res.stdout
    ckpt = common.load_checkpoint(str(tmp_path / "ddp" / "ckpt.pt"))
    assert ckpt["iter_num"] == 4 and {"h.0.mlp.c_fc.weight", "h.1.mlp.experts.3.c_fc.weight"} <= set(ckpt["model"])
    assert all(len(r["load"]) == 1 and len(r["load"][0]) == 4 for r in read_log(str(tmp_path / "ddp")) if "loss" in r)


def test_bad_config_fails_with_a_message(byte_dataset, tmp_path):
    res = run_forked("train.py", "--batchsize=3", check=False)
    assert res.returncode != 0 and "unknown config key 'batchsize'" in res.stderr
    res = run_forked("train.py", "--max_iters=ten", check=False)
    assert res.returncode != 0 and "'max_iters' expects an int, got 'ten'" in res.stderr
    assert "Traceback" not in res.stderr
    out = f"--out_dir={tmp_path / 'out'}"  # the settings are checked after the folder is made: not the repo's out/
    res = run_forked("train.py", *TINY, f"--dataset={byte_dataset}", "--n_head=3", out, check=False)
    assert res.returncode != 0 and "divisible by n_head" in res.stderr and "Traceback" not in res.stderr
    res = run_forked("train.py", *TINY, f"--dataset={byte_dataset}", "--init_from=/nonexistent/ckpt.pt", out,
                     check=False)
    assert res.returncode != 0 and "no checkpoint at /nonexistent/ckpt.pt" in res.stderr
    assert "Traceback" not in res.stderr


def test_nonfinite_loss_stops_and_keeps_the_checkpoint(byte_dataset, tmp_path):
    out = str(tmp_path / "out")
    run_forked("train.py", *TINY, f"--dataset={byte_dataset}", "--max_iters=2", f"--out_dir={out}")
    before = open(os.path.join(out, "ckpt.pt"), "rb").read()
    res = run_forked("train.py", *TINY, f"--dataset={byte_dataset}", "--max_iters=30", f"--out_dir={out}",
                     "--init_from=resume", "--learning_rate=1e9", "--grad_clip=0", "--decay_lr=false", check=False)
    assert res.returncode == 1 and "stopping" in res.stdout
    assert open(os.path.join(out, "ckpt.pt"), "rb").read() == before


def test_ctrl_c_saves_a_checkpoint(byte_dataset, tmp_path):
    out = str(tmp_path / "out")
    cmd = [sys.executable, "train.py", *TINY, f"--dataset={byte_dataset}", "--max_iters=100000",
           "--eval_interval=100000", f"--out_dir={out}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    log = os.path.join(out, "log.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(log) and len(read_log(out)) > 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    ckpt = common.load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ckpt["iter_num"] > 0 and "resume with --init_from=resume" in stdout


def interrupt_and_resume(args, out):
    """Run train.py with args into out, Ctrl-C it once it has logged a few steps, then resume it to
    the end. -> its log rows."""
    cmd = [sys.executable, "train.py", *args, f"--out_dir={out}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    log = os.path.join(out, "log.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(log) and sum("loss" in r for r in read_log(out)) >= 4):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "resume with --init_from=resume" in stdout, stderr
    stopped = common.load_checkpoint(os.path.join(out, "ckpt.pt"))["iter_num"]
    run_forked(*cmd[1:], "--init_from=resume")
    return read_log(out), stopped


@pytest.mark.parametrize("eval_interval, log_interval", [(1, 1), (1000, 3)], ids=["at-eval", "off-eval-and-log"])
def test_ctrl_c_then_resume_equals_the_uninterrupted_run(byte_dataset, tmp_path, eval_interval, log_interval):
    # eval_interval 1: the Ctrl-C checkpoint always lands on an eval boundary not yet evaluated;
    # 1000: off every boundary, and log_interval 3 leaves a partial loss average to carry over
    args = [*TINY, f"--dataset={byte_dataset}", "--max_iters=60", "--lr_decay_iters=60", "--dropout=0.1",
            f"--eval_interval={eval_interval}", f"--log_interval={log_interval}", "--eval_iters=1"]
    run_forked("train.py", *args, f"--out_dir={tmp_path / 'straight'}")
    split, stopped = interrupt_and_resume(args, str(tmp_path / "split"))
    assert 0 < stopped < 60
    timing = ("ms", "tok_s", "mfu", "eta", "s")
    rows = lambda log: [{k: v for k, v in r.items() if k not in timing} for r in log]  # noqa: E731
    assert rows(split) == rows(read_log(str(tmp_path / "straight")))
    a = common.load_checkpoint(str(tmp_path / "straight" / "best.pt"))
    b = common.load_checkpoint(str(tmp_path / "split" / "best.pt"))
    assert a["iter_num"] == b["iter_num"] and a["best_metric"] == b["best_metric"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_init_from_a_checkpoint_of_another_tokenizer_is_refused(byte_dataset, tmp_path):
    import bpe

    run_forked("train.py", *TINY, f"--dataset={byte_dataset}", "--max_iters=1", f"--out_dir={tmp_path / 'byte'}")
    other = tmp_path / "bpe"
    other.mkdir()
    tok = bpe.train(TEXT_FOR_BPE, 300, special_tokens=bpe.SPECIAL_TOKENS)
    np.array(tok.encode_ordinary(TEXT_FOR_BPE), dtype=np.uint16).tofile(other / "train.bin")
    np.array(tok.encode_ordinary(TEXT_FOR_BPE), dtype=np.uint16).tofile(other / "val.bin")
    bpe.write_meta(str(other), tok, 64, 1, 1)
    res = run_forked("train.py", *TINY, f"--dataset={other}", f"--init_from={tmp_path / 'byte' / 'ckpt.pt'}",
                     f"--out_dir={tmp_path / 'out'}", "--max_iters=1", check=False)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "byte/ckpt.pt uses the byte (261 ids) tokenizer but dataset" in res.stderr
    assert f"bpe uses the bpe (300 ids, {len(tok.merges)} merges) tokenizer" in res.stderr


def test_lora_fine_tune_from_a_checkpoint_changes_only_adapters(byte_dataset, tmp_path):
    base, lora = str(tmp_path / "base"), str(tmp_path / "lora")
    run_forked("train.py", *TINY, f"--dataset={byte_dataset}", "--max_iters=2", f"--out_dir={base}")
    run_forked("train.py", *TINY, f"--dataset={byte_dataset}", "--max_iters=3", f"--out_dir={lora}",
               f"--init_from={base}/ckpt.pt", "--lora_rank=4", "--lora_targets=attn", "--learning_rate=1e-2")
    a = common.load_checkpoint(os.path.join(base, "ckpt.pt"))
    b = common.load_checkpoint(os.path.join(lora, "ckpt.pt"))
    assert b["model_args"]["lora_rank"] == 4 and b["model_args"]["n_embd"] == a["model_args"]["n_embd"]
    adapters = [k for k in b["model"] if "lora_" in k]
    assert len(adapters) == 2 * 4 * 2  # A and B, four attention linears, two layers
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k  # the base is frozen
    assert any(b["model"][k].abs().sum() > 0 for k in adapters if k.endswith("lora_B"))
