"""data/tasks: the generator's references are right, the checker and the metrics match hand-computed
answers, and prepare.py is deterministic and keeps validation problems out of training."""

import json
import random

import pytest

from conftest import run_script
from data.tasks.tasks import (DIFFICULTIES, TASKS, edit_distance, exact_match, generate, metrics, n_problems,
                              problem_key, score, similarity)


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
    args = ["data/tasks/prepare.py", "--train_per_cell=40", "--val_per_cell=10", "--difficulties=1,2",
            "--tasks=add,reverse,count", "--task_weights=add=2,count=0.5"]
    run_script(*args, f"--out_dir={tmp_path / 'a'}")
    res = run_script(*args, f"--out_dir={tmp_path / 'b'}")
    assert "train 280 conversations, val 60" in res.stdout  # (80 + 40 + 20) x 2 difficulties
    for name in ("train.jsonl", "val.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    train, val = read(tmp_path / "a" / "train.jsonl"), read(tmp_path / "a" / "val.jsonl")
    val_prompts = [ex["messages"][0]["content"] for ex in val]
    assert len(set(val_prompts)) == len(val_prompts)  # distinct
    assert not set(val_prompts) & {ex["messages"][0]["content"] for ex in train}  # held out
    assert {(ex["task"], ex["difficulty"]) for ex in val} == {(t, d) for t in ("add", "reverse", "count") for d in (1, 2)}
    assert sum(ex["task"] == "add" for ex in train) == 160 and sum(ex["task"] == "count" for ex in train) == 40
    assert all(score(ex, ex["messages"][-1]["content"]) == 1.0 for ex in train + val)
    res = run_script("data/tasks/prepare.py", "--tasks=divide", f"--out_dir={tmp_path / 'c'}", check=False)
    assert res.returncode != 0 and "'divide' is not one of" in res.stderr and "Traceback" not in res.stderr
    res = run_script("data/tasks/prepare.py", "--task_weights=ad=3", f"--out_dir={tmp_path / 'c'}", check=False)
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
    run_script("data/tasks/prepare.py", "--tasks=add,sub", "--difficulties=1", "--train_per_cell=300",
               f"--out_dir={tmp_path}")
    val, train = read(tmp_path / "val.jsonl"), read(tmp_path / "train.jsonl")
    assert sum(ex["task"] == "add" for ex in val) == 11 and sum(ex["task"] == "sub" for ex in val) == 11
    held_out = {problem_key(ex) for ex in val}
    assert len({problem_key(ex) for ex in train} - held_out) == 44 + 44  # the rest all appear


def test_addition_is_held_out_in_both_orders(tmp_path):
    # 3 + 5 held out must keep 5 + 3 out of training: the model would have seen its answer
    def problem(task, prompt):
        return {"task": task, "messages": [{"role": "user", "content": prompt}]}

    assert problem_key(problem("add", "What is 3 + 5?")) == problem_key(problem("add", "What is 5 + 3?"))
    assert problem_key(problem("sub", "What is 5 - 3?")) != problem_key(problem("sub", "What is 3 - 5?"))
    run_script("data/tasks/prepare.py", "--tasks=add", "--difficulties=1,2", "--train_per_cell=2000",
               "--val_per_cell=50", f"--out_dir={tmp_path}")
    val, train = read(tmp_path / "val.jsonl"), read(tmp_path / "train.jsonl")
    swapped = set()
    for ex in train:
        a, b = ex["messages"][0]["content"].removeprefix("What is ").removesuffix("?").split(" + ")
        swapped.add(f"What is {b} + {a}?")
    assert not swapped & {ex["messages"][0]["content"] for ex in val}
