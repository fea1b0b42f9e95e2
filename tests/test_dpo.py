"""dpo.py end to end on tiny models: at the start policy = reference (loss log 2, rewards 0), only
reply tokens are scored, one forward of both halves equals two, a precomputed reference trains as
a live one does, the logs and checkpoints, exact resume, two processes, the LoRA reference with
adapters off, bad settings, and a toy preference that DPO learns in seconds. Each loss_type is
checked against a hand-computed value in test_losses.py."""

import json
import math
import os
import random

import pytest
import torch

import bpe
import common
import conversations
from conftest import run_forked, run_script, save_byte_checkpoint
from data.tasks.tasks import generate
from model import GPTConfig

# dtype=float32: dtype=auto times float32 against bf16 in every run, and runs compared bit for bit
# could then take different ones on a loaded CPU
TINY = ["--batch_size=4", "--log_interval=1", "--warmup_iters=1", "--device=cpu", "--compile=false",
        "--eval_pairs=8", "--eval_prompts=8", "--pass_k_prompts=2", "--pass_k_samples=4", "--eval_max_new_tokens=4",
        "--learning_rate=1e-3", "--rl_tasks=add/2,reverse/1", "--dtype=float32"]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def dpo_setup(tmp_path):
    """A tiny SFT-like checkpoint, task prompts, and pairs (the reference against a near miss) in
    two folders."""
    base = str(tmp_path / "sft.pt")
    save_byte_checkpoint(base, GPTConfig(vocab_size=320, block_size=48, n_layer=2, n_head=2, n_embd=32))
    rng = random.Random(0)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for split, n in (("train", 4), ("val", 3)):
        write_jsonl(tasks / f"{split}.jsonl", [generate(t, d, rng) for t in ("add", "reverse") for d in (1, 2)
                                               for _ in range(n)])
    folders = []
    for name in ("rules", "policy"):
        folder = tmp_path / name
        folder.mkdir()
        for split, n in (("train", 6), ("val", 2)):
            rows = []
            for task in ("add", "reverse"):
                for d in (1, 2):
                    for _ in range(n):
                        ex = generate(task, d, rng)
                        rows.append({"prompt": ex["messages"][:1], "chosen": ex["answer"],
                                     "rejected": ex["answer"][::-1] + "x", "task": task, "difficulty": d,
                                     "answer": ex["answer"]})
            write_jsonl(folder / f"{split}.jsonl", rows)
        folders.append(str(folder))
    return base, folders, str(tasks), tmp_path


def dpo(setup, out, *args, check=True, folders=None, run=run_forked):
    base, all_folders, tasks, _ = setup
    return run("dpo.py", *TINY, f"--init_from={base}", f"--prompt_dataset={tasks}",
               f"--preference_dataset={','.join(folders or all_folders)}", f"--out_dir={out}", *args, check=check)


def summed_reply_logps(model, convs, prompt_too=False):
    """The summed log-probs of each conversation's reply tokens (or of every token after the first),
    one conversation per forward: no batching, no padding."""
    out = []
    for ids, mask in convs:
        idx = torch.tensor(ids)[None]
        keep = torch.tensor(mask[1:], dtype=torch.bool)[None] | prompt_too
        out.append(model.logprobs(model(idx[:, :-1]), idx[:, 1:].masked_fill(~keep, -1), vocab_limit=261)[0].sum().item())
    return out


def test_one_forward_of_both_halves_equals_two_and_only_replies_count(dpo_setup):
    base, folders, _, _ = dpo_setup
    tok = bpe.byte_tokenizer(bpe.SPECIAL_TOKENS)
    ckpt = common.load_checkpoint(base)
    model = common.model_from_checkpoint(ckpt, base).eval()
    rows, _ = conversations.read_preferences(os.path.join(folders[0], "val.jsonl"))
    pairs, _ = conversations.render_pairs(rows, tok, 49)
    # dpo.py's batch: chosen rows then rejected rows, right-padded, targets only on the reply tokens
    idx, mask, _ = conversations.pair_batch(pairs, tok.special_id("<|endoftext|>"), "cpu")
    with torch.no_grad():
        one = model.logprobs(model(idx[:, :-1]), idx[:, 1:].masked_fill(~mask[:, 1:], -1), vocab_limit=tok.n_vocab)[0].sum(1)
        chosen = summed_reply_logps(model, [c for c, _, _ in pairs])
        rejected = summed_reply_logps(model, [r for _, r, _ in pairs])
        whole = summed_reply_logps(model, [c for c, _, _ in pairs], prompt_too=True)
    assert tok.n_vocab == 261  # 256 bytes and 5 special tokens
    torch.testing.assert_close(one, torch.tensor(chosen + rejected), rtol=1e-5, atol=1e-4)
    assert all(w < c - 1.0 for w, c in zip(whole, chosen))  # the prompt's tokens would add log-probs


def test_policy_is_its_reference_at_the_start_and_precomputed_equals_live(dpo_setup):
    base, folders, _, tmp = dpo_setup
    args = ["--max_iters=2", "--eval_interval=2", "--eval_prompts=0", "--pass_k_prompts=0"]
    pre, live = str(tmp / "pre"), str(tmp / "live")
    res = dpo(dpo_setup, pre, *args, folders=folders[:1])
    assert f"reference: {base}, precomputed" in res.stdout and "reference log-probs of 24 train pairs" in res.stdout
    dpo(dpo_setup, live, *args, "--precompute_ref=false", folders=folders[:1])
    a, b = read_log(pre), read_log(live)
    # iteration 0: policy = reference, so Delta = 0: the loss is log 2 and both implicit rewards 0
    for rows in (a, b):
        ev = rows[0]
        assert ev["iter"] == 0 and ev["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert ev["reward_chosen"] == ev["reward_rejected"] == ev["margin"] == ev["acc"] == 0.0
    step_a, step_b = [[r for r in rows if "loss" in r] for rows in (a, b)]
    assert step_b[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and step_b[0]["reward_chosen"] == 0.0
    # the log-probs the script logs are of the reply tokens alone, each conversation as if alone
    tok = bpe.byte_tokenizer(bpe.SPECIAL_TOKENS)
    model = common.model_from_checkpoint(common.load_checkpoint(base), base).eval()
    pairs, _ = conversations.render_pairs(conversations.read_preferences(os.path.join(folders[0], "val.jsonl"))[0], tok, 49)
    with torch.no_grad():
        chosen = summed_reply_logps(model, [c for c, _, _ in pairs])
        rejected = summed_reply_logps(model, [r for _, r, _ in pairs])
    assert a[0]["logp_chosen"] == pytest.approx(sum(chosen) / len(chosen), rel=1e-5)
    assert a[0]["logp_rejected"] == pytest.approx(sum(rejected) / len(rejected), rel=1e-5)
    # a precomputed reference (batched differently) and a live one: the same losses and weights
    assert [r["loss"] for r in step_a] == pytest.approx([r["loss"] for r in step_b], rel=1e-5)
    assert step_a[1]["loss"] != pytest.approx(math.log(2), abs=1e-3)  # it has moved
    wa = torch.load(os.path.join(pre, "ckpt.pt"), weights_only=True)["model"]
    wb = torch.load(os.path.join(live, "ckpt.pt"), weights_only=True)["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(wa[k], common.load_checkpoint(base)["model"][k]) for k in wa)


def test_script_end_to_end(dpo_setup):
    base, folders, tasks, tmp = dpo_setup
    out = str(tmp / "out")
    res = dpo(dpo_setup, out, "--max_iters=4", "--eval_interval=2", "--sft_coef=0.5", run=run_script)
    assert "rules/train.jsonl: 24 pairs; left out 0 with chosen == rejected" in res.stdout
    rows = read_log(out)
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    answers = [r for r in rows if "err_rl" in r]
    assert [r["iter"] for r in steps] == [1, 2, 3, 4] and [r["iter"] for r in evals] == [0, 2, 4]
    assert {"reward_chosen", "reward_rejected", "margin", "acc", "logp_chosen", "logp_rejected", "nll", "grad_norm",
            "lr", "tok_s"} <= steps[0].keys()
    assert {"rules/val_loss", "policy/acc", "policy/margin", "rules/logp_chosen", "rules/logp_rejected"} <= evals[0].keys()
    assert {"em/add/2", "em/reverse/1", "pass@1", "pass@4"} <= answers[0].keys()
    assert [r["iter"] for r in answers] == [0, 2, 4]
    ckpt = common.load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ckpt["stage"] == "dpo" and ckpt["reference"] == base and ckpt["iter_num"] == 4
    assert ckpt["config"]["sft_coef"] == 0.5 and "=== iter 4" in open(os.path.join(out, "samples.txt")).read()
    res = run_forked("sample.py", f"--out_dir={out}", "--chat=True", "--start=What is 1 + 2?", "--temperature=0",
                     "--max_new_tokens=4", "--device=cpu")
    assert res.returncode == 0
    # measure the checkpoint: its pairs against the reference it was trained from, not against itself
    again = str(tmp / "again")
    res = dpo(dpo_setup, again, f"--init_from={out}/ckpt.pt", "--eval_only=True", folders=folders[:1])
    assert f"reference: {base}" in res.stdout
    ev = [r for r in read_log(again) if "val_loss" in r][0]
    assert ev["val_loss"] == pytest.approx(evals[-1]["rules/val_loss"], rel=1e-5) and ev["reward_chosen"] != 0


def test_build_pairs_writes_a_missing_folder_first(dpo_setup):
    _, _, tasks, tmp = dpo_setup
    folder = str(tmp / "built")
    res = dpo(dpo_setup, str(tmp / "out"), "--max_iters=1", "--eval_interval=1", "--eval_prompts=0",
              "--pass_k_prompts=0", f"--build_pairs=--source=rules --tasks_dir={tasks} --train_prompts_per_cell=2",
              folders=[folder])
    assert f"{folder} is missing: building it with python data/preferences/prepare.py --source=rules" in res.stdout
    assert "train: 8 prompts, 8 usable pairs" in res.stdout and f"{folder}/train.jsonl: 8 pairs" in res.stdout
    assert f"{folder}/val.jsonl: 12 pairs" in res.stdout


def test_resume_is_bit_identical(dpo_setup):
    _, _, _, tmp = dpo_setup
    args = ["--dropout=0.1", "--eval_interval=2", "--lr_decay_iters=4", "--eval_prompts=0", "--pass_k_prompts=0",
            "--loss_type=ipo", "--beta=0.5"]
    straight, split = str(tmp / "straight"), str(tmp / "split")
    dpo(dpo_setup, straight, *args, "--max_iters=4")
    dpo(dpo_setup, split, *args, "--max_iters=2")
    dpo(dpo_setup, split, *args, "--max_iters=4", "--init_from=resume")
    keys = ("iter", "loss", "acc", "margin", "logp_chosen")
    rows = lambda d: [tuple(r.get(k) for k in keys) for r in read_log(d) if "loss" in r]  # noqa: E731
    assert rows(straight) == rows(split) and len(rows(straight)) == 4
    a = torch.load(os.path.join(straight, "ckpt.pt"), weights_only=True)
    b = torch.load(os.path.join(split, "ckpt.pt"), weights_only=True)
    assert a["reference"] == b["reference"] == dpo_setup[0]  # the starting policy stays the reference
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_two_processes_agree_with_one(dpo_setup):
    _, folders, _, tmp = dpo_setup
    args = ["--max_iters=2", "--eval_interval=2", "--eval_prompts=4", "--pass_k_prompts=0"]
    res = run_script("torchrun", "--standalone", "--nproc_per_node=2", "dpo.py", *TINY, f"--init_from={dpo_setup[0]}",
                     f"--prompt_dataset={dpo_setup[2]}", f"--preference_dataset={folders[0]}",
                     f"--out_dir={tmp / 'ddp'}", *args, "--gradient_accumulation_steps=2")
    assert "parameters identical on all 2 processes" in res.stdout
    dpo(dpo_setup, str(tmp / "one"), *args, "--batch_size=8", folders=folders[:1])
    a, b = read_log(str(tmp / "one")), read_log(str(tmp / "ddp"))
    assert [r["iter"] for r in a] == [r["iter"] for r in b]
    for x, y in zip(a, b):  # the same pairs per iteration, cut differently: the same numbers
        for k in ("loss", "acc", "margin", "logp_chosen", "val_loss", "reward_rejected", "em"):
            if k in x:
                assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), (k, x, y)


def test_lora_policy_uses_its_base_as_the_reference(dpo_setup):
    base, folders, _, tmp = dpo_setup
    out = str(tmp / "lora")
    res = dpo(dpo_setup, out, "--max_iters=3", "--eval_interval=3", "--lora_rank=4", "--lora_targets=attn",
              "--learning_rate=1e-2", "--eval_prompts=0", "--pass_k_prompts=0", folders=folders[:1])
    assert "reference: the policy with adapters off, precomputed" in res.stdout
    steps = [r for r in read_log(out) if "loss" in r]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # B = 0: the adapted policy is its base
    assert steps[-1]["margin"] != 0.0  # and it moves away from it as the adapters learn
    ckpt = common.load_checkpoint(os.path.join(out, "ckpt.pt"))
    plain = common.load_checkpoint(base)
    assert all(torch.equal(plain["model"][k], ckpt["model"][k]) for k in plain["model"])  # the base is frozen


def test_bad_settings_stop_with_a_one_line_message(dpo_setup):
    _, _, _, tmp = dpo_setup
    for args, message in ((["--loss_type=kto"], "loss_type must be sigmoid | ipo | hinge | robust"),
                          (["--label_smoothing=0.1"], "label_smoothing must be in [0, 0.5) and is robust's only"),
                          (["--preference_dataset=nowhere"], "make the pairs with data/preferences/prepare.py")):
        res = dpo(dpo_setup, str(tmp / "bad"), *args, check=False)
        assert res.returncode != 0 and message in res.stderr and "Traceback" not in res.stderr, (args, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_a_toy_preference_dpo_learns_in_seconds(tmp_path):
    # chosen replies are words with a z somewhere, rejected the same words without: the held-out
    # pairs are the training pairs, so the eval's accuracy is the train accuracy
    base = str(tmp_path / "base.pt")
    save_byte_checkpoint(base, GPTConfig(vocab_size=320, block_size=32, n_layer=1, n_head=2, n_embd=32))
    rng = random.Random(0)
    rows = []
    for _ in range(32):
        word = "".join(rng.choice("abcdef") for _ in range(5))
        k = rng.randrange(5)
        rows.append({"prompt": "say", "chosen": word[:k] + "z" + word[k + 1:], "rejected": word})
    folder = tmp_path / "toy"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", rows)
    write_jsonl(folder / "val.jsonl", rows)
    out = str(tmp_path / "out")
    run_forked("dpo.py", f"--init_from={base}", f"--preference_dataset={folder}", f"--out_dir={out}",
               "--batch_size=16", "--max_iters=20", "--eval_interval=20", "--eval_pairs=0", "--eval_prompts=0",
               "--pass_k_prompts=0", "--prompt_dataset=", "--rl_tasks=", "--learning_rate=3e-3",
               "--warmup_iters=1", "--beta=0.5", "--device=cpu", "--compile=false")
    evals = [r for r in read_log(out) if "val_loss" in r]
    assert evals[0]["acc"] == 0.0 and evals[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert evals[-1]["acc"] == 1.0 and evals[-1]["val_loss"] < 0.2 and evals[-1]["margin"] > 2, evals[-1]
