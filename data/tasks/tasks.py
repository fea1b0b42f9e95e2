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

With cot=True the assistant writes a worked solution first, one step per line, then a last line
"Answer: <answer>"; the example is marked "format": "cot" and its "answer" stays the bare answer:

    ex = generate("add", 2, random.Random(0), cot=True)
    print(ex["messages"][1]["content"])
    # 9+3+0=12 2
    # 5+6+1=12 122
    # Answer: 122
    score(ex, "9+3+0=12 2\n5+6+1=12 122\nAnswer: 122")  # 1.0    graded on what follows the last "Answer:"
    score(ex, "122")                                      # 0.0    no Answer line: nothing was answered
    follows_format(ex, "9+3+0=12 2\nAnswer: 121")          # True   the shape is right (the sum is not)

The steps of each task (see add_steps, sub_steps, sort_steps, count_steps):
    add      one line per column from the right: digit + digit + carry in = sum, then the answer's
             digits so far (the last column writes its whole sum)
    sub      one line per column from the right: digit (plus 10 when it borrows) - digit - borrow
             in = digit, then the answer's digits so far; the answer drops leading zeros
    sort     one line per character that occurs, in order: how often, then that many of it
    count    one line per letter of the string: the letter and the tally of the asked letter so far
    reverse, copy: no steps, only the Answer line. Neither has a step a model could check: the
             answer is the input read in some order, and spelling it out letter by letter would
             only write the answer twice.
"""

import re
import string

TASKS = ("add", "sub", "reverse", "sort", "count", "copy")
DIFFICULTIES = (1, 2, 3, 4)
WORD_LENGTHS = {1: (2, 3), 2: (4, 6), 3: (7, 9), 4: (10, 12)}  # reverse, sort
COUNT_LENGTHS = {1: (3, 5), 2: (6, 10), 3: (11, 15), 4: (16, 20)}
COPY_LENGTHS = {1: (2, 5), 2: (6, 10), 3: (11, 15), 4: (16, 20)}
ANSWER = "Answer:"  # opens the last line of a worked solution; what follows it is graded
WORK_MARKER = "Work:"  # the line that opens a worked solution in a mixed dataset (generate's marker)
FORMATS = ("direct", "cot", "either")  # what an example asks for, its "format" field (absent: direct)


def _number(d, rng):
    return rng.randint(0, 9) if d == 1 else rng.randint(10 ** (d - 1), 10**d - 1)


def _letters(n, rng, alphabet=string.ascii_lowercase):
    return "".join(rng.choice(alphabet) for _ in range(n))


def generate(task, difficulty, rng, cot=False, marker=""):
    """One problem of `task` at `difficulty`, drawn with rng (a random.Random), as a conversation
    with its reference answer (see the module docstring). cot=True writes the worked solution
    as the assistant's message and marks the example "format": "cot"; it draws the same numbers
    from rng, so one seed gives the same problems, and the same "answer", in both formats.
    marker: a first line that opens the worked solution ("Work:" in a mixed dataset, where the
    choice between the two forms is then made at the reply's first token)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}, expected one of {', '.join(TASKS)}")
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {DIFFICULTIES}, got {difficulty!r}")
    d, steps = difficulty, []
    if task == "add":
        a, b = _number(d, rng), _number(d, rng)
        prompt, answer, steps = f"What is {a} + {b}?", str(a + b), add_steps(a, b)
    elif task == "sub":
        a, b = sorted((_number(d, rng), _number(d, rng)), reverse=True)
        prompt, answer, steps = f"What is {a} - {b}?", str(a - b), sub_steps(a, b)
    elif task == "reverse":
        word = _letters(rng.randint(*WORD_LENGTHS[d]), rng)
        prompt, answer = f"Reverse the word {word}", word[::-1]
    elif task == "sort":
        kind, alphabet = rng.choice((("letters", string.ascii_lowercase), ("digits", string.digits)))
        s = _letters(rng.randint(*WORD_LENGTHS[d]), rng, alphabet)
        prompt, answer, steps = f"Sort the {kind} of {s}", "".join(sorted(s)), sort_steps(s)
    elif task == "count":
        s = _letters(rng.randint(*COUNT_LENGTHS[d]), rng, "abcde")
        c = rng.choice("abcde")
        prompt, answer, steps = f"Count the letter {c} in {s}", str(s.count(c)), count_steps(s, c)
    else:  # copy
        s = _letters(rng.randint(*COPY_LENGTHS[d]), rng, string.ascii_lowercase + string.digits)
        prompt, answer = f"Copy this: {s}", s
    reply = "\n".join(([marker] if marker else []) + steps + [f"{ANSWER} {answer}"]) if cot else answer
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
    ex = {"messages": messages, "answer": answer, "task": task, "difficulty": d}
    if cot:
        ex["format"] = "cot"
    return ex


# -----------------------------------------------------------------------------
# worked solutions: the steps before the Answer line, one per line, every line of a task the same shape


def add_steps(a, b):
    """Column addition of a + b from the right. Each line is one column: its two digits plus the
    carry coming in (0 or 1), their sum, then the digits of the answer written so far; the carry
    going out is the sum's tens digit. The last column writes its whole sum, so the last line
    ends in the answer and the Answer line only copies it.

        add_steps(59, 63)      # ["9+3+0=12 2", "5+6+1=12 122"]
        add_steps(4829, 3395)  # ["9+5+0=14 4", "2+9+1=12 24", "8+3+1=12 224", "4+3+1=8 8224"]
    """
    xs, ys = str(a), str(b)
    n = max(len(xs), len(ys))
    xs, ys = xs.zfill(n), ys.zfill(n)
    steps, carry, written = [], 0, ""
    for k in reversed(range(n)):
        x, y = int(xs[k]), int(ys[k])
        total = x + y + carry
        written = (str(total) if k == 0 else str(total % 10)) + written
        steps.append(f"{x}+{y}+{carry}={total} {written}")
        carry = total // 10
    return steps


def sub_steps(a, b):
    """Column subtraction of a - b (a >= b) from the right. Each line is one column: its digit
    of a, written with a 1 in front when it borrows 10 (because it is smaller than the digit of b
    plus the borrow coming in), minus that digit of b, minus the borrow coming in (0 or 1), the
    result digit, then the digits written so far. The answer is the last line's digits without
    leading zeros.

        sub_steps(4829, 3395)  # ["9-5-0=4 4", "12-9-0=3 34", "8-3-1=4 434", "4-3-0=1 1434"]
        sub_steps(503, 498)    # ["13-8-0=5 5", "10-9-1=0 05", "5-4-1=0 005"]  -> Answer: 5
    """
    if a < b:
        raise ValueError(f"sub_steps needs a >= b, got {a} - {b}")
    xs = str(a)
    ys = str(b).zfill(len(xs))
    steps, borrow, written = [], 0, ""
    for k in reversed(range(len(xs))):
        x, y = int(xs[k]), int(ys[k])
        top = x + 10 if x < y + borrow else x
        digit = top - y - borrow
        written = str(digit) + written
        steps.append(f"{top}-{y}-{borrow}={digit} {written}")
        borrow = int(top > x)
    return steps


def sort_steps(s):
    """Counting sort: each character that occurs in s, in sorted order, with how often it occurs,
    then that many of it. The answer is these runs joined, in the same order.

        sort_steps("banana")  # ["a:3=aaa", "b:1=b", "n:2=nn"]  -> Answer: aaabnn
    """
    return [f"{ch}:{s.count(ch)}={ch * s.count(ch)}" for ch in sorted(set(s))]


def count_steps(s, letter):
    """A running tally: each letter of s in turn, followed by how many times `letter` has
    occurred up to and including it. The last tally is the answer.

        count_steps("abcab", "a")  # ["a1", "b1", "c1", "a2", "b2"]  -> Answer: 2
    """
    steps, tally = [], 0
    for ch in s:
        tally += ch == letter
        steps.append(f"{ch}{tally}")
    return steps


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


# The shape of one step line of each task's worked solution (see add_steps ...); None: no steps
STEP_PATTERNS = {
    "add": r"\d\+\d\+[01]=\d\d? \d+",  # 9+3+0=12 2
    "sub": r"1?\d-\d-[01]=\d \d+",  # 12-9-0=3 34
    "sort": r"([a-z0-9]):\d+=\1+",  # a:3=aaa (the run repeats the character named)
    "count": r"[a-e]\d+",  # a2
    "reverse": None,
    "copy": None,
}


def is_cot(example):
    """Whether the example asks for a worked solution (generate(..., cot=True) marks it)."""
    return example.get("format") == "cot"


def extract_answer(response):
    """What a worked solution answers: the rest of the line after its last "Answer:", stripped,
    or None if it has no Answer line. Only the last one counts, so listing several answers wins
    nothing; later lines do not change it (follows_format rejects them); more text on the same
    line is part of the answer, since no task's answer has a space.

        extract_answer("2+2+0=4 4\nAnswer: 4")          # "4"
        extract_answer("Answer: 3\nAnswer: 4\nthanks")  # "4"
        extract_answer("Answer: 4 or 5")                # "4 or 5"
        extract_answer("4")                             # None
    """
    i = response.rfind(ANSWER)
    if i < 0:
        return None
    return response[i + len(ANSWER):].split("\n", 1)[0].strip()


def reply_form(response):
    """Which way a reply answers: "worked" when it has an Answer line (a worked solution, whatever
    its steps), else "direct". The mechanism of the RL stages on a mixed dataset is the share of
    replies that switch from one to the other.

        reply_form("Work:\n9+3+0=12 2\n5+6+1=12 122\nAnswer: 122")  # "worked"
        reply_form("122")                                             # "direct"
        reply_form("Work:\n9+3+0=12 2")                               # "direct": cut off before it answered
    """
    return "worked" if extract_answer(response) is not None else "direct"


def final_answer(example, response):
    """The part of a response that is graded: for a worked-solution example ("format": "cot") its
    extracted answer (None without an Answer line); for one that may be answered either way
    ("either", a mixed dataset) the extracted answer when there is an Answer line, else the whole
    response; for a direct one the whole response."""
    if is_cot(example):
        return extract_answer(response)
    if example.get("format") == "either" and reply_form(response) == "worked":
        return extract_answer(response)
    return response


def exact_match(example, response):
    """1.0 if the response is the reference answer (up to surrounding whitespace), else 0.0. For a
    worked-solution example, the answer after its last "Answer:" is what must match."""
    answer = final_answer(example, response)
    return float(answer is not None and normalize(answer) == normalize(example["answer"]))


def score(example, response):
    """The reward of a response to a task example (a dict with "answer"), in [0, 1]: 1.0 for an
    exact match, checked first; otherwise the partial credit of the normalised edit distance,
    which is below 1 for any answer that is not exact (so exact answers always score highest).
    A worked solution is graded on its extracted answer, and one with no Answer line scores 0:
    a trace cut off before it answers has answered nothing, and crediting its text by
    similarity would pay a policy to ramble instead of committing to an answer."""
    answer = final_answer(example, response)
    if answer is None:
        return 0.0
    if exact_match(example, response):
        return 1.0
    return similarity(normalize(answer), normalize(example["answer"]))


def follows_format(example, response):
    """Whether a response has the shape its example asks for, right or wrong (for a small format
    reward, and the "fmt" metric). A worked solution: step lines of its task's shape
    (STEP_PATTERNS; none for reverse and copy, at least one for the others), then one
    "Answer: <answer>" line, and nothing after it. A direct answer: one non-empty line. Either
    ("format": "either"): one of the two, the worked one opening with its marker line.

        ex = {"task": "count", "format": "cot"}
        follows_format(ex, "a1\nb1\nAnswer: 1")  # True
        follows_format(ex, "a1\nb1")             # False: no Answer line
        follows_format(ex, "a1 b1\nAnswer: 1")   # False: two steps on one line
        follows_format(ex, "Answer: 1")          # False: count has steps
        follows_format({"task": "add", "format": "either"}, "Work:\n2+2+0=4 4\nAnswer: 4")  # True
    """
    lines = normalize(response).split("\n")
    if example.get("format") == "either":
        if reply_form(response) == "direct":
            return len(lines) == 1 and lines[0] != ""
        if lines[0] != WORK_MARKER:
            return False
        lines = lines[1:]
    elif not is_cot(example):
        return len(lines) == 1 and lines[0] != ""
    *steps, last = lines
    if not re.fullmatch(re.escape(ANSWER) + r" \S+", last):
        return False
    pattern = STEP_PATTERNS.get(example.get("task"), r".*")  # an unknown task: any steps
    if pattern is None:
        return not steps
    return bool(steps) and all(re.fullmatch(pattern, line) for line in steps)


def metrics(examples, responses):
    """Exact match and score, overall and per task and difficulty, as the flat dict the logs
    take: {"em": ..., "score": ..., "em/add/2": ..., "score/add/2": ..., "n/add/2": ...}, n the
    number of examples (for standard errors). Examples without a task or difficulty field are
    grouped under "all". When some examples are worked solutions, "fmt" keys add the fraction of
    responses that follow the format (fmt/add/2 ...), which tells a wrong step from a broken
    trace; where some may be answered either way (a mixed dataset), "work" keys add the fraction of
    their responses that are worked solutions (reply_form), the mechanism RL moves: overall over
    those examples, and per cell for the cells that have them."""
    if len(examples) != len(responses):
        raise ValueError(f"{len(examples)} examples but {len(responses)} responses")
    with_format = any(is_cot(ex) for ex in examples)
    sums, forms = {}, {}  # key -> [exact matches, score, follows format, count]; key -> [worked, count]
    for ex, resp in zip(examples, responses):
        em, sc, fmt = exact_match(ex, resp), score(ex, resp), float(follows_format(ex, resp))
        cell = f"{ex.get('task', 'all')}/{ex.get('difficulty', 'all')}"
        for key in ("", "/" + cell):
            s = sums.setdefault(key, [0.0, 0.0, 0.0, 0])
            s[0], s[1], s[2], s[3] = s[0] + em, s[1] + sc, s[2] + fmt, s[3] + 1
            if ex.get("format") == "either":  # work: over the examples that may be answered either way
                f = forms.setdefault(key, [0, 0])
                f[0], f[1] = f[0] + (reply_form(resp) == "worked"), f[1] + 1
    out = {}
    for key in sorted(sums, key=lambda k: (k != "", k)):
        em, sc, fmt, n = sums[key]
        out["em" + key], out["score" + key], out["n" + key] = em / n, sc / n, n
        if with_format:
            out["fmt" + key] = fmt / n
        if key in forms:
            out["work" + key] = forms[key][0] / forms[key][1]
    return out
