"""reward.py and the preference data: pairs read in TRL's formats with clear errors, a reward model
that learns a synthetic preference, the statistics of its evaluation against hand-made answers, the
prepare script's two sources, and the script end to end (resume, eval_only, two processes)."""

import importlib.util
import json
import math
import os
import random

import pytest
import torch

import bpe
import common
import conversations
import losses
import posttrain
from conftest import run_forked, run_script, save_byte_checkpoint
from data.tasks.tasks import generate, score
from model import GPT, GPTConfig

# dtype=float32: dtype=auto times float32 against bf16 in every run, and runs compared bit for bit
# could then take different ones on a loaded CPU
TINY = ["--batch_size=4", "--log_interval=1", "--warmup_iters=1", "--device=cpu", "--compile=false",
        "--eval_pairs=8", "--learning_rate=1e-3", "--dtype=float32"]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


# --- the data ----------------------------------------------------------------


def test_both_formats_read_to_the_same_pair(tmp_path):
    explicit = {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6", "margin": 0.5, "task": "add"}
    listed = {"prompt": [{"role": "user", "content": "What is 2 + 3?"}],
              "chosen": [{"role": "assistant", "content": "5"}], "rejected": "6", "margin": 0.5, "task": "add"}
    implicit = {"chosen": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}],
                "rejected": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "6"}],
                "margin": 0.5, "task": "add"}
    write_jsonl(tmp_path / "p.jsonl", [explicit, listed, "", implicit])
    rows, blank = conversations.read_preferences(str(tmp_path / "p.jsonl"))
    assert blank == 1 and rows[0] == rows[1] == rows[2]
    assert rows[0] == {"prompt": [{"role": "user", "content": "What is 2 + 3?"}], "chosen": "5", "rejected": "6",
                       "margin": 0.5, "task": "add"}


def test_malformed_pairs_name_file_and_line(tmp_path):
    good = json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})
    cases = [
        ("{oops", "not valid JSON"),
        (json.dumps({"prompt": "q", "chosen": "a"}), "expected 'chosen' and 'rejected'"),
        (json.dumps({"prompt": "q", "chosen": 3, "rejected": "b"}), "'chosen' must be a string"),
        (json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}), "'margin' must be a number"),
        (json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "margin": None}), "'margin' must be a number"),
        (json.dumps({"prompt": [{"role": "robot", "content": "q"}], "chosen": "a", "rejected": "b"}), "role 'robot'"),
        (json.dumps({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                     "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]}),
         "share every message but a final assistant reply"),
    ]
    for k, (line, message) in enumerate(cases):
        path = tmp_path / f"bad{k}.jsonl"
        write_jsonl(path, [good, good, line])
        with pytest.raises(ValueError) as e:
            conversations.read_preferences(str(path))
        assert f"bad{k}.jsonl line 3: " in str(e.value) and message in str(e.value), str(e.value)


def test_identical_and_overlong_pairs_are_counted_not_dropped_silently():
    tok = bpe.byte_tokenizer(bpe.SPECIAL_TOKENS)
    rows = [{"prompt": [{"role": "user", "content": "q"}], "chosen": "same", "rejected": "same"},
            {"prompt": [{"role": "user", "content": "q"}], "chosen": "x" * 50, "rejected": "y"},
            {"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}]
    pairs, report = conversations.render_pairs(rows, tok, max_len=20)
    assert report == {"identical": 1, "too_long": 1} and len(pairs) == 1
    (ids_c, mask_c), (ids_r, _), row = pairs[0]
    assert ids_c[-1] == tok.special_id("<|end|>") and sum(mask_c) == 2 and row is rows[2]  # "a" and <|end|>
    idx, mask, lengths = conversations.pair_batch(pairs * 2, tok.special_id("<|endoftext|>"), "cpu")
    assert idx.shape == (4, len(ids_c)) and lengths.tolist() == [len(ids_c)] * 2 + [len(ids_r)] * 2
    assert idx[0, lengths[0] - 1] == tok.special_id("<|end|>") and mask.sum(1).tolist() == [2, 2, 2, 2]


def test_the_reply_mask_is_the_final_reply_only_in_a_multi_turn_prompt():
    tok = bpe.byte_tokenizer(bpe.SPECIAL_TOKENS)
    prompt = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "HELLO"},
              {"role": "user", "content": "2 + 2?"}]
    pairs, _ = conversations.render_pairs([{"prompt": prompt, "chosen": "4", "rejected": "five"}], tok, 100)
    (ids_c, mask_c), (ids_r, mask_r), _ = pairs[0]
    assert tok.decode([t for t, m in zip(ids_c, mask_c) if m]) == "4<|end|>"  # not HELLO<|end|> too
    assert tok.decode([t for t, m in zip(ids_r, mask_r) if m]) == "five<|end|>"


def test_rules_pairs_are_near_misses_of_the_reference(tmp_path):
    data = tmp_path / "tasks"
    run_forked("data/tasks/prepare.py", "--train_per_cell=30", "--val_per_cell=5", f"--out_dir={data}")
    out = tmp_path / "rules"
    res = run_script("data/preferences/prepare.py", "--source=rules", f"--tasks_dir={data}", f"--out_dir={out}",
                     "--train_prompts_per_cell=10")
    assert "train: 180 prompts, 180 usable pairs (1.00 a prompt)" in res.stdout
    for split in ("train", "val"):
        rows, _ = conversations.read_preferences(str(out / f"{split}.jsonl"))
        for row in rows:
            ex = {"answer": row["answer"], "task": row["task"]}
            assert row["chosen"] == row["answer"] and row["rejected"] != row["answer"]
            assert 0 < row["margin"] == pytest.approx(1 - score(ex, row["rejected"]), abs=1e-4)
            if row["task"] in ("add", "sub", "count"):
                assert row["rejected"].isdigit()
    # deterministic
    again = tmp_path / "again"
    run_forked("data/preferences/prepare.py", "--source=rules", f"--tasks_dir={data}", f"--out_dir={again}",
               "--train_prompts_per_cell=10")
    assert (out / "train.jsonl").read_bytes() == (again / "train.jsonl").read_bytes()
    # train pairs come from train prompts only (both sources pick their prompts the same way), val
    # pairs from data/tasks's held-out ones: no dev or test problem leaks into the reward model
    def questions(split):
        with open(data / f"{split}.jsonl") as f:
            return {json.loads(line)["messages"][0]["content"] for line in f}

    held_out = questions("val") | questions("test")
    train_pairs = conversations.read_preferences(str(out / "train.jsonl"))[0]
    assert {r["prompt"][0]["content"] for r in train_pairs} <= questions("train") - held_out
    assert {r["prompt"][0]["content"] for r in conversations.read_preferences(str(out / "val.jsonl"))[0]} <= questions("val")


def test_policy_pairs_come_from_the_model_s_samples(tmp_path):
    data = tmp_path / "tasks"
    run_forked("data/tasks/prepare.py", "--tasks=add,copy", "--difficulties=1", "--train_per_cell=20",
               "--val_per_cell=4", f"--out_dir={data}")
    ckpt = str(tmp_path / "sft.pt")
    save_byte_checkpoint(ckpt, GPTConfig(vocab_size=320, block_size=64, n_layer=1, n_head=2, n_embd=32))
    out = tmp_path / "policy"
    res = run_forked("data/preferences/prepare.py", "--source=policy", f"--init_from={ckpt}", f"--tasks_dir={data}",
                     f"--out_dir={out}", "--train_prompts_per_cell=6", "--samples_per_prompt=4", "--max_new_tokens=4",
                     "--cells=add/1", "--device=cpu")
    assert "train: 6 prompts," in res.stdout and "val: 4 prompts," in res.stdout
    rows, _ = conversations.read_preferences(str(out / "train.jsonl"))
    for row in rows:
        ex = {"answer": row["answer"], "task": row["task"]}
        assert row["task"] == "add" and score(ex, row["chosen"]) > score(ex, row["rejected"])
        assert row["margin"] == pytest.approx(score(ex, row["chosen"]) - score(ex, row["rejected"]), abs=1e-4)
    res = run_forked("data/preferences/prepare.py", "--source=policy", f"--init_from={ckpt}", f"--tasks_dir={data}",
                     f"--out_dir={out}", "--cells=sort/2", check=False)
    assert res.returncode != 0 and "cells ['sort/2'] are not in" in res.stderr


def test_form_contrast_pairs_keep_only_worked_chosen_over_direct_rejected():
    spec = importlib.util.spec_from_file_location("prefs_prepare", "data/preferences/prepare.py")
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    worked, worked_wrong, direct = "Work:\n1+2=3 3\nAnswer: 3", "Work:\n1+2=4 4\nAnswer: 4", "3"
    pairs = [{"chosen": worked, "rejected": direct}, {"chosen": worked, "rejected": worked_wrong},
             {"chosen": direct, "rejected": "4"}, {"chosen": direct, "rejected": worked_wrong}]
    assert prepare.keep_forms(pairs, "any") == pairs
    assert prepare.keep_forms(pairs, "worked_over_direct") == pairs[:1]


def test_policy_pairs_by_partial_credit_or_by_the_verdict_grade_worked_replies_by_their_answer_line(tmp_path):
    spec = importlib.util.spec_from_file_location("prefs_prepare", "data/preferences/prepare.py")
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    row = {"messages": [{"role": "user", "content": "What is 59 + 63?"}], "answer": "122", "task": "add",
           "difficulty": 2, "format": "either"}
    worked, right, near, far = "Work:\n9+3+0=12 2\n5+6+1=12 122\nAnswer: 122", "122", "123", "9"
    samples = [worked, right, near, far, far]
    by_verdict = prepare.prompt_pairs(row, samples, random.Random(0), "exact", 100)
    # every pair is a right answer (the worked one too, by its Answer line) over a wrong one: 2 x 2
    assert sorted((p["chosen"], p["rejected"]) for p in by_verdict) == sorted(
        (c, r) for c in (worked, right) for r in (near, far))
    by_credit = prepare.prompt_pairs(row, samples, random.Random(0), "score", 100)
    assert (near, far) in [(p["chosen"], p["rejected"]) for p in by_credit]  # two wrong ones, the nearer wins
    assert all(p["format"] == "either" for p in by_credit)
    assert [p["margin"] for p in by_verdict if p["rejected"] == far] == [1.0, 1.0]  # score("9") = 0: no digit alike
    assert prepare.prompt_pairs(row, [near, near], random.Random(0), "exact", 4) == []  # nothing to prefer
    best_worst = prepare.prompt_pairs(row, samples, random.Random(0), "score", 1)
    assert len(best_worst) == 1 and best_worst[0]["rejected"] == far
    with pytest.raises(ValueError, match="worked solutions"):  # a bare answer is no reference for a cot prompt
        prepare.rules_pairs([dict(row, format="cot")], random.Random(0))
    write_jsonl(tmp_path / "p.jsonl", by_verdict)  # read back with the field that grades a worked reply
    rows, _ = conversations.read_preferences(str(tmp_path / "p.jsonl"))
    assert all(score(r, r["chosen"]) == 1.0 and score(r, r["rejected"]) < 1.0 for r in rows)


# --- the statistics of the eval ------------------------------------------------


def test_spearman_and_calibration_on_hand_made_examples():
    assert posttrain.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert posttrain.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks with a tie: x (1, 2.5, 2.5, 4) against y (1, 2, 3, 4): 1 - 6 sum d^2 / (n (n^2 - 1)) does not
    # hold with ties; Pearson of the ranks: cov 4.5 / sqrt(4.5 * 5) = 0.9487
    assert posttrain.ranks([5, 7, 7, 9]) == [1, 2.5, 2.5, 4]
    assert posttrain.spearman([5, 7, 7, 9], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert math.isnan(posttrain.spearman([1, 1, 1], [1, 2, 3]))
    # calibration: bin [0.9, 1.0) holds p = 0.9, 0.95 with outcomes 1, 0: |0.5 - 0.925| = 0.425;
    # bin [0.2, 0.3) holds p = 0.2 with outcome 0: |0 - 0.2| = 0.2; weights 2/3 and 1/3
    ece, table = posttrain.calibration([0.9, 0.95, 0.2], [1, 0, 0], bins=10)
    assert ece == pytest.approx(2 / 3 * 0.425 + 1 / 3 * 0.2)
    assert [(round(lo, 1), n) for lo, _, n, _, _ in table] == [(0.2, 1), (0.9, 2)]
    assert posttrain.calibration([0.75, 0.75, 0.75, 0.75], [1, 1, 1, 0])[0] == pytest.approx(0.0)
    assert posttrain.pass_at_k(8, 0, 4) == 0.0 and posttrain.pass_at_k(8, 8, 1) == 1.0
    assert posttrain.pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert posttrain.pass_at_k(8, 2, 1) == pytest.approx(2 / 8)


# --- the model ---------------------------------------------------------------


def test_a_tiny_reward_model_learns_a_synthetic_preference():
    # chosen replies contain the letter z somewhere, rejected ones do not: 100% train accuracy
    tok = bpe.byte_tokenizer(bpe.SPECIAL_TOKENS)
    rng = random.Random(0)
    rows = []
    for _ in range(64):
        word = "".join(rng.choice("abcdef") for _ in range(5))
        k = rng.randrange(5)
        rows.append({"prompt": [{"role": "user", "content": "say"}], "chosen": word[:k] + "z" + word[k + 1:],
                     "rejected": word})
    pairs, _ = conversations.render_pairs(rows, tok, 64)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=320, block_size=64, n_layer=2, n_head=2, n_embd=32, scalar_head=True))
    opt = model.configure_optimizers(0.0, 3e-3, (0.9, 0.99), "cpu")
    idx, _, lengths = conversations.pair_batch(pairs, tok.special_id("<|endoftext|>"), "cpu")
    for _ in range(150):
        r = model.scores(model(idx), lengths - 1)
        loss = losses.bradley_terry_loss(r[:64], r[64:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    r = model.scores(model(idx), lengths - 1)
    assert (r[:64] > r[64:]).all() and loss.item() < 0.05


# --- the script --------------------------------------------------------------


@pytest.fixture
def reward_setup(tmp_path):
    """A tiny SFT-like checkpoint, and rules pairs for a few cells in two folders."""
    base = str(tmp_path / "sft.pt")
    save_byte_checkpoint(base, GPTConfig(vocab_size=320, block_size=48, n_layer=2, n_head=2, n_embd=32))
    rng = random.Random(0)
    folders = []
    for name in ("rules", "policy"):
        folder = tmp_path / name
        folder.mkdir()
        for split, n in (("train", 12), ("val", 3)):
            rows = []
            for task in ("add", "reverse"):
                for d in (1, 2):
                    for _ in range(n):
                        ex = generate(task, d, rng)
                        wrong = ex["answer"][::-1] + "x"
                        rows.append({"prompt": ex["messages"][:1], "chosen": ex["answer"], "rejected": wrong,
                                     "margin": 1 - score(ex, wrong), "task": task, "difficulty": d,
                                     "answer": ex["answer"]})
            write_jsonl(folder / f"{split}.jsonl", rows)
        folders.append(str(folder))
    return base, folders, tmp_path


def reward(base, folders, out, *args, check=True, run=run_forked):
    return run("reward.py", *TINY, f"--init_from={base}", f"--preference_dataset={','.join(folders)}",
               f"--out_dir={out}", *args, check=check)


def test_script_end_to_end(reward_setup):
    base, folders, tmp = reward_setup
    out = str(tmp / "out")
    res = reward(base, folders, out, "--max_iters=6", "--eval_interval=3", "--center_coef=0.01", run=run_script)
    assert "rules/train.jsonl: 48 pairs; left out 0 with chosen == rejected" in res.stdout
    rows = read_log(out)
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    assert [r["iter"] for r in steps] == list(range(1, 7)) and {"acc", "gap", "grad_norm", "tok_s"} <= steps[0].keys()
    assert [r["iter"] for r in evals] == [0, 3, 6]
    assert {"rules/acc", "policy/acc", "rules/acc/add/1", "rules/spearman", "rules/ece", "rules/gap"} <= evals[0].keys()
    ckpt = common.load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ckpt["stage"] == "reward" and ckpt["model_args"]["scalar_head"] and "score_head.weight" in ckpt["model"]
    assert math.isfinite(ckpt["reward_mean"]) and ckpt["reward_std"] > 0
    # the RL stages' scorer: normalised by the stored statistics
    tok = bpe.tokenizer_from_meta(ckpt["meta"])
    rm = posttrain.RewardModel(os.path.join(out, "ckpt.pt"), tok, "cpu", policy_meta=ckpt["meta"])
    raw = GPT(GPTConfig(**ckpt["model_args"]))
    raw.load_state_dict(ckpt["model"])
    idx = torch.randint(0, 256, (2, 10))
    mask = torch.arange(10) < torch.tensor([[10], [5]])  # replies ending at 9 and 4
    want = (raw.eval().scores(raw(idx), torch.tensor([9, 4])) - ckpt["reward_mean"]) / ckpt["reward_std"]
    torch.testing.assert_close(rm(idx, mask), want)
    with pytest.raises(ValueError, match="not a reward model"):
        posttrain.RewardModel(base, tok, "cpu")
    # an ensemble: a second member whose head adds 1 to every score and whose stored std is 2
    other = dict(ckpt, model={**ckpt["model"], "score_head.bias": ckpt["model"]["score_head.bias"] + 1.0}, reward_std=2.0)
    common.save_checkpoint(other, os.path.join(out, "other.pt"))
    want_other = (raw.scores(raw(idx), torch.tensor([9, 4])) + 1.0 - ckpt["reward_mean"]) / 2.0
    pair = f"{out}/ckpt.pt,{out}/other.pt"
    mean = posttrain.RewardModel(pair, tok, "cpu")
    torch.testing.assert_close(mean(idx, mask), (want + want_other) / 2)
    torch.testing.assert_close(torch.tensor(mean.spread), ((want - want_other).abs() / 2).mean())
    worst = posttrain.RewardModel(pair, tok, "cpu", ensemble="min")
    torch.testing.assert_close(worst(idx, mask), torch.minimum(want, want_other))
    with pytest.raises(ValueError, match=r"mean \| min"):
        posttrain.RewardModel(pair, tok, "cpu", ensemble="max")
    # measure the checkpoint on one folder, appending to the run's log
    reward(base, folders[:1], out, f"--init_from={out}/ckpt.pt", "--eval_only=True")
    after = read_log(out)
    assert after[: len(rows)] == rows and "acc" in after[-1] and "rules/acc" not in after[-1]


def test_resume_is_bit_identical(reward_setup):
    base, folders, tmp = reward_setup
    # read at every line end, with the chosen replies' LM loss beside the ranking loss
    args = ["--dropout=0.1", "--eval_interval=3", "--lr_decay_iters=6", "--reward_read=lines", "--lm_coef=0.5"]
    straight, split = str(tmp / "straight"), str(tmp / "split")
    reward(base, folders, straight, *args, "--max_iters=6")
    reward(base, folders, split, *args, "--max_iters=3")
    reward(base, folders, split, *args, "--max_iters=6", "--init_from=resume")
    losses_of = lambda d: [(r["iter"], r["loss"]) for r in read_log(d) if "loss" in r]  # noqa: E731
    assert losses_of(straight) == losses_of(split) and len(losses_of(straight)) == 6
    a = torch.load(os.path.join(straight, "ckpt.pt"), weights_only=True)
    b = torch.load(os.path.join(split, "ckpt.pt"), weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_two_processes_agree(reward_setup):
    base, folders, tmp = reward_setup
    res = run_script("torchrun", "--standalone", "--nproc_per_node=2", "reward.py", *TINY, f"--init_from={base}",
                     f"--preference_dataset={folders[0]}", f"--out_dir={tmp / 'ddp'}", "--max_iters=3",
                     "--eval_interval=3", "--gradient_accumulation_steps=2")
    assert "parameters identical on all 2 processes" in res.stdout
    one = run_forked("reward.py", *TINY, f"--init_from={base}", f"--preference_dataset={folders[0]}",
                     f"--out_dir={tmp / 'one'}", "--max_iters=3", "--eval_interval=3", "--batch_size=8")
    assert one.returncode == 0
    a, b = read_log(str(tmp / "one")), read_log(str(tmp / "ddp"))
    for x, y in zip(a, b):  # the same pairs per iteration, cut differently: the same numbers
        for k in ("loss", "val_loss", "acc"):
            if k in x:
                assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), (k, x, y)


def test_bad_settings_and_data_stop_with_a_message(reward_setup):
    base, folders, tmp = reward_setup
    res = reward(base, folders, str(tmp / "x"), "--loss_type=hinge", check=False)
    assert res.returncode != 0 and "loss_type must be bt | margin_ranking | bt_margin" in res.stderr
    with open(os.path.join(folders[0], "train.jsonl"), "a") as f:
        f.write('{"prompt": "q", "chosen": "a"}\n')
    res = reward(base, folders, str(tmp / "x"), check=False)
    assert res.returncode != 0 and "train.jsonl line 49: expected 'chosen' and 'rejected'" in res.stderr
    assert "Traceback" not in res.stderr


def test_a_reward_model_reads_a_reply_at_its_end_or_at_every_line_end_too():
    # a reply "ab\ncd\n" + <|end|> after a prompt: end reads the <|end|> only; lines the two newlines too,
    # and the reward is the mean of the head there, worked out by hand
    tok = bpe.byte_tokenizer(bpe.SPECIAL_TOKENS)
    end = tok.special_id("<|end|>")
    idx = torch.tensor([[7, 7, ord("a"), ord("b"), 10, ord("c"), ord("d"), 10, end, 0]])
    mask = torch.tensor([[False, False] + [True] * 7 + [False]])
    line_ids = posttrain.line_end_ids(tok, "cpu")
    assert line_ids.tolist() == [10]  # only the newline byte holds a newline
    scores = torch.arange(10.0)[None]  # the head's score at position t is t
    where_end = posttrain.read_positions(idx, mask, "end", line_ids)
    where_lines = posttrain.read_positions(idx, mask, "lines", line_ids)
    assert where_end[0].nonzero().flatten().tolist() == [8] and where_lines[0].nonzero().flatten().tolist() == [4, 7, 8]
    assert posttrain.read_reward(scores, where_end).item() == 8.0
    assert posttrain.read_reward(scores, where_lines).item() == pytest.approx((4 + 7 + 8) / 3)
    # a newline in the prompt is not read: only the reply's
    idx[0, 1] = 10
    assert posttrain.read_positions(idx, mask, "lines", line_ids)[0].nonzero().flatten().tolist() == [4, 7, 8]
