"""
Conversations and preference pairs, as the JSONL files of data/ hold them: read and checked (a
malformed line stops with its file and line number), rendered by the tokenizer's chat template,
and batched. sft.py reads conversations, reward.py and dpo.py pairs, posttrain.py the prompts of
the RL stages; data/tasks/prepare.py and data/preferences/prepare.py write them.

    {"messages": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]}
    {"prompt": "What is 2 + 3?", "completion": "5"}
    {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6", "margin": 1.0}
"""

import json
import os

import torch

CHAT_ROLES = ("system", "user", "assistant")


def read_conversations(path, require_assistant=True):
    """The conversations of a JSONL file, one JSON object per line, in either format:

        {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
        {"prompt": "...", "completion": "..."}      (a user message and an assistant message)

    -> (rows, blank): each row is the line's object with "messages" in the first format (any
    other fields, such as answer, task and difficulty, kept as they are), and blank is the number
    of blank lines skipped. A line that is neither format raises ValueError naming the file and
    the line, as does a conversation with no assistant message when require_assistant."""

    def parse(obj):
        obj["messages"] = messages_of(obj)
        if require_assistant and not any(m["role"] == "assistant" for m in obj["messages"]):
            raise ValueError("no assistant message, so nothing to learn from")
        return obj

    return _read_jsonl(path, parse)


def messages_of(obj):
    """The messages of one conversation object, in either format of read_conversations, checked:
    roles from CHAT_ROLES, string contents. Raises ValueError saying what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or set(m) != {"role", "content"}:
                raise ValueError(f"message {i} must be an object with exactly 'role' and 'content', got {m!r:.80}")
            if m["role"] not in CHAT_ROLES:
                raise ValueError(f"message {i} has role {m['role']!r}, expected one of {', '.join(CHAT_ROLES)}")
            if not isinstance(m["content"], str):
                raise ValueError(f"message {i} has a content that is not a string: {m['content']!r:.80}")
        return messages
    if "prompt" in obj and "completion" in obj:
        if not isinstance(obj["prompt"], str) or not isinstance(obj["completion"], str):
            raise ValueError("'prompt' and 'completion' must be strings")
        return [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["completion"]}]
    raise ValueError(f"expected a 'messages' list or 'prompt' and 'completion', found keys {sorted(obj)}")


def _read_jsonl(path, parse):
    """parse(obj) of every non-blank line of a JSONL file -> (rows, blank lines). Any error, JSON or
    parse's ValueError, is raised as a ValueError naming the file and the line."""
    rows, blank, n = [], 0, 0
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no file {path}")
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    blank += 1
                    continue
                try:
                    rows.append(parse(json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
                except ValueError as e:
                    raise ValueError(f"{path} line {n}: {e}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} line {n + 1}: not UTF-8 text") from None
    return rows, blank


def read_preferences(path):
    """The preference pairs of a JSONL file, one per line, in TRL's formats:

        {"prompt": "..." or [messages], "chosen": "...", "rejected": "..."}   explicit prompt
        {"chosen": [messages], "rejected": [messages]}                        implicit: the common
                                                                              prefix is the prompt
    chosen and rejected are assistant replies: strings, or (explicit form) a list of one assistant
    message; in the implicit form each must end in exactly one assistant message after the shared
    prefix. Optional: margin (a number), task, difficulty, answer, format (how the checker grades a
    reply: data/tasks's field, "either" on a mixed dataset). -> (rows, blank), each row
    {"prompt": [messages], "chosen": str, "rejected": str, ...the optional fields}. A malformed
    line raises ValueError naming the file and the line."""

    def reply(value, what):
        if isinstance(value, str):
            return value
        if (isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict)
                and value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str)):
            return value[0]["content"]
        raise ValueError(f"'{what}' must be a string or a list of one assistant message, got {value!r:.80}")

    def parse(obj):
        if not isinstance(obj, dict):
            raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
        if "chosen" not in obj or "rejected" not in obj:
            raise ValueError(f"expected 'chosen' and 'rejected', found keys {sorted(obj)}")
        if "prompt" in obj:
            prompt = obj["prompt"]
            if isinstance(prompt, str):
                prompt = [{"role": "user", "content": prompt}]
            messages_of({"messages": prompt})  # checks roles and contents
            chosen, rejected = reply(obj["chosen"], "chosen"), reply(obj["rejected"], "rejected")
        else:
            c, r = messages_of({"messages": obj["chosen"]}), messages_of({"messages": obj["rejected"]})
            n = 0
            while n < min(len(c), len(r)) and c[n] == r[n]:
                n += 1
            if len(c) != n + 1 or len(r) != n + 1 or c[n]["role"] != "assistant" or r[n]["role"] != "assistant":
                raise ValueError("implicit pairs must share every message but a final assistant reply")
            prompt, chosen, rejected = c[:n], c[n]["content"], r[n]["content"]
        if not prompt:
            raise ValueError("the prompt is empty")
        margin = obj.get("margin", 0.0)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)):  # null included
            raise ValueError(f"'margin' must be a number, got {margin!r:.40}")
        row = {k: obj[k] for k in ("margin", "task", "difficulty", "answer", "format") if k in obj}
        return {**row, "prompt": prompt, "chosen": chosen, "rejected": rejected}

    return _read_jsonl(path, parse)


def render_pairs(rows, tok, max_len):
    """Preference rows -> (pairs, report): each pair the chosen and the rejected conversation rendered
    by the chat template, (ids, reply mask) each, beside its row; report counts what was left out,
    so that it can be printed: pairs whose replies are equal, and pairs longer than max_len tokens."""
    pairs, same, long = [], 0, 0
    for row in rows:
        if row["chosen"] == row["rejected"]:
            same += 1
            continue
        # the reply mask covers the final reply and its <|end|> only: an earlier assistant turn of a
        # multi-turn prompt is prompt, the same in both, and must not count as reply tokens
        n_prompt = len(tok.render_prompt(row["prompt"]))
        c, r = (tok.render_conversation(row["prompt"] + [{"role": "assistant", "content": row[k]}])
                for k in ("chosen", "rejected"))
        c, r = ((ids, [0] * n_prompt + mask[n_prompt:]) for ids, mask in (c, r))
        if max(len(c[0]), len(r[0])) > max_len:
            long += 1
            continue
        pairs.append((c, r, row))
    return pairs, {"identical": same, "too_long": long}


def pair_batch(pairs, pad_id, device):
    """Pairs (render_pairs') -> the 2B conversations, chosen ones first, in one right-padded batch:
    idx (2B, T), reply mask (2B, T) True on the reply's tokens and its <|end|>, lengths (2B,).
    One forward over both halves: the reward model reads idx at lengths - 1, DPO scores the reply
    tokens of idx with logprobs."""
    seqs = [c for c, _, _ in pairs] + [r for _, r, _ in pairs]
    T = max(len(ids) for ids, _ in seqs)
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for b, (ids, m) in enumerate(seqs):
        idx[b, : len(ids)] = torch.tensor(ids)
        mask[b, : len(ids)] = torch.tensor(m, dtype=torch.bool)
    lengths = torch.tensor([len(ids) for ids, _ in seqs])
    return idx.to(device), mask.to(device), lengths.to(device)


def preference_splits(folders, tok, max_len, eval_pairs=0, train=True, verbose=True):
    """The preference pairs of folders (common.data_dir's of a preference_dataset setting), each
    folder's train.jsonl and val.jsonl read (read_preferences) and rendered (render_pairs, at most
    max_len tokens a conversation). -> (the train pairs of every folder in one list, [] unless
    train; {folder name: its first eval_pairs val pairs (0 = all)}). verbose prints what each file
    gave and left out. A missing or malformed file raises FileNotFoundError or ValueError."""

    def load(folder, split):
        path = os.path.join(folder, f"{split}.jsonl")
        rows, blank = read_preferences(path)
        pairs, left_out = render_pairs(rows, tok, max_len)
        if verbose:
            print(f"{path}: {len(pairs)} pairs; left out {left_out['identical']} with chosen == rejected and "
                  f"{left_out['too_long']} longer than {max_len} tokens; {blank} blank lines")
        return pairs

    train_pairs = [p for f in folders for p in load(f, "train")] if train else []
    val_pairs = {os.path.basename(os.path.normpath(f)): load(f, "val")[: eval_pairs or None] for f in folders}
    return train_pairs, val_pairs

