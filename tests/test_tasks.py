"""data/tasks: the generator's references are right, every worked solution replays to its answer,
the checker and the metrics match hand-computed answers, and prepare.py is deterministic and keeps
validation problems out of training."""

import json
import random
import re

import pytest

import bpe
from conftest import run_forked, run_script
from data.tasks.tasks import (DIFFICULTIES, TASKS, add_steps, count_steps, edit_distance, exact_match,
                              extract_answer, final_answer, follows_format, generate, metrics, n_problems,
                              problem_key, reply_form, score, similarity, sort_steps, sub_steps)


def test_references_are_right():
    rng = random.Random(0)
    for task in TASKS:
        for d in DIFFICULTIES:
            for _ in range(20):
                ex = generate(task, d, rng)
                q, a = ex["messages"][0]["content"], ex["answer"]
                assert ex["messages"][1] == {"role": "assistant", "content": a}
                assert (ex["task"], ex["difficulty"]) == (task, d)
                if task in ("add", "sub"):
                    x, op, y = q.removeprefix("What is ").removesuffix("?").split()
                    assert len(x) == len(y) == d or d == 1
                    assert int(a) == (int(x) + int(y) if op == "+" else int(x) - int(y)) and int(a) >= 0
                elif task == "reverse":
                    assert a == q.split()[-1][::-1] and 2 <= len(a) <= 12
                elif task == "sort":
                    assert a == "".join(sorted(q.split()[-1]))
                elif task == "count":
                    letter, s = q.split()[3], q.split()[-1]
                    assert a == str(s.count(letter))
                else:
                    assert a == q.removeprefix("Copy this: ")


def test_generation_is_deterministic():
    a = [generate(t, 3, random.Random(7)) for t in TASKS]
    b = [generate(t, 3, random.Random(7)) for t in TASKS]
    assert a == b
    with pytest.raises(ValueError, match="unknown task"):
        generate("divide", 1, random.Random(0))
    with pytest.raises(ValueError, match="difficulty"):
        generate("add", 9, random.Random(0))


def test_checker_on_hand_made_examples():
    ex = {"answer": "122", "task": "add"}
    assert score(ex, "122") == exact_match(ex, "122") == 1.0
    assert score(ex, "  122\n") == 1.0  # surrounding whitespace does not count
    assert exact_match(ex, "121") == 0.0 and score(ex, "121") == pytest.approx(2 / 3)
    assert score(ex, "1220") == pytest.approx(3 / 4)  # one insertion in four characters
    assert score(ex, "") == 0.0 and score(ex, "xyz") == 0.0
    assert score({"answer": "olleh"}, "hello") == pytest.approx(1 - 4 / 5)
    assert edit_distance("kitten", "sitting") == 3 and edit_distance("", "abc") == 3
    assert similarity("", "") == 1.0
    for resp in ("12", "1222", "221", "0122", "abc"):  # anything inexact scores below an exact answer
        assert 0.0 <= score(ex, resp) < 1.0


def test_metrics_per_task_and_difficulty():
    examples = [{"answer": "5", "task": "add", "difficulty": 1},
                {"answer": "15", "task": "add", "difficulty": 2},
                {"answer": "ab", "task": "reverse", "difficulty": 1},
                {"answer": "ba", "task": "reverse", "difficulty": 1},
                {"answer": "x"}]  # no task: grouped under all/all
    responses = ["5", "16", "ab", "b", "x"]
    m = metrics(examples, responses)
    assert m["em"] == pytest.approx(3 / 5)
    assert m["em/add/1"] == 1.0 and m["em/add/2"] == 0.0 and m["score/add/2"] == pytest.approx(0.5)
    assert m["em/reverse/1"] == 0.5 and m["score/reverse/1"] == pytest.approx((1 + 0.5) / 2)
    assert m["em/all/all"] == 1.0
    assert m["score"] == pytest.approx((1 + 0.5 + 1 + 0.5 + 1) / 5)
    with pytest.raises(ValueError):
        metrics(examples, responses[:2])


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_prepare_is_deterministic_and_holds_out_val(tmp_path):
    args = ["data/tasks/prepare.py", "--train_per_cell=40", "--val_per_cell=10", "--test_per_cell=20",
            "--difficulties=1,2", "--tasks=add,reverse,count", "--task_weights=add=2,count=0.5"]
    run_script(*args, f"--out_dir={tmp_path / 'a'}")  # a fresh interpreter: another hash seed than the fork's
    res = run_forked(*args, f"--out_dir={tmp_path / 'b'}")
    # (80 + 40 + 20) x 2 difficulties; add/1 has 55 problems, a fifth held out: 5 val, 6 test
    assert "train 280 conversations, val 55, test 106" in res.stdout
    for name in ("train.jsonl", "val.jsonl", "test.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    train, val, test = (read(tmp_path / "a" / f"{s}.jsonl") for s in ("train", "val", "test"))
    val_prompts = [ex["messages"][0]["content"] for ex in val + test]
    assert len(set(val_prompts)) == len(val_prompts)  # distinct, and val and test share none
    assert not set(val_prompts) & {ex["messages"][0]["content"] for ex in train}  # held out
    cells = {(t, d) for t in ("add", "reverse", "count") for d in (1, 2)}
    assert {(ex["task"], ex["difficulty"]) for ex in val} == cells == {(ex["task"], ex["difficulty"]) for ex in test}
    assert sum(ex["task"] == "reverse" and ex["difficulty"] == 2 for ex in test) == 20
    assert sum(ex["task"] == "add" for ex in train) == 160 and sum(ex["task"] == "count" for ex in train) == 40
    assert all(score(ex, ex["messages"][-1]["content"]) == 1.0 for ex in train + val)
    res = run_forked("data/tasks/prepare.py", "--tasks=divide", f"--out_dir={tmp_path / 'c'}", check=False)
    assert res.returncode != 0 and "'divide' is not one of" in res.stderr and "Traceback" not in res.stderr
    res = run_forked("data/tasks/prepare.py", "--task_weights=ad=3", f"--out_dir={tmp_path / 'c'}", check=False)
    assert res.returncode != 0 and "got 'ad=3'" in res.stderr


def test_small_cells_hold_out_a_fifth(tmp_path):
    assert n_problems("add", 1) == 55 and n_problems("sub", 1) == 55  # unordered pairs; a >= b
    assert n_problems("add", 2) == 90 * 91 // 2 and n_problems("reverse", 1) == 26**2 + 26**3
    for task, d in (("add", 1), ("sub", 1)):  # small enough to enumerate
        rng, seen = random.Random(0), set()
        for _ in range(100 * n_problems(task, d)):
            seen.add(problem_key(generate(task, d, rng)))
            if len(seen) == n_problems(task, d):
                break
        assert len(seen) == n_problems(task, d), task
    run_forked("data/tasks/prepare.py", "--tasks=add,sub", "--difficulties=1", "--train_per_cell=300",
               f"--out_dir={tmp_path}")
    val, test, train = (read(tmp_path / f"{s}.jsonl") for s in ("val", "test", "train"))
    assert sum(ex["task"] == "add" for ex in val) == 5 and sum(ex["task"] == "sub" for ex in test) == 6
    held_out = {problem_key(ex) for ex in val + test}
    assert len(held_out) == 22
    assert len({problem_key(ex) for ex in train} - held_out) == 44 + 44  # the rest all appear


def test_addition_is_held_out_in_both_orders(tmp_path):
    # 3 + 5 held out must keep 5 + 3 out of training: the model would have seen its answer
    def problem(task, prompt):
        return {"task": task, "messages": [{"role": "user", "content": prompt}]}

    assert problem_key(problem("add", "What is 3 + 5?")) == problem_key(problem("add", "What is 5 + 3?"))
    assert problem_key(problem("sub", "What is 5 - 3?")) != problem_key(problem("sub", "What is 3 - 5?"))
    run_forked("data/tasks/prepare.py", "--tasks=add", "--difficulties=1,2", "--train_per_cell=2000",
               "--val_per_cell=50", f"--out_dir={tmp_path}")
    val, train = read(tmp_path / "val.jsonl"), read(tmp_path / "train.jsonl")
    swapped = set()
    for ex in train:
        a, b = ex["messages"][0]["content"].removeprefix("What is ").removesuffix("?").split(" + ")
        swapped.add(f"What is {b} + {a}?")
    assert not swapped & {ex["messages"][0]["content"] for ex in val}


# -----------------------------------------------------------------------------
# worked solutions (prepare.py --cot=True)


def replay(ex):
    """Check a worked solution line by line against its prompt, as a marker would: each step is
    parsed and recomputed from the prompt and the step before it, and the Answer line must be
    where the steps lead. Independent of add_steps & co: it reads their text, not their code.
    -> the answer the steps reach."""
    q = ex["messages"][0]["content"]
    *steps, last = ex["messages"][1]["content"].split("\n")
    task = ex["task"]
    if task in ("add", "sub"):
        a, op, b = q.removeprefix("What is ").removesuffix("?").split()
        n = max(len(a), len(b))
        xs, ys = a.zfill(n), b.zfill(n)
        assert len(steps) == n  # one line per column
        carry, written = 0, ""  # carry: the carry or borrow coming into the column
        for k, line in enumerate(steps):
            col = n - 1 - k  # from the right
            x, y = int(xs[col]), int(ys[col])
            if op == "+":
                top, y_, c, total, digits = re.fullmatch(r"(\d)\+(\d)\+(\d)=(\d+) (\d+)", line).groups()
                assert (int(top), int(y_), int(c)) == (x, y, carry)
                assert int(total) == x + y + carry
                new, carry = (total if col == 0 else str(int(total) % 10)), int(total) // 10
            else:
                top, y_, c, digit, digits = re.fullmatch(r"(\d+)-(\d)-(\d)=(\d) (\d+)", line).groups()
                top = int(top)
                assert (top % 10, int(y_), int(c)) == (x, y, carry)
                assert top // 10 == int(x < y + carry)  # borrows 10 exactly when the column needs it
                assert int(digit) == top - y - carry
                new, carry = digit, top // 10
            assert digits == new + written  # the new digit in front of those written so far
            written = digits
        assert carry == 0 or op == "+"  # a >= b: nothing left to borrow from
        reached = str(int(written))  # drops sub's leading zeros
        assert reached == str(int(a) + int(b) if op == "+" else int(a) - int(b))
    elif task == "sort":
        s = q.split()[-1]
        runs, prev = [], ""
        for line in steps:
            ch, n, run = re.fullmatch(r"(.):(\d+)=(.+)", line).groups()
            assert ch > prev and n == str(s.count(ch)) != "0" and run == ch * int(n)
            runs.append(run)
            prev = ch
        assert sum(map(len, runs)) == len(s)  # every character placed
        reached = "".join(runs)
    elif task == "count":
        letter, s = q.split()[3], q.split()[-1]
        assert len(steps) == len(s)
        tally = 0
        for ch, line in zip(s, steps):
            tally += ch == letter
            assert line == f"{ch}{tally}"
        reached = str(tally)
    else:  # reverse, copy: no steps
        assert steps == []
        reached = q.split()[-1][::-1] if task == "reverse" else q.removeprefix("Copy this: ")
    assert last == f"Answer: {reached}"
    return reached


def test_every_worked_solution_replays_to_its_answer_and_fits_block_size():
    tok = bpe.byte_tokenizer(bpe.SPECIAL_TOKENS)
    rng = random.Random(0)
    longest = {}
    for task in TASKS:
        for d in DIFFICULTIES:
            for _ in range(2000 if task in ("add", "sub", "sort", "count") else 200):
                ex = generate(task, d, rng, cot=True)
                assert replay(ex) == ex["answer"], ex
                assert follows_format(ex, ex["messages"][1]["content"]) and exact_match(ex, ex["messages"][1]["content"])
                n = len(tok.render_conversation(ex["messages"])[0])
                longest[task, d] = max(longest.get((task, d), 0), n)
    # block_size 128 takes conversations of up to 129 tokens (inputs ids[:-1], targets ids[1:])
    assert max(longest.values()) <= 129, longest
    # the worst cases, built by hand: 12 different letters to sort, 20 of 20 letters counted
    worst = "Sort the letters of abcdefghijkl"
    steps = "\n".join(sort_steps("abcdefghijkl") + ["Answer: abcdefghijkl"])
    assert len(tok.render_conversation([{"role": "user", "content": worst}, {"role": "assistant", "content": steps}])[0]) == 129
    steps = "\n".join(count_steps("a" * 20, "a") + ["Answer: 20"])
    worst = "Count the letter a in " + "a" * 20
    assert len(tok.render_conversation([{"role": "user", "content": worst}, {"role": "assistant", "content": steps}])[0]) == 128


def test_steps_by_hand():
    assert add_steps(59, 63) == ["9+3+0=12 2", "5+6+1=12 122"]
    assert add_steps(4829, 3395) == ["9+5+0=14 4", "2+9+1=12 24", "8+3+1=12 224", "4+3+1=8 8224"]
    assert add_steps(7, 0) == ["7+0+0=7 7"] and add_steps(95, 7) == ["5+7+0=12 2", "9+0+1=10 102"]
    assert sub_steps(4829, 3395) == ["9-5-0=4 4", "12-9-0=3 34", "8-3-1=4 434", "4-3-0=1 1434"]
    assert sub_steps(503, 498) == ["13-8-0=5 5", "10-9-1=0 05", "5-4-1=0 005"]
    assert sub_steps(5, 5) == ["5-5-0=0 0"]
    with pytest.raises(ValueError):
        sub_steps(3, 5)
    assert sort_steps("banana") == ["a:3=aaa", "b:1=b", "n:2=nn"] and sort_steps("3103") == ["0:1=0", "1:1=1", "3:2=33"]
    assert count_steps("abcab", "a") == ["a1", "b1", "c1", "a2", "b2"] and count_steps("bb", "a") == ["b0", "b0"]
    ex = generate("sub", 3, random.Random(3), cot=True)
    a, b = (int(n) for n in re.findall(r"\d+", ex["messages"][0]["content"]))
    assert ex["messages"][1]["content"] == "\n".join(sub_steps(a, b) + [f"Answer: {a - b}"])


def test_direct_and_worked_solution_are_the_same_problem():
    for task in TASKS:
        for d in DIFFICULTIES:
            direct, cot = generate(task, d, random.Random(d), cot=False), generate(task, d, random.Random(d), cot=True)
            assert cot["messages"][0] == direct["messages"][0] and cot["answer"] == direct["answer"]
            assert cot["format"] == "cot" and "format" not in direct
            assert {k: v for k, v in cot.items() if k not in ("messages", "format")} == \
                {k: v for k, v in direct.items() if k != "messages"}
            assert cot["messages"][1]["content"].endswith("Answer: " + direct["answer"])


def test_answer_extraction_by_hand():
    ex = {"answer": "122", "task": "add", "difficulty": 2, "format": "cot"}
    good = "9+3+0=12 2\n5+6+1=12 122\nAnswer: 122"
    assert exact_match(ex, good) == score(ex, good) == 1.0
    assert extract_answer(good) == "122" and extract_answer("122") is None
    # no Answer line: nothing answered, even when the right number is there
    assert exact_match(ex, "122") == score(ex, "122") == 0.0
    assert score(ex, "9+3+0=12 2\n5+6+1=12 122") == 0.0
    assert score(ex, "Answer:") == 0.0 and extract_answer("Answer:\n122") == ""  # an empty answer
    # several Answer lines: the last counts, so hedging does not pay
    assert exact_match(ex, "Answer: 122\nAnswer: 121") == 0.0 and exact_match(ex, "Answer: 121\nAnswer: 122") == 1.0
    # text after the answer: later lines do not change it, more on the same line is part of it
    assert exact_match(ex, "Answer: 122\nI hope this helps") == 1.0
    assert exact_match(ex, "Answer: 122 apples") == 0.0 and score(ex, "Answer: 122 apples") == pytest.approx(3 / 10)
    assert exact_match(ex, "Answer:  122  \n") == 1.0 and exact_match(ex, "so Answer: 122") == 1.0
    assert score(ex, "Answer: 121") == pytest.approx(2 / 3)  # partial credit on the extracted answer
    assert exact_match(ex, "answer: 122") == 0.0  # the marker is case-sensitive, as the traces write it
    # a direct example is graded on the whole response, exactly as before
    direct = {"answer": "122", "task": "add", "difficulty": 2}
    assert exact_match(direct, "122") == 1.0 and exact_match(direct, "Answer: 122") == 0.0
    assert score(direct, "Answer: 122") == pytest.approx(3 / 11)


def test_format_check_on_good_and_broken_traces():
    rng = random.Random(1)
    for task in TASKS:
        ex = generate(task, 3, rng, cot=True)
        good = ex["messages"][1]["content"]
        *steps, last = good.split("\n")
        assert follows_format(ex, good) and follows_format(ex, "\n" + good + "\n ")
        assert follows_format(ex, "\n".join(steps + ["Answer: zzz"]))  # shape, not correctness
        assert not follows_format(ex, "\n".join(steps))  # no Answer line
        assert not follows_format(ex, good + "\nthanks")  # text after the answer
        assert not follows_format(ex, good + "\n" + last)  # two Answer lines
        assert not follows_format(ex, "\n".join(steps + ["Answer:"]))  # empty answer
        assert not follows_format(ex, "\n".join(steps + ["Answer:" + ex["answer"]]))  # Answer: then one space
        if steps:
            assert not follows_format(ex, last)  # skipped the steps
            assert not follows_format(ex, "\n".join(steps[:1] + ["junk"] + steps[1:] + [last]))
            assert not follows_format(ex, " ".join(steps) + "\n" + last)  # two steps on one line
        else:
            assert not follows_format(ex, "a1\n" + last)  # reverse and copy have no steps
    broken = {"add": "9+3=12 2", "sub": "2-9-0=-7 7", "sort": "a:3=aab", "count": "f1"}
    for task, line in broken.items():
        assert not follows_format({"task": task, "format": "cot"}, f"{line}\nAnswer: 1"), task
    assert follows_format({"task": "sub", "format": "cot"}, "12-9-0=3 3\nAnswer: 3")
    assert follows_format({"format": "cot"}, "anything\nAnswer: 1")  # no task: only the Answer line is checked
    assert follows_format({"answer": "5"}, " 5\n") and not follows_format({"answer": "5"}, "5\n6")  # direct: one line
    assert not follows_format({"answer": "5"}, "  ")


def test_metrics_with_worked_solutions():
    cot = {"answer": "5", "task": "count", "difficulty": 1, "format": "cot"}
    examples = [cot, cot, cot, {"answer": "5", "task": "add", "difficulty": 1}]
    responses = ["a1\nAnswer: 5", "a1 Answer: 5", "a1", "5"]  # right; right but malformed; no answer; direct
    m = metrics(examples, responses)
    assert m["em/count/1"] == pytest.approx(2 / 3) and m["fmt/count/1"] == pytest.approx(1 / 3)
    assert m["em/add/1"] == 1.0 and m["fmt/add/1"] == 1.0 and m["fmt"] == pytest.approx(2 / 4)
    assert not any(k.startswith("fmt") for k in metrics(examples[3:], responses[3:]))  # direct only: as before


def test_prepare_cot_is_deterministic_holds_out_val_and_matches_direct(tmp_path):
    args = ["data/tasks/prepare.py", "--train_per_cell=30", "--val_per_cell=10", "--test_per_cell=20",
            "--difficulties=1,2", "--tasks=add,sort,count,copy", "--task_weights=add=2"]
    run_script(*args, "--cot=True", f"--out_dir={tmp_path / 'a'}")
    res = run_forked(*args, "--cot=True", f"--out_dir={tmp_path / 'b'}")
    assert "train 300 conversations, val 115, test 226 (4 tasks x 2 difficulties, val also 4; worked solutions)" in res.stdout
    for name in ("train.jsonl", "val.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    train, val = read(tmp_path / "a" / "train.jsonl"), read(tmp_path / "a" / "val.jsonl")
    assert {ex["difficulty"] for ex in train} == {1, 2} and {ex["difficulty"] for ex in val} == {1, 2, 4}
    assert len({problem_key(ex) for ex in val}) == len(val)  # distinct
    assert not {problem_key(ex) for ex in val} & {problem_key(ex) for ex in train}  # held out
    for ex in train + val:
        assert ex["format"] == "cot" and replay(ex) == ex["answer"]
        assert score(ex, ex["messages"][-1]["content"]) == 1.0 and follows_format(ex, ex["messages"][-1]["content"])
    # direct files of the same seed, validated to level 4 too, hold the same problems with the same
    # answers in the same order: direct and worked-solution models are measured on the same questions
    run_forked(*args, "--val_difficulties=1,2,4", f"--out_dir={tmp_path / 'd'}")
    d_train, d_val = read(tmp_path / "d" / "train.jsonl"), read(tmp_path / "d" / "val.jsonl")
    same = [(ex["messages"][0], ex["answer"], ex["task"], ex["difficulty"]) for ex in d_train + d_val]
    assert same == [(ex["messages"][0], ex["answer"], ex["task"], ex["difficulty"]) for ex in train + val]
    assert all("format" not in ex and ex["messages"][1]["content"] == ex["answer"] for ex in d_train + d_val)
    res = run_forked(*args, "--val_difficulties=1", f"--out_dir={tmp_path / 'c'}", check=False)
    assert res.returncode != 0 and "must hold every level of difficulties" in res.stderr


def test_sft_tasks_cot_config_runs_on_a_tiny_model(tmp_path):
    # config/sft_tasks_cot.py, with only its scale overridden, on a random base of block_size 128
    from conftest import save_byte_checkpoint
    from model import GPTConfig

    base = str(tmp_path / "base.pt")
    save_byte_checkpoint(base, GPTConfig(vocab_size=320, block_size=128, n_layer=1, n_head=2, n_embd=32))
    rng = random.Random(0)
    data = tmp_path / "tasks_cot"
    data.mkdir()
    for name, levels in (("train", (1, 2, 3)), ("val", (1, 4))):
        with open(data / f"{name}.jsonl", "w") as f:
            for task in ("add", "sort", "count"):
                for d in levels:
                    f.write(json.dumps(generate(task, d, rng, cot=True)) + "\n")
    out = tmp_path / "out"
    res = run_forked("sft.py", "config/sft_tasks_cot.py", f"--init_from={base}", f"--sft_dataset={data}",
                     f"--out_dir={out}", "--max_iters=2", "--lr_decay_iters=2", "--warmup_iters=1", "--eval_interval=2",
                     "--eval_iters=1", "--eval_prompts=6", "--batch_size=4", "--log_interval=1")
    assert "eval_max_new_tokens=96" in res.stdout and "dropped 0 longer than block_size" in res.stdout
    answers = [r for r in read(out / "log.jsonl") if "em" in r]
    assert [r["iter"] for r in answers] == [0, 2] and {"em/add/1", "em/sort/4", "em/count/4"} <= answers[-1].keys()
    assert 0.0 <= answers[-1]["fmt"] <= 1.0  # graded as worked solutions: the format field reached the checker


def test_extra_training_levels_leave_the_rest_of_the_files_as_they_were(tmp_path):
    # RL prompts at a level SFT never trains on (GRPO on difficulty 4): drawn after everything else,
    # so SFT's data and the held-out set are the same files with or without them
    args = ["data/tasks/prepare.py", "--cot=True", "--train_per_cell=20", "--val_per_cell=5", "--test_per_cell=5",
            "--tasks=add,sort"]
    run_forked(*args, f"--out_dir={tmp_path / 'a'}")
    res = run_forked(*args, "--extra_train_difficulties=4", "--extra_train_per_cell=7", f"--out_dir={tmp_path / 'b'}")
    assert "14 training problems at 4" in res.stdout
    a_train, b_train = read(tmp_path / "a" / "train.jsonl"), read(tmp_path / "b" / "train.jsonl")
    assert b_train[: len(a_train)] == a_train and (tmp_path / "a" / "val.jsonl").read_bytes() == (
        tmp_path / "b" / "val.jsonl").read_bytes()
    extra = b_train[len(a_train):]
    assert len(extra) == 14 and {ex["difficulty"] for ex in extra} == {4}
    held_out = {problem_key(ex) for ex in read(tmp_path / "b" / "val.jsonl")}
    assert not {problem_key(ex) for ex in extra} & held_out
    res = run_forked(*args, "--extra_train_difficulties=2", f"--out_dir={tmp_path / 'c'}", check=False)
    assert res.returncode != 0 and "extra_train_difficulties must be levels of val_difficulties" in res.stderr


def test_the_form_of_a_reply_and_the_grading_of_either_form():
    worked = "Work:\n8+6+0=14 4\n2+3+1=6 64\nAnswer: 64"
    assert reply_form(worked) == "worked" and reply_form("64") == "direct"
    assert reply_form("Work:\n8+6+0=14 4") == "direct"  # cut off before its Answer line: it answered nothing
    ex = {"task": "add", "format": "either", "answer": "64"}
    assert final_answer(ex, worked) == "64" and final_answer(ex, " 64 ") == " 64 "
    assert exact_match(ex, worked) == exact_match(ex, "64") == 1.0 and exact_match(ex, "Work:\nAnswer: 63") == 0.0
    assert score(ex, "Work:\n8+6+0=14 4") == pytest.approx(score({"answer": "64"}, "Work:\n8+6+0=14 4"))  # as direct
    assert follows_format(ex, worked) and follows_format(ex, "64")
    assert not follows_format(ex, worked[len("Work:\n"):])  # a worked reply opens with its marker
    assert not follows_format(ex, "Work:\n8+6+0=14 4\nAnswer: 64\nmore")
    # the cot format keeps its rule: no Answer line, no answer
    assert exact_match({"format": "cot", "answer": "64"}, "64") == 0.0
    m = metrics([ex, ex, dict(ex, task="sub"), {"task": "sort", "difficulty": 1, "answer": "ab"}],
                [worked, "65", "64", "ab"])
    assert m["work"] == pytest.approx(1 / 3) and m["work/add/all"] == 0.5 and m["n/add/all"] == 2
    assert "work/sort/1" not in m  # a cell answered one way only
    assert m["em/add/all"] == 0.5 and "work" not in metrics([{"answer": "64"}], ["64"])  # no mix: no work keys


def test_the_mixed_dataset_keeps_the_problems_and_mixes_the_forms(tmp_path):
    args = ["data/tasks/prepare.py", "--train_per_cell=100", "--val_per_cell=10", "--test_per_cell=20",
            "--difficulties=2,3", "--tasks=add,sub,sort", "--task_weights="]
    run_forked(*args, f"--out_dir={tmp_path / 'plain'}")
    res = run_forked(*args, "--cot_share=0.15", f"--out_dir={tmp_path / 'mix'}")
    assert "60 of the 400 training rows of add,sub worked" in res.stdout
    for split in ("train", "val", "test"):
        plain, mix = read(tmp_path / "plain" / f"{split}.jsonl"), read(tmp_path / "mix" / f"{split}.jsonl")
        # the same problems in the same order, whatever the share: cot_share can be varied alone
        assert [(a["messages"][0], a["answer"]) for a in plain] == [(b["messages"][0], b["answer"]) for b in mix]
        for ex in mix:
            reply = ex["messages"][1]["content"]
            if ex["task"] == "sort":
                assert "format" not in ex and reply == ex["answer"]
                continue
            assert ex["format"] == "either" and reply_form(reply) == ex["form"]
            assert score(ex, reply) == 1.0 and follows_format(ex, reply)  # both forms graded right
            assert ex["form"] == "direct" or reply.startswith("Work:\n")
        for cell in ("add/2", "add/3", "sub/2", "sub/3"):  # the share, exactly, in every cell and split
            rows = [ex for ex in mix if f"{ex['task']}/{ex['difficulty']}" == cell]
            assert sum(ex["form"] == "worked" for ex in rows) == round(0.15 * len(rows))
    train, held = read(tmp_path / "mix" / "train.jsonl"), read(tmp_path / "mix" / "val.jsonl") + read(
        tmp_path / "mix" / "test.jsonl")
    assert not {problem_key(ex) for ex in train} & {problem_key(ex) for ex in held}  # held out
    res = run_forked(*args, "--cot_share=0.1", "--cot_tasks=add,reverse", f"--out_dir={tmp_path / 'bad'}", check=False)
    assert res.returncode != 0 and "cot_tasks: 'reverse' must be one of the tasks with steps" in res.stderr
