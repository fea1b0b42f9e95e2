"""
Generate the verifiable task mix of data/tasks/tasks.py as SFT data: no download, the same files
on every machine for a given seed.

Writes data/tasks/train.jsonl, val.jsonl and test.jsonl (or into --out_dir), one conversation per
line in the messages format, with the reference answer and the task and difficulty of each:

    {"messages": [{"role": "user", "content": "What is 59 + 63?"}, {"role": "assistant", "content": "122"}],
     "answer": "122", "task": "add", "difficulty": 2}

Each (task, difficulty) cell gets train_per_cell (times its task's weight) training problems and
two held-out splits: val (the dev split, val_per_cell problems: what evaluations during training,
err_rl and best.pt use) and test (test_per_cell problems: answered once, at the end of a stage or
by --eval_only, and what the README reports; 400 a cell puts the standard error of a cell's exact
match at most 0.025). The held-out problems are distinct, val and test share none, and no
training problem repeats one of them (for addition not even in the other order: 3 + 5 held out
keeps 5 + 3 out of training too), so they measure answers the model has never been shown. A cell
with few distinct problems holds out at most a fifth of them, split between val and test (1-digit
addition has 55 unordered pairs: 5 to val, 6 to test, and the other 44 are what training draws from).

A mixed dataset (--cot_share=F): the rows of the cot_tasks (add and sub) answer the worked way
with probability F and directly otherwise, the worked ones opening with a marker line ("Work:") so
that the choice is made at the reply's first token; every row of those tasks is marked
"format": "either" (graded on the text after its last "Answer:" when it has one, else the whole
reply) and its "form" says which way this row's reply answers. The problems are the same as
without (the forms come from a generator of their own), so cot_share can be varied alone.

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
    python data/tasks/prepare.py --cot_share=0.15 --out_dir=data/tasks_mix  # 15% worked solutions in add, sub

A healthy run prints
    wrote data/tasks: train 57000 conversations, val 822, test 6410 (6 tasks x 3 difficulties), seed 1337
or, with --cot=True,
    wrote data/tasks_cot: train 57000 conversations, val 1122, test 8810 (6 tasks x 3 difficulties, val also 4; worked solutions), seed 1337
"""

import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configurator import configure  # noqa: E402  (the repo root is on the path now)
from data.tasks.tasks import DIFFICULTIES, STEP_PATTERNS, TASKS, generate, n_problems, problem_key  # noqa: E402

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
val_per_cell = 50  # dev conversations per (task, difficulty): the evaluations during training
test_per_cell = 400  # test conversations per (task, difficulty): answered once at the end, reported
# a mixed dataset: the cot_tasks answer the worked way in a share of their rows, directly in the rest
cot_share = 0.0  # the share of worked solutions in the rows of cot_tasks (0 = none: no mix)
cot_tasks = ("add", "sub")  # the tasks whose rows may answer either way (those with steps: add sub sort count)
cot_marker = "Work:"  # the first line of a worked solution in the mix
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
    if min(train_per_cell, val_per_cell, test_per_cell) < 0:
        raise ValueError("train_per_cell, val_per_cell and test_per_cell must be >= 0")
    mixing = cot_share > 0
    if not 0.0 <= cot_share <= 1.0:
        raise ValueError(f"cot_share must be in [0, 1], got {cot_share}")
    if mixing and cot:
        raise ValueError("cot_share mixes worked solutions into a direct dataset: not with cot=True")
    for t in cot_tasks if mixing else ():
        if t not in tasks or STEP_PATTERNS.get(t) is None:
            raise ValueError(f"cot_tasks: {t!r} must be one of the tasks with steps: "
                             f"{', '.join(x for x in tasks if STEP_PATTERNS.get(x))}")
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
    train, val, test = [], [], []

    def draw(task, d):
        """One problem; in a mix, a task of cot_tasks carries its worked twin too (the same numbers,
        drawn from a copy of the generator's state), for the forms to be chosen at the end."""
        state = rng.getstate()
        ex = generate(task, d, rng, cot)
        if mixing and task in cot_tasks:
            twin = random.Random()
            twin.setstate(state)
            ex["worked"] = generate(task, d, twin, cot=True, marker=cot_marker)["messages"]
        return ex

    def held_out(task, d):
        """The cell's val and test problems, distinct: at most a fifth of the cell's problems in
        all, split evenly when there are fewer than val_per_cell + test_per_cell of them."""
        pool = min(val_per_cell + test_per_cell, n_problems(task, d) // 5)
        n_val = val_per_cell if pool == val_per_cell + test_per_cell else min(val_per_cell, pool // 2)
        seen = set()
        while len(seen) < pool:
            ex = draw(task, d)
            if problem_key(ex) not in seen:
                (val if len(seen) < n_val else test).append(ex)
                seen.add(problem_key(ex))
        return seen

    for task in tasks:
        for d in diffs:
            seen = held_out(task, d)  # held-out problems first
            n = 0
            while n < round(train_per_cell * weights[task]):  # then training problems, none of them held out
                ex = draw(task, d)
                if problem_key(ex) not in seen:
                    train.append(ex)
                    n += 1
    rng.shuffle(train)  # sft.py orders the data itself (shuffled, or a curriculum)
    extra = levels("extra_train_difficulties", extra_train_difficulties)
    if not set(extra) <= set(val_only):
        raise ValueError(f"extra_train_difficulties must be levels of val_difficulties beyond difficulties, got {extra}")
    # last, so that all above, the shuffle too, draws the same with or without these; the extra
    # training problems after every held-out one, so that val and test are the same with or without them
    seen = {(task, d): held_out(task, d) for task in tasks for d in val_only}
    extra_train = []
    for task in tasks:
        for d in extra:
            n = 0
            while n < extra_train_per_cell:
                ex = draw(task, d)
                if problem_key(ex) not in seen[task, d]:
                    extra_train.append(ex)
                    n += 1
    train += extra_train
    if mixing:
        choose_forms((train, val, test))
    os.makedirs(out, exist_ok=True)
    for name, rows in (("train", train), ("val", val), ("test", test)):
        with open(os.path.join(out, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            for ex in rows:
                f.write(json.dumps(ex) + "\n")
    notes = (f", val also {','.join(map(str, val_only))}" if val_only else "") + ("; worked solutions" if cot else "")
    notes += f"; {len(extra_train)} training problems at {','.join(map(str, extra))}" if extra else ""
    if mixing:
        worked = sum(ex.get("form") == "worked" for ex in train)
        notes += f"; {worked} of the {sum('form' in ex for ex in train)} training rows of {','.join(cot_tasks)} worked"
    print(f"wrote {os.path.relpath(out)}: train {len(train)} conversations, val {len(val)}, test {len(test)} "
          f"({len(tasks)} tasks x {len(diffs)} difficulties{notes}), seed {seed}")


def choose_forms(splits):
    """The mix: in each split and each cell of cot_tasks, round(cot_share x its rows) rows, drawn by
    a generator of their own, answer with their worked twin, the others directly. Every such row
    is marked "format": "either" and "form": "worked" | "direct"."""
    rng = random.Random(f"{seed}-forms")
    for rows in splits:
        cells = {}
        for ex in rows:
            if "worked" in ex:
                cells.setdefault((ex["task"], ex["difficulty"]), []).append(ex)
        for key in sorted(cells):
            group = cells[key]
            worked = {id(ex) for ex in rng.sample(group, round(cot_share * len(group)))}
            for ex in group:
                twin = ex.pop("worked")
                ex["format"], ex["form"] = "either", "worked" if id(ex) in worked else "direct"
                if id(ex) in worked:
                    ex["messages"] = twin


if __name__ == "__main__":
    configure(globals())
    try:
        main()
    except ValueError as e:
        sys.exit(f"error: {e}")
