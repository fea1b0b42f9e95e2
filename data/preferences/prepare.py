"""
Preference pairs for the task family of data/tasks: for each prompt a better and a worse reply, in
the format reward.py and dpo.py read (TRL's, so other people's files work too), one pair per line:

    {"prompt": [{"role": "user", "content": "What is 59 + 63?"}], "chosen": "122", "rejected": "112",
     "margin": 0.3333, "task": "add", "difficulty": 2, "answer": "122"}

margin is the checker's score of chosen minus that of rejected (data/tasks/tasks.py score: partial
credit, whatever orders the pair), answer the reference, and format, where the dataset has one
("either" on a mixed dataset), how the checker grades a reply: a worked one by its Answer line.
The prompts are data/tasks's own (generated first when missing): train pairs from
its train.jsonl, val pairs from its val.jsonl, so the split by prompt is the task split, and the
held-out problems of SFT stay held out here.

Two sources:
    rules    chosen is the reference answer, rejected a plausible wrong one: off by one or ten, a
             changed, dropped, doubled or swapped digit or letter, the word unreversed, a near-miss
             sort, a truncated copy. Deterministic; no model needed.
    policy   on-policy pairs: k answers per prompt sampled from an SFT model (temperature 1, all
             of a prompt's samples sharing one prefill), scored by the checker, the stand-in for
             a human labeller; the best is paired with the worst, or with pairs_per_prompt = n up
             to n distinct pairs of a better and a worse answer (more pairs from the same samples,
             as a labeller ranking k answers gives). A prompt whose k answers all grade the same
             gives no pair. These are the mistakes the policy really makes. label=exact orders
             them by the checker's verdict alone (right or wrong, the exact reward of the RL
             stages), so every pair is a right answer over a wrong one; the default, score, also
             pairs two wrong answers by partial credit (the nearer miss wins). On a mixed dataset
             (data/tasks/prepare.py --cot_share), forms=worked_over_direct keeps only the pairs
             whose chosen reply is a worked solution and whose rejected reply answers directly:
             the preference between the two ways of answering, without the pairs of two direct
             answers, which teach nothing a small model can generalise (see README, DPO).

    python data/preferences/prepare.py --source=rules
    python data/preferences/prepare.py --source=policy --init_from=out-sft/ckpt.pt
    python data/preferences/prepare.py --source=policy --init_from=out-sft/ckpt.pt \\
        --cells=add/3,sub/2,sub/3,sort/2,sort/3 --out_dir=data/preferences/policy_rl
    python data/preferences/prepare.py --source=policy --label=exact --init_from=out-sft-mix/ckpt.pt \\
        --tasks_dir=tasks_mix --cells=add/2,add/3,sub/2,sub/3 --max_new_tokens=64 --pairs_per_prompt=4 \\
        --train_prompts_per_cell=2000 --out_dir=data/preferences/policy_mix

Writes out_dir/train.jsonl and out_dir/val.jsonl (default data/preferences/<source>). A healthy run
prints, per split, how many prompts it read and how many gave a usable pair:
    train: 3600 prompts, 2917 usable pairs (0.81 a prompt) ...
"""

import json
import os
import random
import string
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import bpe  # noqa: E402  (the repo root is on the path now)
import common  # noqa: E402
import posttrain  # noqa: E402
from configurator import configure  # noqa: E402
from conversations import read_conversations  # noqa: E402
from data.tasks.tasks import exact_match, reply_form, score  # noqa: E402

# -----------------------------------------------------------------------------
source = "rules"  # rules | policy
out_dir = ""  # empty: data/preferences/<source>
tasks_dir = "tasks"  # the prompts: a folder under data/ (or an absolute path) with train.jsonl, val.jsonl
cells = ()  # task/difficulty cells to keep, e.g. add/3,sub/2 (empty: all)
train_prompts_per_cell = 500  # training prompts per cell (val: every held-out prompt of the cell)
seed = 1337
# policy
init_from = "out-sft/ckpt.pt"  # the SFT checkpoint that answers
samples_per_prompt = 8  # k answers per prompt
pairs_per_prompt = 1  # 1: the best answer against the worst; n > 1: up to n pairs of a better and a worse answer
label = "score"  # score: the checker's partial credit orders the answers | exact: right over wrong only
forms = "any"  # any | worked_over_direct: keep only pairs whose chosen reply shows its work and whose rejected does not
temperature = 1.0
max_new_tokens = 32
batch_size = 256  # sampled rows per generate call
device = "auto"
dtype = "auto"
# -----------------------------------------------------------------------------


def perturb(ex, rng):
    """A plausible wrong reply to a task example: a near miss of the reference answer."""
    answer, task = ex["answer"], ex["task"]
    if task in ("add", "sub", "count"):
        n = int(answer)
        digits = list(answer)
        options = [str(n + 1), str(max(n - 1, 0)), str(n + 10), str(max(n - 10, 0))]
        if task == "count":
            options = [str(n + 1), str(max(n - 1, 0)), str(n + 2)]
        if len(digits) > 1:
            i = rng.randrange(len(digits))
            options.append("".join(digits[:i] + digits[i + 1:]))  # a dropped digit
            j = rng.randrange(len(digits) - 1)
            options.append("".join(digits[:j] + [digits[j + 1], digits[j]] + digits[j + 2:]))  # swapped
        i = rng.randrange(len(digits))
        options.append("".join(digits[:i] + [rng.choice(string.digits)] + digits[i + 1:]))  # changed
        options.append("".join(digits[: i + 1] + [digits[i]] + digits[i + 1:]))  # doubled
        options = [o for o in options if o and (o == "0" or not o.startswith("0"))]
    else:
        alphabet = string.ascii_lowercase + (string.digits if task in ("copy", "sort") else "")
        chars = list(answer)
        i = rng.randrange(len(chars))
        options = ["".join(chars[:i] + [rng.choice(alphabet)] + chars[i + 1:]),  # a changed letter
                   "".join(chars[:i] + chars[i + 1:]),  # a dropped letter
                   "".join(chars[:i] + [chars[i]] + chars[i:])]  # a doubled letter
        if len(chars) > 1:
            j = rng.randrange(len(chars) - 1)
            options.append("".join(chars[:j] + [chars[j + 1], chars[j]] + chars[j + 2:]))  # a swap
        word = ex["messages"][0]["content"].split()[-1]
        if task == "reverse":
            options.append(word)  # not reversed at all
        if task == "sort":
            options.append(word)  # not sorted
        if task == "copy":
            options.append(answer[: max(1, len(answer) * 2 // 3)])  # stopped early
    options = [o for o in options if o != answer]
    return rng.choice(options)


def read_prompts(data_dir, split, rng):
    path = os.path.join(data_dir, f"{split}.jsonl")
    rows, _ = read_conversations(path)
    wanted = {tuple(c.split("/")) for c in cells}
    by_cell = {}
    for row in rows:
        key = (row.get("task"), str(row.get("difficulty")))
        if not wanted or key in wanted:
            by_cell.setdefault(key, []).append(row)
    if wanted - set(by_cell):
        raise ValueError(f"cells {sorted('/'.join(c) for c in wanted - set(by_cell))} are not in {path}")
    picked = []
    for key in sorted(by_cell):
        group = by_cell[key]
        if split == "train":
            group = rng.sample(group, min(train_prompts_per_cell, len(group)))
        picked += group
    return picked


def pair(row, chosen, rejected):
    """A pair in the file's format; format (how the checker grades a reply, "either" on a mixed
    dataset: a worked reply by its Answer line) is kept when the task row has it, so that the
    margin here and reward.py's checker scores grade a worked solution as the RL stages do."""
    user = [m for m in row["messages"] if m["role"] != "assistant"]
    return {"prompt": user, "chosen": chosen, "rejected": rejected,
            "margin": round(score(row, chosen) - score(row, rejected), 4),
            "task": row.get("task"), "difficulty": row.get("difficulty"), "answer": row["answer"],
            **({"format": row["format"]} if "format" in row else {})}


def rules_pairs(rows, rng):
    if any(row.get("format") == "cot" for row in rows):
        raise ValueError("rules pairs pair a bare reference answer with a near miss; this dataset answers with "
                         "worked solutions (format cot): use --source=policy")
    return [pair(row, row["answer"], perturb(row, rng)) for row in rows]


def policy_pairs(rows, rng, ddp):
    ckpt = common.load_checkpoint(init_from)
    model = common.model_from_checkpoint(ckpt, init_from)
    tok = bpe.tokenizer_from_meta(ckpt["meta"])
    ctx = common.autocast(ddp.device_type, common.pick_dtype(dtype, ddp.device_type))
    model.to(ddp.device).eval()
    examples = posttrain.held_out_prompts(rows, len(rows), tok)
    answers = posttrain.answer_prompts(model, examples, tok, ctx, ddp, batch_size, max_new_tokens, temperature,
                                       samples_per_prompt, seed=seed)
    out = []
    for ex, samples in zip(examples, answers):
        row = {"messages": [{"role": "user", "content": ex["question"]}], "answer": ex["answer"],
               **{k: ex[k] for k in ("task", "difficulty", "format") if k in ex}}
        out += prompt_pairs(row, samples, rng, label, pairs_per_prompt)
    return keep_forms(out, forms)


def prompt_pairs(row, samples, rng, label, n):
    """The pairs of one prompt's sampled answers, ordered by the checker (label: score, its partial
    credit, or exact, right or wrong): the best against the worst (n = 1), or up to n distinct pairs
    of a better and a worse answer; none when every answer grades the same."""
    grade = score if label == "score" else exact_match
    graded = sorted((grade(row, a), a) for a in set(samples))  # by grade, then text: the same pairs every run
    if graded[-1][0] == graded[0][0]:
        return []  # every answer as good as the others: nothing to prefer
    if n == 1:
        best = [a for s, a in graded if s == graded[-1][0]]
        worst = [a for s, a in graded if s == graded[0][0]]
        return [pair(row, rng.choice(best), rng.choice(worst))]  # graded is in text order within a grade
    ordered = [(a, b) for i, (sa, a) in enumerate(graded) for sb, b in graded[:i] if sa > sb]
    return [pair(row, a, b) for a, b in rng.sample(ordered, min(n, len(ordered)))]


def keep_forms(pairs, forms):
    """The pairs forms asks for: all (any), or those whose chosen reply is a worked solution and whose
    rejected reply answers directly (worked_over_direct)."""
    if forms == "any":
        return pairs
    return [p for p in pairs if reply_form(p["chosen"]) == "worked" and reply_form(p["rejected"]) == "direct"]


def main():
    if source not in ("rules", "policy"):
        raise ValueError(f"source must be rules | policy, got {source!r}")
    if label not in ("score", "exact"):
        raise ValueError(f"label must be score | exact, got {label!r}")
    if forms not in ("any", "worked_over_direct"):
        raise ValueError(f"forms must be any | worked_over_direct, got {forms!r}")
    if pairs_per_prompt < 1 or samples_per_prompt < 2:
        raise ValueError(f"need pairs_per_prompt >= 1 and samples_per_prompt >= 2, got {pairs_per_prompt} and "
                         f"{samples_per_prompt}")
    out = out_dir or os.path.join(ROOT, "data", "preferences", source)
    ddp = common.Distributed(device)  # one process: answer_prompts shares work out over processes
    data_dir = posttrain.task_data(tasks_dir, ddp)  # generated when missing
    os.makedirs(out, exist_ok=True)
    for split in ("train", "val"):
        rng = random.Random(f"{seed}-{split}")
        rows = read_prompts(data_dir, split, rng)
        t0 = time.time()
        pairs = rules_pairs(rows, rng) if source == "rules" else policy_pairs(rows, rng, ddp)
        with open(os.path.join(out, f"{split}.jsonl"), "w", encoding="utf-8") as f:
            for p in pairs:
                f.write(json.dumps(p) + "\n")
        print(f"{split}: {len(rows)} prompts, {len(pairs)} usable pairs "
              f"({len(pairs) / max(len(rows), 1):.2f} a prompt), {time.time() - t0:.1f}s -> {os.path.relpath(os.path.join(out, f'{split}.jsonl'))}")


if __name__ == "__main__":
    configure(globals())
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
