"""
Verifiable tasks: problems generated with a reference answer and a difficulty level, and the one
checker that scores a model's answer. SFT trains and evaluates on them; the reward-model, PPO and
GRPO stages score with the same `score`. Import from the repo root (data/ is a namespace package):

    import random
    from data.tasks.tasks import generate, score
    ex = generate("add", 2, random.Random(0))
    # {"messages": [{"role": "user", "content": "What is 59 + 63?"},
    #               {"role": "assistant", "content": "122"}], "answer": "122", "task": "add", "difficulty": 2}
    score(ex, "122")     # 1.0    exact match
    score(ex, " 122\n")  # 1.0    surrounding whitespace does not count
    score(ex, "121")     # 0.667  partial credit: one edit in three characters, 1 - 1/3

Tasks, and what difficulty d means for each:
    add      a + b with two d-digit numbers (d = 1: 0..9)
    sub      a - b with two d-digit numbers, a >= b, so the answer is never negative
    reverse  reverse a word of random lowercase letters: d = 1: 2-3 letters, 2: 4-6, 3: 7-9, 4: 10-12
    sort     sort the letters (or, half the time, the digits) of a string, lengths as reverse
    count    how often a letter occurs in a string over 'abcde': d = 1: 3-5 letters, 2: 6-10, 3: 11-15, 4: 16-20
    copy     repeat a string of letters and digits: d = 1: 2-5, 2: 6-10, 3: 11-15, 4: 16-20
"""

import re
import string

TASKS = ("add", "sub", "reverse", "sort", "count", "copy")
DIFFICULTIES = (1, 2, 3, 4)
WORD_LENGTHS = {1: (2, 3), 2: (4, 6), 3: (7, 9), 4: (10, 12)}  # reverse, sort
COUNT_LENGTHS = {1: (3, 5), 2: (6, 10), 3: (11, 15), 4: (16, 20)}
COPY_LENGTHS = {1: (2, 5), 2: (6, 10), 3: (11, 15), 4: (16, 20)}


def _number(d, rng):
    return rng.randint(0, 9) if d == 1 else rng.randint(10 ** (d - 1), 10**d - 1)


def _letters(n, rng, alphabet=string.ascii_lowercase):
    return "".join(rng.choice(alphabet) for _ in range(n))


def generate(task, difficulty, rng):
    """One problem of `task` at `difficulty`, drawn with rng (a random.Random), as a conversation
    with its reference answer (see the module docstring)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}, expected one of {', '.join(TASKS)}")
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {DIFFICULTIES}, got {difficulty!r}")
    d = difficulty
    if task == "add":
        a, b = _number(d, rng), _number(d, rng)
        prompt, answer = f"What is {a} + {b}?", str(a + b)
    elif task == "sub":
        a, b = sorted((_number(d, rng), _number(d, rng)), reverse=True)
        prompt, answer = f"What is {a} - {b}?", str(a - b)
    elif task == "reverse":
        word = _letters(rng.randint(*WORD_LENGTHS[d]), rng)
        prompt, answer = f"Reverse the word {word}", word[::-1]
    elif task == "sort":
        kind, alphabet = rng.choice((("letters", string.ascii_lowercase), ("digits", string.digits)))
        s = _letters(rng.randint(*WORD_LENGTHS[d]), rng, alphabet)
        prompt, answer = f"Sort the {kind} of {s}", "".join(sorted(s))
    elif task == "count":
        s = _letters(rng.randint(*COUNT_LENGTHS[d]), rng, "abcde")
        c = rng.choice("abcde")
        prompt, answer = f"Count the letter {c} in {s}", str(s.count(c))
    else:  # copy
        s = _letters(rng.randint(*COPY_LENGTHS[d]), rng, string.ascii_lowercase + string.digits)
        prompt, answer = f"Copy this: {s}", s
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return {"messages": messages, "answer": answer, "task": task, "difficulty": d}


def problem_key(example):
    """What makes two problems the same problem, for holding problems out of training: the prompt,
    except for addition, where a + b and b + a are one problem (a model trained on 5 + 3 has seen
    the answer to 3 + 5), so the key is the unordered pair."""
    if example.get("task") == "add":
        a, b = (int(n) for n in re.findall(r"\d+", example["messages"][0]["content"]))
        return ("add", min(a, b), max(a, b))
    return example["messages"][0]["content"]


def n_problems(task, difficulty):
    """How many distinct problems (by problem_key) `task` has at `difficulty`: 1-digit sums have
    only 55, so a held-out set must not take most of them."""
    d = difficulty
    numbers = 10 if d == 1 else 9 * 10 ** (d - 1)
    if task == "add":
        return numbers * (numbers + 1) // 2  # unordered pairs
    if task == "sub":
        return numbers * (numbers + 1) // 2  # pairs with a >= b
    if task == "reverse":
        return sum(26**n for n in range(WORD_LENGTHS[d][0], WORD_LENGTHS[d][1] + 1))
    if task == "sort":
        return sum(26**n + 10**n for n in range(WORD_LENGTHS[d][0], WORD_LENGTHS[d][1] + 1))
    if task == "count":
        return 5 * sum(5**n for n in range(COUNT_LENGTHS[d][0], COUNT_LENGTHS[d][1] + 1))
    if task == "copy":
        return sum(36**n for n in range(COPY_LENGTHS[d][0], COPY_LENGTHS[d][1] + 1))
    raise ValueError(f"unknown task {task!r}, expected one of {', '.join(TASKS)}")


# -----------------------------------------------------------------------------
# the checker


def normalize(text):
    return text.strip()


def edit_distance(a, b):
    """Levenshtein distance: the fewest insertions, deletions and substitutions turning a into b."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def similarity(a, b):
    """1 - edit_distance / the longer length: 1 only for equal strings, 0 for nothing in common."""
    n = max(len(a), len(b))
    return 1.0 if n == 0 else 1.0 - edit_distance(a, b) / n


def exact_match(example, response):
    """1.0 if the response is the reference answer (up to surrounding whitespace), else 0.0."""
    return float(normalize(response) == normalize(example["answer"]))


def score(example, response):
    """The reward of a response to a task example (a dict with "answer"), in [0, 1]: 1.0 for an
    exact match, checked first; otherwise the partial credit of the normalised edit distance,
    which is below 1 for any answer that is not exact (so exact answers always score highest)."""
    if exact_match(example, response):
        return 1.0
    return similarity(normalize(response), normalize(example["answer"]))


def metrics(examples, responses):
    """Exact match and score, overall and per task and difficulty, as the flat dict the logs
    take: {"em": ..., "score": ..., "em/add/2": ..., "score/add/2": ...}. Examples without a task
    or difficulty field are grouped under "all"."""
    if len(examples) != len(responses):
        raise ValueError(f"{len(examples)} examples but {len(responses)} responses")
    sums = {}  # key -> [exact matches, score, count]
    for ex, resp in zip(examples, responses):
        em, sc = exact_match(ex, resp), score(ex, resp)
        cell = f"{ex.get('task', 'all')}/{ex.get('difficulty', 'all')}"
        for key in ("", "/" + cell):
            s = sums.setdefault(key, [0.0, 0.0, 0])
            s[0], s[1], s[2] = s[0] + em, s[1] + sc, s[2] + 1
    out = {}
    for key in sorted(sums, key=lambda k: (k != "", k)):
        em, sc, n = sums[key]
        out["em" + key], out["score" + key] = em / n, sc / n
    return out
