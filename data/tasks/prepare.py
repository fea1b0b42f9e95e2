"""
Generate the verifiable task mix of data/tasks/tasks.py as SFT data: no download, the same files
on every machine for a given seed.

Writes data/tasks/train.jsonl and data/tasks/val.jsonl (or into --out_dir), one conversation per
line in the messages format, with the reference answer and the task and difficulty of each:

    {"messages": [{"role": "user", "content": "What is 59 + 63?"}, {"role": "assistant", "content": "122"}],
     "answer": "122", "task": "add", "difficulty": 2}

Each (task, difficulty) cell gets train_per_cell (times its task's weight) training and
val_per_cell validation problems. The validation problems are distinct, and no training problem
repeats one of them (for addition not even in the other order: 3 + 5 held out keeps 5 + 3 out of
training too), so validation measures answers the model has never been shown. A cell with few
distinct problems gives at most a fifth of them to validation (1-digit addition has 55 unordered
pairs, so 11 are held out and the other 44 are what training draws from).

With --cot=True the assistant's messages are worked solutions (the steps, then "Answer: 122"; see
data/tasks/tasks.py), written to data/tasks_cot, and validation also has difficulty 4, which
training never sees: how far the steps generalise to longer inputs is what worked solutions are
for. Levels that only validation has are drawn after all the others, so for one seed the
shared cells hold the same problems, train and val, in both formats and with or without them:
direct and worked-solution models are measured on the same held-out problems.

    python data/tasks/prepare.py
    python data/tasks/prepare.py --cot=True
    python data/tasks/prepare.py --val_difficulties=1,2,3,4 --out_dir=data/tasks_d4  # direct, val to 4
    python data/tasks/prepare.py --difficulties=1,2,3,4 --task_weights=
    python data/tasks/prepare.py --tasks=add,reverse --task_weights=add=2 --train_per_cell=5000

A healthy run prints
    wrote data/tasks: train 57000 conversations, val 822 (6 tasks x 3 difficulties), seed 1337
or, with --cot=True,
    wrote data/tasks_cot: train 57000 conversations, val 1122 (6 tasks x 3 difficulties, val also 4; worked solutions), seed 1337
"""

import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from common import configure  # noqa: E402  (the repo root is on the path now)
from data.tasks.tasks import DIFFICULTIES, TASKS, generate, n_problems, problem_key  # noqa: E402

# -----------------------------------------------------------------------------
out_dir = ""  # empty: data/tasks next to this script, or data/tasks_cot with cot
cot = False  # worked solutions: steps, then "Answer: <answer>"
tasks = TASKS  # which tasks, a subset of add sub reverse sort count copy
difficulties = (1, 2, 3)  # the levels of train and val, a subset of 1 2 3 4
val_difficulties = ()  # the levels of val, all of difficulties and more; () = difficulties (with cot also 4)
train_per_cell = 2000  # training conversations per (task, difficulty), times the task's weight
# Multi-digit arithmetic takes a small model far more examples than reversing or copying, so the
# default mix leans on it: 4x addition, 2x subtraction, half as much copying (learned fastest)
task_weights = ("add=4", "sub=2", "copy=0.5")  # task=weight; a task not named has weight 1
val_per_cell = 50  # held-out conversations per (task, difficulty)
# training problems at levels SFT does not train on, for RL prompts (GRPO on difficulty 4): drawn last,
# after everything above, so the rest of both files is the same with or without them
extra_train_difficulties = ()  # levels of val_difficulties that get training problems too
extra_train_per_cell = 1000  # training problems per (task, extra level)
seed = 1337
# -----------------------------------------------------------------------------


def levels(name, values):
    """The difficulty levels a setting names, checked: ("1", 2) -> (1, 2)."""
    out = tuple(int(d) if str(d).isdigit() else d for d in values)
    for d in out:
        if d not in DIFFICULTIES:
            raise ValueError(f"{name}: {d!r} is not one of {DIFFICULTIES}")
    return out


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    out = out_dir or (os.path.join(os.path.dirname(here), "tasks_cot") if cot else here)
    diffs = levels("difficulties", difficulties)
    val_diffs = levels("val_difficulties", val_difficulties)
    if not val_diffs:  # the default: validate what trains, and worked solutions on level 4 too
        val_diffs = tuple(sorted({*diffs, 4})) if cot else diffs
    if not set(diffs) <= set(val_diffs):
        raise ValueError(f"val_difficulties must hold every level of difficulties {diffs}, got {val_diffs}")
    val_only = tuple(d for d in val_diffs if d not in diffs)
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"tasks: {t!r} is not one of {', '.join(TASKS)}")
    if train_per_cell < 0 or val_per_cell < 0:
        raise ValueError("train_per_cell and val_per_cell must be >= 0")
    weights = dict.fromkeys(tasks, 1.0)
    for item in task_weights:
        name, _, w = item.partition("=")
        try:
            weights[name] = float(w)
        except ValueError:
            weights[name] = -1.0
        if name not in TASKS or weights[name] < 0:
            raise ValueError(f"task_weights: expected task=weight with a task of {', '.join(TASKS)} and a "
                             f"weight >= 0, got {item!r}")
    rng = random.Random(seed)
    train, val = [], []

    def held_out(task, d):
        seen = set()
        while len(seen) < min(val_per_cell, n_problems(task, d) // 5):  # distinct problems
            ex = generate(task, d, rng, cot)
            if problem_key(ex) not in seen:
                seen.add(problem_key(ex))
                val.append(ex)
        return seen

    for task in tasks:
        for d in diffs:
            seen = held_out(task, d)  # held-out problems first
            n = 0
            while n < round(train_per_cell * weights[task]):  # then training problems, none of them held out
                ex = generate(task, d, rng, cot)
                if problem_key(ex) not in seen:
                    train.append(ex)
                    n += 1
    rng.shuffle(train)  # sft.py orders the data itself (shuffled, or a curriculum)
    extra = levels("extra_train_difficulties", extra_train_difficulties)
    if not set(extra) <= set(val_only):
        raise ValueError(f"extra_train_difficulties must be levels of val_difficulties beyond difficulties, got {extra}")
    # last, so that all above, the shuffle too, draws the same with or without these; the extra
    # training problems after every held-out one, so that val is the same with or without them
    seen = {(task, d): held_out(task, d) for task in tasks for d in val_only}
    extra_train = []
    for task in tasks:
        for d in extra:
            n = 0
            while n < extra_train_per_cell:
                ex = generate(task, d, rng, cot)
                if problem_key(ex) not in seen[task, d]:
                    extra_train.append(ex)
                    n += 1
    train += extra_train
    os.makedirs(out, exist_ok=True)
    for name, rows in (("train", train), ("val", val)):
        with open(os.path.join(out, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            for ex in rows:
                f.write(json.dumps(ex) + "\n")
    notes = (f", val also {','.join(map(str, val_only))}" if val_only else "") + ("; worked solutions" if cot else "")
    notes += f"; {len(extra_train)} training problems at {','.join(map(str, extra))}" if extra else ""
    print(f"wrote {os.path.relpath(out)}: train {len(train)} conversations, val {len(val)} "
          f"({len(tasks)} tasks x {len(diffs)} difficulties{notes}), seed {seed}")


if __name__ == "__main__":
    configure(globals())
    try:
        main()
    except ValueError as e:
        sys.exit(f"error: {e}")
