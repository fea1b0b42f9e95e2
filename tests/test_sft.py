"""sft.py: the loss is on assistant tokens only, malformed data fails clearly, the curriculum orders
the first epoch, LoRA trains only adapters and saves merged + adapter files, resume is exact, and the
script runs end to end into a checkpoint that sample.py loads."""

import json
import os
import random
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

import bpe
import common
import conversations
from conftest import run_forked, run_script
from data.tasks.tasks import generate
from convert import load_base_weights, load_lora_state_dict
from model import GPT, GPTConfig

# dtype=float32: dtype=auto times float32 against bf16 in every run, and two runs compared bit for
# bit could then take different ones on a loaded CPU
TINY = ["--batch_size=4", "--eval_iters=2", "--log_interval=1", "--warmup_iters=2", "--device=cpu",
        "--compile=false", "--eval_prompts=8", "--eval_max_new_tokens=8", "--learning_rate=3e-3", "--dtype=float32"]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


@pytest.fixture
def sft_setup(tmp_path):
    """A tiny base checkpoint (as train.py writes one) and a tiny task dataset in both formats."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=320, block_size=48, n_layer=2, n_head=2, n_embd=32)
    tok = bpe.byte_tokenizer(bpe.SPECIAL_TOKENS)
    meta = {"tokenizer": "byte", "vocab_size": 320, "n_vocab": tok.n_vocab, "tokenizer_state": tok.state()}
    base = str(tmp_path / "base.pt")
    common.save_checkpoint({"model": GPT(cfg).state_dict(), "model_args": asdict(cfg), "meta": meta,
                            "iter_num": 0, "stage": "pretrain"}, base)
    rng = random.Random(0)
    data = tmp_path / "data"
    data.mkdir()
    train = [generate(t, d, rng) for _ in range(12) for t in ("add", "reverse", "copy") for d in (1, 2)]
    train += [{"prompt": "Say hi", "completion": "hi"}] * 4
    train.append({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x" * 60},
                               {"role": "assistant", "content": "too long for block_size"}]})
    val = [generate(t, d, rng) for _ in range(2) for t in ("add", "reverse", "copy") for d in (1, 2)]
    write_jsonl(data / "train.jsonl", train)
    write_jsonl(data / "val.jsonl", val + [""])
    return base, str(data), tmp_path


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def sft(base, data, out, *args, check=True, run=run_forked):
    return run("sft.py", *TINY, f"--init_from={base}", f"--sft_dataset={data}", f"--out_dir={out}", *args,
               check=check)


def test_script_end_to_end_and_sample_chat(sft_setup):
    base, data, tmp = sft_setup
    out = str(tmp / "out")
    res = sft(base, data, out, "--max_iters=6", "--eval_interval=3", run=run_script)
    assert "train: 76 conversations" in res.stdout and "dropped 1 longer than block_size + 1 = 49 tokens" in res.stdout
    assert "val: 12 conversations" in res.stdout and "1 blank lines" in res.stdout
    rows = read_log(out)
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    answers = [r for r in rows if "em" in r]
    assert [r["iter"] for r in steps] == list(range(1, 7))
    assert {"loss", "lr", "grad_norm", "ms", "tok_s", "pad", "mfu"} <= steps[0].keys() and "level" not in steps[0]
    assert [r["iter"] for r in evals] == [r["iter"] for r in answers] == [0, 3, 6]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert {"em", "score", "em/add/1", "score/add/1", "em/reverse/2", "em/copy/1"} <= answers[0].keys()
    assert "reference:" in open(os.path.join(out, "samples.txt")).read()
    ckpt = common.load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ckpt["stage"] == "sft" and ckpt["iter_num"] == 6 and ckpt["config"]["sft_dataset"] == data
    assert ckpt["base"] == base and ckpt["meta"]["tokenizer_state"] and ckpt["git"]
    assert os.path.isfile(os.path.join(out, "best.pt"))
    # evaluating the checkpoint in its own out_dir appends to the run's log and samples, loses nothing
    samples = open(os.path.join(out, "samples.txt")).read()
    sft(base, data, out, f"--init_from={out}/ckpt.pt", "--eval_only=True")
    after = read_log(out)
    assert after[: len(rows)] == rows and len(after) == len(rows) + 2 and "em" in after[-1]
    assert open(os.path.join(out, "samples.txt")).read().startswith(samples)
    # sample.py loads the SFT checkpoint unchanged and chats with it
    res = run_forked("sample.py", f"--init_from={out}/ckpt.pt", "--chat=True", "--start=What is 1 + 2?",
                     "--temperature=0", "--max_new_tokens=8", "--device=cpu")
    assert res.returncode == 0 and res.stdout.endswith("\n")


def test_loss_is_the_mean_over_assistant_tokens(sft_setup):
    # the val loss sft.py logs must be the token-weighted mean cross-entropy of exactly the tokens
    # the template's mask marks, computed here one conversation at a time without padding
    base, data, tmp = sft_setup
    out = str(tmp / "eval")
    sft(base, data, out, "--eval_only=True", "--eval_iters=10", "--batch_size=5")
    logged = [r for r in read_log(out) if "val_loss" in r][0]["val_loss"]
    ckpt = common.load_checkpoint(base)
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    tok = bpe.tokenizer_from_meta(ckpt["meta"])
    rows, _ = conversations.read_conversations(os.path.join(data, "val.jsonl"))
    nll, n = 0.0, 0
    for row in rows:
        ids, mask = tok.render_conversation(row["messages"])
        logits = model.logits(model(torch.tensor([ids[:-1]])))
        losses = F.cross_entropy(logits[0], torch.tensor(ids[1:]), reduction="none")
        keep = torch.tensor(mask[1:], dtype=torch.bool)
        nll, n = nll + losses[keep].sum().item(), n + int(keep.sum())
    assert logged == pytest.approx(nll / n, rel=1e-5)


def test_malformed_jsonl_reports_file_and_line(tmp_path):
    good = json.dumps({"prompt": "a", "completion": "b"})
    cases = [
        ("{not json", "not valid JSON"),
        (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), "role 'robot'"),
        (json.dumps({"messages": [{"role": "user", "content": 5}]}), "not a string"),
        (json.dumps({"messages": [{"role": "user", "content": "only a question"}]}), "no assistant message"),
        (json.dumps({"text": "hello"}), "expected a 'messages' list or 'prompt' and 'completion'"),
        (json.dumps([1, 2]), "expected a JSON object"),
    ]
    for k, (line, message) in enumerate(cases):
        path = tmp_path / f"bad{k}.jsonl"
        write_jsonl(path, [good, "", good, line, good])
        with pytest.raises(ValueError) as e:
            conversations.read_conversations(str(path))
        assert f"bad{k}.jsonl line 4: " in str(e.value) and message in str(e.value)
    rows, blank = conversations.read_conversations(str(tmp_path / "bad3.jsonl"), require_assistant=False)
    assert len(rows) == 4 and blank == 1 and rows[0]["messages"][1] == {"role": "assistant", "content": "b"}


def test_malformed_line_stops_sft_with_a_message(sft_setup):
    base, data, tmp = sft_setup
    with open(os.path.join(data, "train.jsonl"), "a") as f:
        f.write('{"prompt": "no completion"}\n')
    res = sft(base, data, str(tmp / "out"), "--max_iters=2", check=False)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "train.jsonl line 78: expected a 'messages' list or 'prompt' and 'completion'" in res.stderr


def test_length_curriculum_runs_from_short_to_long(sft_setup):
    base, data, tmp = sft_setup
    out = str(tmp / "out")
    # some rows (prompt/completion) have no difficulty field: the difficulty curriculum falls back to length
    res = sft(base, data, out, "--max_iters=22", "--eval_interval=100", "--eval_prompts=0", "--curriculum=difficulty")
    assert "ordering by length instead" in res.stdout
    levels = [r["level"] for r in read_log(out) if "loss" in r]
    first_epoch = levels[:19]  # 76 training conversations, 4 per iteration
    assert first_epoch == sorted(first_epoch) and first_epoch[0] < first_epoch[-1]
    assert len(levels) == 22  # and it goes on into the next epoch, a plain shuffle


def test_difficulty_curriculum_uses_the_field(sft_setup):
    base, data, tmp = sft_setup
    rows = [json.loads(line) for line in open(os.path.join(data, "train.jsonl")) if "difficulty" in line]
    write_jsonl(os.path.join(data, "train.jsonl"), rows)  # 72 task conversations: 36 of each level
    out = str(tmp / "out")
    res = sft(base, data, out, "--max_iters=18", "--eval_interval=100", "--eval_prompts=0", "--curriculum=difficulty")
    assert "ordering by length" not in res.stdout
    levels = [r["level"] for r in read_log(out) if "loss" in r]
    assert levels == [1.0] * 9 + [2.0] * 9


def test_lora_sft_changes_only_adapters_and_saves_merged_and_adapters(sft_setup):
    base, data, tmp = sft_setup
    out = str(tmp / "lora")
    res = sft(base, data, out, "--max_iters=4", "--eval_interval=2", "--lora_rank=4", "--lora_targets=attn",
              "--learning_rate=1e-2")
    assert f"({2 * 4 * (4 * 32 + 32 * 4) / 1e6:.3f}M trainable)" in res.stdout  # 2 layers x 4 linears x (A + B)
    a, b = common.load_checkpoint(base), common.load_checkpoint(os.path.join(out, "ckpt.pt"))
    adapters = [k for k in b["model"] if "lora_" in k]
    assert len(adapters) == 2 * 4 * 2 and b["model_args"]["lora_rank"] == 4
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k  # the base is frozen
    assert any(b["model"][k].abs().sum() > 0 for k in adapters if k.endswith("lora_B"))
    # merged.pt: a plain checkpoint computing what the adapted model computes
    merged = common.load_checkpoint(os.path.join(out, "merged.pt"))
    assert merged["model_args"]["lora_rank"] == 0 and not any("lora_" in k for k in merged["model"])
    plain = GPT(GPTConfig(**merged["model_args"]))
    plain.load_state_dict(merged["model"])
    adapted = GPT(GPTConfig(**b["model_args"]))
    adapted.load_state_dict(b["model"])
    x = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(plain.logits(plain(x)), adapted.logits(adapted(x)), rtol=1e-4, atol=1e-4)
    # lora.pt: the adapters alone, which load on top of the base
    lora = torch.load(os.path.join(out, "lora.pt"), weights_only=True)
    assert sorted(lora["lora"]) == sorted(adapters) and lora["base"] == base
    again = GPT(GPTConfig(**lora["model_args"]))
    load_base_weights(again, a["model"])
    load_lora_state_dict(again, lora["lora"])
    torch.testing.assert_close(again.logits(again(x)), adapted.logits(adapted(x)))
    with pytest.raises(ValueError, match="adapters alone.*merged.pt"):  # not a checkpoint to start from
        common.load_checkpoint(os.path.join(out, "lora.pt"))
    # best.pt is merged too, so sample.py reads it like any checkpoint
    assert common.load_checkpoint(os.path.join(out, "best.pt"))["model_args"]["lora_rank"] == 0


def test_resume_is_bit_identical(sft_setup):
    base, data, tmp = sft_setup
    args = ["--dropout=0.1", "--eval_interval=3", "--lr_decay_iters=6", "--eval_prompts=0"]
    straight, split = str(tmp / "straight"), str(tmp / "split")
    sft(base, data, straight, *args, "--max_iters=6")
    sft(base, data, split, *args, "--max_iters=3")
    sft(base, data, split, *args, "--max_iters=6", "--init_from=resume")
    losses = lambda d: [(r["iter"], r["loss"]) for r in read_log(d) if "loss" in r]  # noqa: E731
    assert losses(straight) == losses(split) and len(losses(straight)) == 6
    a = torch.load(os.path.join(straight, "ckpt.pt"), weights_only=True)
    b = torch.load(os.path.join(split, "ckpt.pt"), weights_only=True)
    assert a["iter_num"] == b["iter_num"] == 6 and b["base"] == base
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_micro_steps_and_processes_do_not_change_the_loss(sft_setup):
    # an iteration takes the same conversations however it is cut into micro-batches, processes and
    # length pieces (8 at once in 4 pieces; 8 in one padded batch; 2 micro-steps of 4; 2 processes
    # of 4), and the loss weighs every assistant token the same wherever it falls, so all must agree
    base, data, tmp = sft_setup
    args = ["sft.py", *TINY, f"--init_from={base}", f"--sft_dataset={data}", "--max_iters=3", "--eval_interval=3",
            "--eval_iters=10"]
    run_forked(*args, "--batch_size=8", f"--out_dir={tmp / 'one'}")
    run_forked(*args, "--batch_size=8", "--length_pieces=1", f"--out_dir={tmp / 'padded'}")
    run_forked(*args, "--gradient_accumulation_steps=2", f"--out_dir={tmp / 'accum'}")
    res = run_script("torchrun", "--standalone", "--nproc_per_node=2", *args, "--gradient_accumulation_steps=2",
                     f"--out_dir={tmp / 'ddp'}")
    assert "parameters identical on all 2 processes" in res.stdout
    one = read_log(str(tmp / "one"))
    for other in ("padded", "accum", "ddp"):
        rows = read_log(str(tmp / other))
        assert len(rows) == len(one)
        for a, b in zip(one, rows):
            for k in ("loss", "val_loss", "em", "score"):
                if k in a:
                    assert a[k] == pytest.approx(b[k], rel=1e-4), (other, k, a, b)


def test_lora_with_train_embeddings_changes_only_adapters_and_the_embedding(sft_setup):
    base, data, tmp = sft_setup
    out = str(tmp / "lora")
    res = sft(base, data, out, "--max_iters=3", "--eval_interval=3", "--lora_rank=4", "--lora_targets=c_q,c_v",
              "--train_embeddings=True", "--learning_rate=1e-2")
    assert f"({(2 * 2 * (4 * 32 + 32 * 4) + 320 * 32) / 1e6:.3f}M trainable)" in res.stdout
    a, b = common.load_checkpoint(base), common.load_checkpoint(os.path.join(out, "ckpt.pt"))
    changed = {k for k, v in a["model"].items() if not torch.equal(v, b["model"][k])}
    assert changed == {"wte.weight", "lm_head.weight"}  # one tied tensor, under both names
    lora = torch.load(os.path.join(out, "lora.pt"), weights_only=True)
    assert torch.equal(lora["embedding"], b["model"]["wte.weight"])
    again = GPT(GPTConfig(**lora["model_args"]))
    load_base_weights(again, a["model"])
    load_lora_state_dict(again, lora["lora"])
    with torch.no_grad():
        again.wte.weight.copy_(lora["embedding"])
    adapted = GPT(GPTConfig(**b["model_args"]))
    adapted.load_state_dict(b["model"])
    x = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(again.logits(again(x)), adapted.logits(adapted(x)))


def test_rows_of_ids_pretraining_never_saw_restart(sft_setup):
    # train.py records the ids its text never had; SFT restarts their embedding rows (norm: random
    # directions as long as the other rows), and only theirs
    base, data, tmp = sft_setup
    ckpt = common.load_checkpoint(base)
    unseen = list(range(48, 58)) + list(range(256, 261))  # the digits and the special tokens
    ckpt["meta"]["unseen_ids"] = unseen
    marked = str(tmp / "marked.pt")
    common.save_checkpoint(ckpt, marked)
    out = str(tmp / "out")
    res = sft(marked, data, out, "--max_iters=1", "--eval_interval=1", "--learning_rate=0", "--min_lr=0",
              "--eval_prompts=0")
    assert "re-initialised the embedding rows of the 15 ids the pretraining text never contained (norm)" in res.stdout
    before, after = ckpt["model"]["wte.weight"], common.load_checkpoint(os.path.join(out, "ckpt.pt"))["model"]["wte.weight"]
    changed = {i for i in range(before.size(0)) if not torch.equal(before[i], after[i])}
    assert changed == set(unseen)
    others = [i for i in range(before.size(0)) if i not in changed]
    torch.testing.assert_close(after[unseen].norm(dim=1), torch.full((15,), before[others].norm(dim=1).mean().item()))
    assert torch.nn.functional.normalize(after[unseen], dim=1).matmul(
        torch.nn.functional.normalize(after[unseen], dim=1).T).triu(1).abs().max() < 0.9  # no longer one vector
    # the SFT checkpoint calls unseen only what its data never showed (the data has digits and <|end|>)
    saved = common.load_checkpoint(os.path.join(out, "ckpt.pt"))
    left = set(saved["meta"]["unseen_ids"])
    assert left < set(unseen) and not left & {ord(c) for c in "0123456789"} and 260 not in left
    # evaluating an SFT checkpoint restarts nothing, even when its meta lists unseen ids
    res = sft(marked, data, str(tmp / "eval"), f"--init_from={out}/ckpt.pt", "--eval_only=True", "--eval_prompts=0")
    assert "re-initialised" not in res.stdout
    res = sft(marked, data, str(tmp / "bad"), "--reinit_unseen=zero", check=False)
    assert res.returncode != 0 and "reinit_unseen must be none | init | norm" in res.stderr
    res = sft(marked, data, str(tmp / "bad"), "--length_pieces=0", check=False)
    assert res.returncode != 0 and "length_pieces >= 1" in res.stderr
