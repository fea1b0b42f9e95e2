"""Knowledge distillation in train.py and sft.py: alpha 0 is exactly the plain run, a student
converges toward its teacher, a teacher of another tokenizer is refused, both scripts run with one.
The loss itself is checked by hand in test_losses.py."""

import json
import os
import random
from dataclasses import asdict

import torch

import bpe
import common
import losses
from conftest import run_forked, save_byte_checkpoint
from data.tasks.tasks import generate
from model import GPT, GPTConfig, cross_entropy

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--eval_iters=2",
        "--log_interval=1", "--warmup_iters=2", "--device=cpu", "--compile=false", "--dtype=float32"]


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_a_student_converges_toward_its_teacher():
    torch.manual_seed(0)
    teacher = GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(30)  # a confident teacher, far from the student's uniform start
    student = GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=32))
    x = torch.randint(0, 40, (8, 16), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 40, (8, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        t_logits = teacher.logits(teacher(x))
    opt = student.configure_optimizers(0.0, 1e-2, (0.9, 0.99), "cpu")
    kl = lambda: losses.distill_loss(student.logits(student(x)), t_logits, y, 1.0, "forward_kl").item()  # noqa: E731
    start = kl()
    for _ in range(150):
        logits = student.logits(student(x))
        ce = cross_entropy(logits, y)
        loss, _ = losses.distilled(ce, logits, t_logits, y, alpha=1.0, temperature=2.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert kl() < 0.1 * start, (start, kl())


def test_alpha_zero_is_exactly_the_plain_run(byte_dataset, tmp_path):
    run_forked("train.py", *TINY, f"--dataset={byte_dataset}", "--max_iters=2", f"--out_dir={tmp_path / 'teacher'}")
    args = ["train.py", *TINY, f"--dataset={byte_dataset}", "--max_iters=3", "--eval_interval=3"]
    run_forked(*args, f"--out_dir={tmp_path / 'plain'}")
    res = run_forked(*args, f"--out_dir={tmp_path / 'alpha0'}", f"--teacher={tmp_path / 'teacher' / 'ckpt.pt'}",
                     "--distill_alpha=0")
    assert "teacher " in res.stdout
    plain, alpha0 = read_log(str(tmp_path / "plain")), read_log(str(tmp_path / "alpha0"))
    assert [r["loss"] for r in plain if "loss" in r] == [r["loss"] for r in alpha0 if "loss" in r]
    assert all("kd" in r for r in alpha0 if "loss" in r)
    a = common.load_checkpoint(str(tmp_path / "plain" / "ckpt.pt"))["model"]
    b = common.load_checkpoint(str(tmp_path / "alpha0" / "ckpt.pt"))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # gradients bit for bit too
    # with alpha > 0 the run differs, logs the parts apart, and its val loss stays the plain CE
    res = run_forked(*args, f"--out_dir={tmp_path / 'kd'}", f"--teacher={tmp_path / 'teacher' / 'ckpt.pt'}",
                     "--distill_alpha=0.7", "--distill_loss=jsd", "--distill_temperature=2")
    kd = read_log(str(tmp_path / "kd"))
    assert [r["loss"] for r in kd if "loss" in r] != [r["loss"] for r in plain if "loss" in r]
    assert all(r["kd"] > 0 for r in kd if "loss" in r)
    assert [r["val_loss"] for r in kd if "val_loss" in r][0] == [r["val_loss"] for r in plain if "val_loss" in r][0]


def test_a_teacher_of_another_tokenizer_is_refused(byte_dataset, tmp_path):
    tok = bpe.train("abcabc dab cab " * 200, 300, special_tokens=bpe.SPECIAL_TOKENS)
    cfg = GPTConfig(vocab_size=320, block_size=32, n_layer=1, n_head=2, n_embd=32)
    meta = {"tokenizer": "bpe", "n_vocab": tok.n_vocab, "vocab_size": 320, "tokenizer_state": tok.state()}
    path = str(tmp_path / "bpe_teacher.pt")
    common.save_checkpoint({"model": GPT(cfg).state_dict(), "model_args": asdict(cfg), "meta": meta}, path)
    res = run_forked("train.py", *TINY, f"--dataset={byte_dataset}", "--max_iters=1", f"--out_dir={tmp_path / 'x'}",
                     f"--teacher={path}", check=False)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert f"teacher {path} uses the bpe (" in res.stderr and "the student uses the byte (261 ids) tokenizer" in res.stderr
    res = run_forked("train.py", *TINY, f"--dataset={byte_dataset}", "--max_iters=1", f"--out_dir={tmp_path / 'x'}",
                     f"--teacher={path}", "--distill_loss=kl", check=False)
    assert res.returncode != 0 and "distill_loss must be forward_kl | reverse_kl | jsd" in res.stderr


def test_sft_with_a_teacher(tmp_path):
    teacher, student = str(tmp_path / "teacher.pt"), str(tmp_path / "student.pt")
    save_byte_checkpoint(teacher, GPTConfig(vocab_size=320, block_size=48, n_layer=2, n_head=2, n_embd=32), seed=1)
    save_byte_checkpoint(student, GPTConfig(vocab_size=320, block_size=48, n_layer=1, n_head=2, n_embd=16), seed=2)
    rng = random.Random(0)
    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 8), ("val", 2)):
        with open(data / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                f.write(json.dumps(generate("add", 1, rng)) + "\n")
    out = str(tmp_path / "out")
    res = run_forked("sft.py", f"--init_from={student}", f"--teacher={teacher}", f"--sft_dataset={data}",
                     f"--out_dir={out}", "--max_iters=3", "--eval_interval=3", "--batch_size=4", "--eval_iters=1",
                     "--log_interval=1", "--eval_prompts=2", "--eval_max_new_tokens=4", "--device=cpu",
                     "--compile=false", "--distill_alpha=0.5")
    assert "0.5 T^2 forward_kl at T = 2" in res.stdout
    steps = [r for r in read_log(out) if "loss" in r]
    assert len(steps) == 3 and all(r["kd"] > 0 and r["loss"] > 0 for r in steps)
