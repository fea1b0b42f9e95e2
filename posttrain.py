"""
The machinery of post-training that the stages share (sft.py's evals, reward.py's statistics,
grpo.py, ppo.py and dpo.py): the prompts of the task family and their held-out splits, answering
them, the rollout of an RL iteration, the frozen reference and reward model, the task reward, the
evals (greedy exact match per cell, pass@k, err_rl, the test split answered once at the end) and
the statistics they report. The physics of each stage (advantages, KL, clipping, the update) stays
in its own script, and the objectives in losses.py.

    prompts = posttrain.rl_prompts("tasks", ("add/3",), tok, ddp, 1000, 100, 10000, block_size, 16)
    examples, out = posttrain.rollout(model, prompts["train"], stream, it, ddp, ctx, tok, 8, 16, 1.0, 0, 1.0, seed)
    rewards, parts, texts = posttrain.TaskReward(("score",), tok, device, meta)(examples, out)
"""

import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass

import torch

import common
from bpe import check_same_tokenizer, tokenizer_from_meta
from conversations import read_conversations
from convert import add_chat_tokens, resize_vocab
from data.tasks.tasks import exact_match, follows_format, metrics, reply_form, score
from model import adapters_off
from sampling import last_index

# -----------------------------------------------------------------------------
# prompts with reference answers, and their splits

# the folders data/tasks/prepare.py writes, by name under data/, and its arguments for each
TASK_DATASETS = {"tasks": [], "tasks_cot": ["--cot=True"],
                 "tasks_cot_rl": ["--cot=True", "--extra_train_difficulties=4"], "tasks_mix": ["--cot_share=0.15"]}


def task_data(name, ddp):
    """The folder of a conversations dataset (common.data_dir of name) holding train.jsonl and
    val.jsonl; one that data/tasks/prepare.py writes (TASK_DATASETS) is generated when missing.
    Exits with a message when the files are not there."""
    folder = common.data_dir(name)
    command = None
    if name in TASK_DATASETS:
        command = ["data/tasks/prepare.py", *TASK_DATASETS[name], *([f"--out_dir={folder}"] if name != "tasks" else [])]
    common.prepare_missing(folder, ("train.jsonl", "val.jsonl"), ddp, command, "run python data/tasks/prepare.py")
    return folder


def post_training_start(init_from, out_dir, eval_only=False, verbose=True):
    """The start of a post-training stage (SFT, reward, GRPO, PPO, DPO): common.load_start, the
    tokenizer the checkpoint's meta carries, with the chat template's tokens (with_chat_tokens),
    and the path of the reference, the starting policy (a resumed run, or a stage's checkpoint
    being measured, keeps the one its first run started from). -> (checkpoint, its path, resumed,
    tokenizer, reference path). Exits with a one-line message when the checkpoint carries no
    tokenizer."""
    ckpt, path, resumed = common.load_start(init_from, out_dir, verbose)
    if "meta" not in ckpt:
        sys.exit(f"{path} carries no tokenizer (meta): post-training needs a checkpoint of this repository")
    try:
        ckpt, tok = with_chat_tokens(ckpt, path, verbose)
    except ValueError as e:
        sys.exit(f"init_from={init_from}: {e}")
    reference_path = ckpt.get("reference", path) if resumed or eval_only else init_from
    return ckpt, path, resumed, tok, reference_path


def with_chat_tokens(ckpt, path, verbose=False):
    """A checkpoint whose tokenizer has the chat template's tokens, and that tokenizer. Ours reserve
    them; a model from elsewhere (a Hugging Face folder) gets them appended (convert.add_chat_tokens),
    and its token embedding, and an untied head, grow to match (convert.resize_vocab: the new rows start
    at the mean row). Deterministic, so the policy and its reference, each loaded from the folder,
    start as one model. -> (checkpoint, tokenizer)"""
    tok, meta = add_chat_tokens(tokenizer_from_meta(ckpt["meta"]), ckpt["meta"], verbose)
    ckpt = dict(ckpt, meta=meta)
    if meta["vocab_size"] > ckpt["model_args"]["vocab_size"]:
        model = common.model_from_checkpoint(ckpt, path)
        resize_vocab(model, meta["vocab_size"])
        ckpt.update(model=model.state_dict(), model_args=asdict(model.config))
    return ckpt, tok


@torch.no_grad()
def reset_token_rows(model, ids, match_norm=False, generator=None):
    """Give the token-embedding rows of ids (and, untied, the head's) a fresh random start: N(0, 0.02)
    as at initialisation, or with match_norm random directions as long as the mean row of the other
    ids (sft.py's reinit_unseen). For tokens pretraining never showed as inputs: their rows only
    learned to be unlikely outputs, which pushed them all the same way, so as inputs they are
    nearly one vector."""
    ids = torch.as_tensor(ids, dtype=torch.long, device=model.wte.weight.device)
    if not isinstance(model.lm_head.weight, torch.Tensor):
        raise ValueError("reset_token_rows: the head is quantized (quantize_head); reset before quantizing")
    tables = [model.wte.weight] + ([] if model.config.tie_weights else [model.lm_head.weight])
    for w in tables:
        fresh = torch.randn(len(ids), w.size(1), generator=generator, device="cpu").to(w) * 0.02
        if match_norm:
            others = torch.ones(w.size(0), dtype=torch.bool, device=w.device)
            others[ids] = False
            fresh = torch.nn.functional.normalize(fresh, dim=1) * w[others].norm(dim=1).mean()
        w[ids] = fresh


def held_out_prompts(rows, n, tok):
    """Up to n conversations (rows of read_conversations) as prompts with reference answers, taken
    round-robin over the (task, difficulty) cells so that every cell is measured even in a small
    eval. The prompt is the conversation up to its last assistant message, rendered by the chat
    template; the reference is the answer field, else that message. -> a list of examples, dicts
    with prompt (ids), answer, question and, where the row has them, task, difficulty and format."""
    cells = {}
    for row in rows:
        cells.setdefault((row.get("task"), row.get("difficulty")), []).append(row)
    picked = [c[k] for k in range(max(map(len, cells.values()), default=0)) for c in cells.values() if k < len(c)][:n]
    out = []
    for row in picked:
        last = max(i for i, m in enumerate(row["messages"]) if m["role"] == "assistant")
        history = row["messages"][:last]
        ex = {"prompt": tok.render_prompt(history), "answer": row.get("answer", row["messages"][last]["content"]),
              "question": next((m["content"] for m in reversed(history) if m["role"] == "user"), "")}
        ex.update({k: row[k] for k in ("task", "difficulty", "format") if k in row})  # format: cot is graded
        out.append(ex)                                                                 # by its Answer: line
    return out


def cell_rows(rows, cells):
    """The rows of read_conversations whose task/difficulty is one of cells ("add/3", ...; empty:
    all). Raises ValueError naming the cells that have no rows."""
    if not cells:
        return list(rows)
    wanted = set(cells)
    kept = [r for r in rows if f"{r.get('task')}/{r.get('difficulty')}" in wanted]
    missing = wanted - {f"{r.get('task')}/{r.get('difficulty')}" for r in kept}
    if missing:
        raise ValueError(f"no prompts for the cells {sorted(missing)}")
    return kept


def cell_key(example):
    """"add/3": an example's task/difficulty cell ("all/all" without those fields)."""
    return f"{example.get('task', 'all')}/{example.get('difficulty', 'all')}"


def rl_prompts(dataset, cells, tok, ddp, eval_prompts, pass_k_prompts, test_prompts, block_size=None,
               max_new_tokens=None):
    """The task prompts of a stage, from dataset (its prompt_dataset: a folder of task_data whose
    train.jsonl, val.jsonl and test.jsonl hold conversations with an "answer"; test.jsonl is
    optional; "" = none) -> a dict of lists of held_out_prompts' examples:

        train       the training prompts of the cells (all cells when it names none); only with
                    block_size (the RL stages; DPO trains on pairs)
        dev         eval_prompts prompts of val.jsonl over every cell: the evals during training
        pass_dev    pass_k_prompts prompts of val.jsonl of the cells, for pass@k
        test        test_prompts prompts of test.jsonl over every cell: answered once, at the end
        pass_test   pass_k_prompts prompts of test.jsonl of the cells

    A training prompt's completion may take min(max_new_tokens, block_size - its length) tokens
    (model.complete); a prompt that leaves no room at all is left out, and a trained cell left with
    no prompt is a config error naming it. The master prints how many prompts each cell keeps.
    Exits with a one-line message on a data error."""
    out = {split: [] for split in ("train", "dev", "pass_dev", "test", "pass_test")}
    if not dataset:
        return out
    data_dir = task_data(dataset, ddp)
    test_path = os.path.join(data_dir, "test.jsonl")
    try:
        train_rows = read_conversations(os.path.join(data_dir, "train.jsonl"))[0] if block_size else []
        val_rows, _ = read_conversations(os.path.join(data_dir, "val.jsonl"))
        test_rows = read_conversations(test_path)[0] if os.path.isfile(test_path) else []
        trained = cell_rows(train_rows, cells) if train_rows else []
        out.update(train=held_out_prompts(trained, len(trained), tok),
                   dev=held_out_prompts(val_rows, eval_prompts, tok),
                   pass_dev=held_out_prompts(cell_rows(val_rows, cells), pass_k_prompts, tok),
                   test=held_out_prompts(test_rows, test_prompts, tok),
                   pass_test=held_out_prompts(cell_rows(test_rows, cells) if test_rows else [], pass_k_prompts, tok))
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"data error: {e}")
    if not block_size:
        return out
    if any("answer" not in row for row in train_rows[:100]):
        sys.exit(f"data error: {data_dir}/train.jsonl has rows without an 'answer': nothing to check rewards against")
    kept, shorter = {}, {}
    for ex in out["train"]:
        room = block_size - len(ex["prompt"])
        c = cell_key(ex)
        kept[c] = kept.get(c, 0) + (room > 0)
        shorter[c] = shorter.get(c, 0) + (0 < room < max_new_tokens)
    empty = sorted(c for c, n in kept.items() if n == 0)
    if empty:
        sys.exit(f"config error: the cells {', '.join(empty)} keep no training prompt: every one is "
                 f"block_size {block_size} tokens or longer")
    out["train"] = [ex for ex in out["train"] if len(ex["prompt"]) < block_size]
    if ddp.master:
        print("prompts: " + ", ".join(f"{c} {n}" + (f" ({shorter[c]} with room for fewer than {max_new_tokens} new "
                                                    f"tokens)" if shorter[c] else "") for c, n in sorted(kept.items())) +
              f"; dev {len(out['dev'])}, test {len(out['test'])}" +
              ("" if test_rows else f" (no {test_path}: no test split)"))
    return out


# -----------------------------------------------------------------------------
# the order of the examples, and sampling


class EpochStream:
    """The order in which training visits n examples: a fresh shuffle per epoch, so example k of
    the run's stream is position k % n of epoch k // n. The batch of (iteration, micro-step, rank)
    depends only on those and the seed, so a resumed run draws exactly the batches an
    uninterrupted one would have, with no state to carry. first_epoch (a key per example) orders
    the first epoch by it, shuffled within equal keys: a curriculum. cells (a key per example,
    such as "add/3") visits the cells evenly instead, whatever their sizes: position k of the
    stream is cell k % C of the C cells (in sorted order), and within that cell position k // C
    of its own stream of shuffled epochs (an RL stage's rl_cell_weights=uniform)."""

    def __init__(self, n, seed, batch_size, grad_accum, ddp, first_epoch=None, cells=None):
        self.n, self.seed, self.batch_size, self.grad_accum = n, seed, batch_size, grad_accum
        self.rank, self.world_size = ddp.rank, ddp.world_size
        self.first_epoch = first_epoch
        self._orders = {}
        self.cells = None
        if cells is not None:
            members = {}
            for i, c in enumerate(cells):
                members.setdefault(c, []).append(i)
            self.cells = [(members[c], EpochStream(len(members[c]), seed * 7919 + j, 1, 1, ddp))
                          for j, c in enumerate(sorted(members))]

    def order(self, epoch):
        if epoch not in self._orders:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.n, generator=g).tolist()
            if self.first_epoch is not None and epoch == 0:
                order.sort(key=lambda i: self.first_epoch[i])  # stable: the shuffle survives within a key
            self._orders = {epoch: order, **{e: o for e, o in self._orders.items() if e == epoch - 1}}
        return self._orders[epoch]

    def at(self, k):
        """The example at position k of the run's stream."""
        if self.cells is None:
            return self.order(k // self.n)[k % self.n]
        members, stream = self.cells[k % len(self.cells)]
        j = k // len(self.cells)
        return members[stream.order(j // len(members))[j % len(members)]]

    def indices(self, it, micro_step):
        start = ((it * self.grad_accum + micro_step) * self.world_size + self.rank) * self.batch_size
        return [self.at(k) for k in range(start, start + self.batch_size)]



def length_pieces(indices, length, pieces):
    """A batch of examples (indices) sorted by length(i) and cut into `pieces` runs of nearly equal
    size, shortest first, so each can be padded to its own longest rather than the batch's: with a
    token-weighted loss the gradient is the batch's, for fewer padded positions. -> lists of indices
    (no empty ones)."""
    order = sorted(indices, key=length)
    n = max(1, min(pieces, len(order)))
    k, r = divmod(len(order), n)
    cuts = [j * k + min(j, r) for j in range(n + 1)]
    return [order[a:b] for a, b in zip(cuts, cuts[1:])]

@torch.no_grad()
def answer_prompts(model, examples, tok, ctx, ddp, batch_size, max_new_tokens, temperature=0.0, num_samples=1,
                   seed=0):
    """Answers of `model` to examples (held_out_prompts'), batched, each process a share, each
    answer ending at <|end|> (not included). temperature 0: greedy, one answer per example, a list
    of strings. Otherwise num_samples sampled answers per example (the samples of a prompt share
    its prefill), drawn from generators seeded by (seed, batch), a list of lists of strings."""
    end = tok.special_id("<|end|>")
    mine = sorted(range(ddp.rank, len(examples), ddp.world_size), key=lambda i: len(examples[i]["prompt"]))
    per_batch = max(1, batch_size // num_samples)
    answers = {}
    for k in range(0, len(mine), per_batch):  # similar lengths together: less left padding
        idx = mine[k : k + per_batch]
        prompts = [torch.tensor(examples[i]["prompt"], device=ddp.device) for i in idx]
        g = torch.Generator(ddp.device).manual_seed(hash((seed, idx[0])) % 2**63)
        with ctx:
            out = model.complete(prompts, max_new_tokens, num_samples, temperature, stop_tokens=end, generator=g,
                                 vocab_limit=tok.n_vocab)
        texts = [tok.decode(row[m & (row != end)].tolist()) for row, m in zip(out.idx, out.mask)]
        for j, i in enumerate(idx):
            group = texts[j * num_samples : (j + 1) * num_samples]
            answers[i] = group[0] if temperature == 0 else group
    for part in ddp.gather_objects(answers):
        answers.update(part)
    return [answers[i] for i in range(len(examples))]


def rollout(model, examples, stream, iter_num, ddp, ctx, tok, samples, max_new_tokens, temperature, top_k, top_p,
            seed):
    """The sampling of an RL iteration: this process's share of stream's batch (an EpochStream over
    examples), each prompt continued by `samples` completions in one batched generate with the KV
    cache (the samples of a prompt share its prefill), each stopping at <|end|>, drawn at the
    stage's max_new_tokens, temperature, top_k (0 = off) and top_p (1 = off) from a generator
    seeded by (seed, rank, iter_num), so that a resumed run samples exactly what the uninterrupted
    run would have. -> (the examples, one per row: row p * samples + s is sample s of prompt p;
    sampling.Completions)."""
    batch = [examples[i] for i in stream.indices(iter_num, 0)]
    prompts = [torch.tensor(ex["prompt"], device=ddp.device) for ex in batch]
    g = torch.Generator(ddp.device).manual_seed(hash((seed, ddp.rank, iter_num)) % 2**63)
    with ctx:
        out = model.complete(prompts, max_new_tokens, samples, temperature, top_k or None, top_p if top_p < 1 else None,
                             stop_tokens=tok.special_id("<|end|>"), generator=g, vocab_limit=tok.n_vocab)
    return [ex for ex in batch for _ in range(samples)], out


def timed(fn, *args):
    """fn(*args) and the seconds it took -> (result, seconds)."""
    t0 = time.time()
    return fn(*args), time.time() - t0


def minibatches(n, num_minibatches, passes, seed, rank, iter_num, device):
    """The optimizer steps of one RL update: the rows 0..n-1 of the batch cut into num_minibatches
    minibatches, pass after pass, each pass from a fresh shuffle seeded by (seed, rank, iter_num,
    pass), so each pass groups the rows differently and a resumed run cuts them as the uninterrupted
    one did; with one minibatch, every row in order. -> passes * num_minibatches index tensors on device."""
    if num_minibatches == 1:
        return [torch.arange(n, device=device)] * passes
    steps = []
    for epoch in range(passes):
        g = torch.Generator().manual_seed(hash((seed, rank, iter_num, epoch)) % 2**63)
        steps += torch.randperm(n, generator=g).to(device).tensor_split(num_minibatches)
    return steps


# -----------------------------------------------------------------------------
# the frozen models: the reference, the reward model


class Reference:
    """The frozen policy an RL stage measures its KL against: the starting checkpoint (path) loaded
    once more, or, when the policy trains LoRA adapters, the policy itself with its adapters off
    (no copy at all).

        reference = posttrain.Reference(policy, reference_path, device)
        with ctx:
            ref_logp = reference.logprobs(inputs, targets, pos, temperature, vocab_limit, prefix)  # no grad

    (prefix: the sampling.Prefix the inputs continue, or None.)
    """

    def __init__(self, policy, path, device):
        self.policy, self.path, self.model = policy, path, None
        if policy.config.lora_rank == 0:
            ckpt, _ = with_chat_tokens(common.load_checkpoint(path), path)  # a folder grows as the policy did
            self.model = common.model_from_checkpoint(ckpt, path).to(device).eval()
            self.model.requires_grad_(False)

    def __str__(self):
        return self.path if self.model is not None else "the policy with adapters off"

    @torch.no_grad()
    def logprobs(self, idx, targets, pos, temperature, vocab_limit, prefix=None):
        if self.model is not None:
            return self.model.logprobs(self.model(idx, pos, prefix=prefix), targets, temperature, vocab_limit)[0]
        with adapters_off(self.policy):
            return self.policy.logprobs(self.policy(idx, pos, prefix=prefix), targets, temperature, vocab_limit)[0]


READS = ("end", "lines")  # where a reward model reads a reply (reward.py's reward_read): see read_positions


def line_end_ids(tok, device):
    """The ids of tok whose text holds a newline (one per step of a worked solution), as a tensor."""
    specials = set(tok.special_tokens.values())
    return torch.tensor([i for i in range(tok.n_vocab) if i not in specials and b"\n" in tok.decode_bytes([i])],
                        dtype=torch.long, device=device)


def read_positions(idx, reply_mask, read, line_ids):
    """Where a reward model reads each reply of a batch -> (B, T) bool, from the reply's mask (B, T)
    (True on its tokens and its closing <|end|>):

        end     the reply's last token only: its <|end|>, or the last token of a completion that ran
                out, the one token that has seen the whole reply (InstructGPT's reading)
        lines   that token and every line end inside the reply (the tokens holding a newline): a
                worked solution is read after each of its steps, so a wrong step is seen where it
                is, one local check at a time, rather than only through the final token

    The reward is the mean of the scalar head over these positions (read_reward)."""
    last = last_index(reply_mask)
    where = torch.zeros_like(reply_mask)
    where[torch.arange(idx.size(0), device=idx.device), last] = True
    if read == "lines":
        where |= reply_mask & torch.isin(idx, line_ids)
    return where


def read_reward(scores, where):
    """The mean of the scalar head's scores (B, T) over the positions where (B, T) -> (B,)."""
    return (scores * where).sum(1) / where.sum(1)


class RewardModel:
    """A reward.py checkpoint as a frozen scorer for the RL stages:

        rm = posttrain.RewardModel("out-reward/ckpt.pt", tok, device, policy_meta=meta)
        rewards = rm(idx, mask, pos)   # (N,), normalised

    scores each row of a batch of rendered conversations where it was trained to read the reply
    whose tokens mask marks (read_positions: at its last token, or also at every line end) and
    returns (r - reward_mean) / reward_std with the statistics the checkpoint stores, so that
    rewards are about unit-sized whatever the reward model's scale. policy_meta: the policy's
    tokenizer must be the reward model's (checked).

    Several checkpoints ("a.pt,b.pt,c.pt", reward models trained on other seeds or pairs) are an
    ensemble: its reward is the mean of their normalised rewards (ensemble="mean") or the lowest
    (ensemble="min", worst-case optimisation), which a policy can push up only where the members
    agree (Coste et al. 2023, reward model ensembles against over-optimisation). spread, after a
    call: the mean over rows of the members' standard deviation, their disagreement."""

    def __init__(self, path, tok, device, policy_meta=None, ensemble="mean"):
        if ensemble not in ("mean", "min"):
            raise ValueError(f"reward_ensemble must be mean | min, got {ensemble!r}")
        self.members, self.ensemble, self.spread = [], ensemble, None
        for p in [p for p in path.split(",") if p]:
            ckpt = common.load_checkpoint(p)
            if ckpt.get("stage") != "reward" or not ckpt["model_args"].get("scalar_head"):
                raise ValueError(f"{p} is not a reward model (stage {ckpt.get('stage')!r}): train one with reward.py")
            if policy_meta is not None:
                check_same_tokenizer(ckpt["meta"], f"reward model {p}", policy_meta, "the policy")
            model = common.model_from_checkpoint(ckpt, p).to(device).eval().requires_grad_(False)
            read = ckpt.get("config", {}).get("reward_read", "end")  # as it was trained to read
            self.members.append((model, ckpt.get("reward_mean", 0.0), ckpt.get("reward_std", 1.0), read))
        if not self.members:
            raise ValueError("reward_model names no checkpoint")
        self.line_ids = line_end_ids(tok, device)
        self.path = path

    @torch.no_grad()
    def __call__(self, idx, mask, pos=None):
        rewards = []
        for model, mean, std, read in self.members:
            scores = model.scores(model(idx, pos)).float()
            r = read_reward(scores, read_positions(idx, mask, read, self.line_ids))
            rewards.append((r - mean) / max(std, 1e-6))
        r = torch.stack(rewards)  # (members, N)
        self.spread = r.std(dim=0, correction=0).mean().item() if len(rewards) > 1 else None
        return r.mean(dim=0) if self.ensemble == "mean" else r.min(dim=0).values


# -----------------------------------------------------------------------------
# the reward of a completion


def parse_weights(spec, names):
    """("score", "model=0.5") -> {"score": 1.0, "model": 0.5}: weighted terms by name, each one of
    names. Raises ValueError on anything else."""
    out = {}
    for item in spec:
        name, sep, w = item.partition("=")
        try:
            out[name] = float(w) if sep else 1.0
        except ValueError:
            raise ValueError(f"expected name or name=weight, got {item!r}") from None
        if name not in names:
            raise ValueError(f"unknown reward {name!r}, expected {' | '.join(names)}")
    if not out:
        raise ValueError("no reward named")
    return out


class TaskReward:
    """The sequence reward of sampled completions (sampling.Completions), the sum of weighted terms:

        score   the checker's score of the answer, in [0, 1] with partial credit (tasks.score)
        exact   1 for an exact match, else 0
        model   a reward model's score, normalised by its stored mean and std (RewardModel), or
                an ensemble's (reward_model="a.pt,b.pt")
        format  1 when the response follows its task's format (tasks.follows_format)

    then missing_end_penalty subtracted from a completion that ran out of tokens without <|end|>.
    reward: the terms as parse_weights reads them, e.g. ("score",) or ("exact", "model=0.5")."""

    TERMS = ("score", "exact", "model", "format")

    def __init__(self, reward, tok, device, policy_meta, reward_model="", missing_end_penalty=0.0,
                 reward_ensemble="mean"):
        self.tok = tok
        self.weights = parse_weights(reward, self.TERMS)
        self.end = tok.special_id("<|end|>")
        self.penalty = missing_end_penalty
        self.model = (RewardModel(reward_model, tok, device, policy_meta, reward_ensemble)
                      if "model" in self.weights else None)

    def texts(self, out):
        """The completions as text, without their <|end|>."""
        return [self.tok.decode(row[m & (row != self.end)].tolist()) for row, m in zip(out.idx, out.mask)]

    def __call__(self, examples, out):
        """examples: one per row of out (each row's task example, with answer, task, format ...).
        -> (rewards (N,) float32, the mean of each term for the log, the completions' texts)."""
        texts = self.texts(out)
        device = out.idx.device
        parts = {}
        for name, fn in (("score", score), ("exact", exact_match),
                         ("format", lambda ex, t: float(follows_format(ex, t)))):
            if name in self.weights:
                parts[name] = torch.tensor([fn(ex, t) for ex, t in zip(examples, texts)], device=device)
        if self.model is not None:  # read where it was trained to: see read_positions
            parts["model"] = self.model(out.idx, out.mask, out.pos)
        rewards = sum(self.weights[k] * v.float() for k, v in parts.items())
        rewards = rewards - self.penalty * out.truncated.float()
        logged = {f"reward_{k}": v.float().mean().item() for k, v in parts.items()}
        if self.model is not None and self.model.spread is not None:
            logged["reward_model_spread"] = self.model.spread
        return rewards, logged, texts


def worked_share(examples, texts):
    """The share of texts (replies to examples) that are worked solutions, where the examples may
    be answered either way (a mixed dataset); None otherwise: the mechanism in an RL step line."""
    if not any(ex.get("format") == "either" for ex in examples):
        return None
    return sum(reply_form(t) == "worked" for t in texts) / max(len(texts), 1)


# -----------------------------------------------------------------------------
# evaluation


def evaluate_policy(model, examples, pass_examples, tok, ctx, ddp, batch_size, max_new_tokens, pass_samples=8,
                    seed=0):
    """The RL stages' eval: greedy exact match and score per task and difficulty on examples
    (held_out_prompts'), and pass@k for k = 1, 4, 8 (those <= pass_samples) from pass_samples answers
    at temperature 1 on pass_examples, with the unbiased estimator. On a mixed dataset (examples
    that may be answered either way) also, from those samples, the share of sampled answers that
    are worked solutions per cell (swork/add/3 ...) and the exact match of the worked and of the
    direct ones (sem_worked, sem_direct): what RL can select from. -> (the dict the log takes,
    the greedy answers)."""
    answers = answer_prompts(model, examples, tok, ctx, ddp, batch_size, max_new_tokens)
    out = metrics(examples, answers)
    if pass_examples and pass_samples > 0:
        samples = answer_prompts(model, pass_examples, tok, ctx, ddp, batch_size, max_new_tokens, 1.0, pass_samples,
                                 seed=seed)
        correct = [int(sum(exact_match(ex, a) for a in group)) for ex, group in zip(pass_examples, samples)]
        for k in (1, 4, 8):
            if k <= pass_samples:
                out[f"pass@{k}"] = sum(pass_at_k(pass_samples, c, k) for c in correct) / len(correct)
        if any(ex.get("format") == "either" for ex in pass_examples):
            forms = {}  # cell -> [worked, all]; form -> [exact, all]
            for ex, group in zip(pass_examples, samples):
                for a in group:
                    worked = reply_form(a) == "worked"
                    f = forms.setdefault(cell_key(ex), [0, 0])
                    f[0], f[1] = f[0] + worked, f[1] + 1
                    e = forms.setdefault("worked" if worked else "direct", [0, 0])
                    e[0], e[1] = e[0] + exact_match(ex, a), e[1] + 1
            for key, (a, n) in sorted(forms.items()):
                out[f"swork/{key}" if "/" in key else f"sem_{key}"] = a / n
    return out, answers


def rl_error(stats, cells):
    """err_rl, the number the RL stages' best.pt follows: 1 - the mean greedy exact match over the
    trained cells ("add/3", ...) that stats (evaluate_policy's) measured, or over all prompts when
    cells is empty or none was measured. None when nothing was measured."""
    keys = [f"em/{c}" for c in cells if f"em/{c}" in stats] or [k for k in ("em",) if k in stats]
    return 1 - sum(stats[k] for k in keys) / len(keys) if keys else None


@dataclass
class Evals:
    """How a stage answers its held-out prompts, by the names of its settings: rows per generate
    call, the longest answer, samples per prompt for pass@k (0 = none), examples shown in
    out_dir/samples.txt, the trained cells (err_rl and the test's mean follow them; () = all)."""

    tok: object
    ctx: object
    eval_batch_size: int
    eval_max_new_tokens: int
    pass_k_samples: int
    eval_show: int
    rl_tasks: tuple
    seed: int
    out_dir: str


def evaluate_rl(loop, model, examples, pass_examples, evals, evaluated=True):
    """An RL stage's eval at the loop's iteration: evaluate_policy with the stage's evals settings,
    plus err_rl, the number best.pt follows: 1 - the mean greedy exact match over the trained cells
    (all prompts when rl_tasks names none). The stats go to the log as an "answers" line (with s,
    the seconds it took), eval_show examples to out_dir/samples.txt, and (evaluated) err_rl to
    loop.evaluated, which saves ckpt.pt, and best.pt at a new best. -> the stats ({} without
    prompts)."""
    if not (examples or pass_examples):
        if evaluated:
            loop.evaluated(float("inf"))
        return {}
    t0 = time.time()
    ddp = loop.ddp
    stats, answers = evaluate_policy(model, examples, pass_examples, evals.tok, evals.ctx, ddp, evals.eval_batch_size,
                                     evals.eval_max_new_tokens, evals.pass_k_samples, seed=evals.seed)
    err_rl = rl_error(stats, evals.rl_tasks)
    if err_rl is not None:  # with no held-out prompts there is nothing to follow: no best.pt
        stats["err_rl"] = err_rl
    if ddp.master and evals.eval_show:
        write_samples(os.path.join(evals.out_dir, "samples.txt"), examples, answers, loop.iter_num, evals.eval_show)
    loop.log("answers", **stats, s=time.time() - t0)
    if evaluated:
        loop.evaluated(stats.get("err_rl", float("inf")))
    return stats


def evaluate_test(loop, model, examples, pass_examples, evals):
    """The test split, answered once at the end of a stage (or by eval_only): by the weights the
    dev split chose (out_dir/best.pt, when this run wrote one: the starting weights, written at
    iteration 0, when no later eval beat them), else by model as it is. Logged as a
    "test" line: evaluate_policy's stats with the standard error of each cell's exact match
    (se/add/3 ...) and the mean over cells (the trained ones; every cell when rl_tasks is empty)
    with its own (em_cells, se_cells); the master prints the summary. -> the stats ({} without
    prompts)."""
    if not (examples or pass_examples):
        return {}
    t0, ddp, cells = time.time(), loop.ddp, evals.rl_tasks
    source = f"iter {loop.iter_num}"
    if loop.best_iter is not None:  # written by the master during this run (or the run it resumes)
        ddp.barrier()
        path = os.path.join(evals.out_dir, "best.pt")
        model = common.model_from_checkpoint(common.load_checkpoint(path), path).to(ddp.device).eval()
        source = f"best.pt of iter {loop.best_iter}"
    stats, _ = evaluate_policy(model, examples, pass_examples, evals.tok, evals.ctx, ddp, evals.eval_batch_size,
                               evals.eval_max_new_tokens, evals.pass_k_samples, seed=evals.seed)
    for key in [k for k in stats if k.startswith("n/")]:
        p = stats["em/" + key[2:]]
        stats["se/" + key[2:]] = math.sqrt(p * (1 - p) / stats[key])
    mean, se = cells_mean(stats, cells)
    stats.update(em_cells=mean, se_cells=se)
    loop.log("test", **stats, of=source, s=time.time() - t0)
    if ddp.master:
        shown = [c for c in (cells or ()) if f"em/{c}" in stats]
        print(f"test, {len(examples)} prompts, {source}: exact match {stats['em']:.3f}; "
              f"{'the trained cells' if shown else 'mean over cells'} {mean:.3f} +- {se:.3f} (standard error)" +
              "".join(f"; {c} {stats['em/' + c]:.3f} +- {stats['se/' + c]:.3f}" for c in shown))
    return stats


def cells_mean(stats, cells=()):
    """The mean exact match over cells (every cell stats has when cells is empty or none of them
    was measured) and its standard error sqrt(sum of the cells' p (1 - p) / n) / the number of
    cells, from metrics' em/ and n/ keys. -> (mean, se); (nan, nan) when no cell was measured."""
    measured = [k[3:] for k in stats if k.startswith("em/")]
    chosen = [c for c in cells if c in measured] or measured
    if not chosen:
        return float("nan"), float("nan")
    ps = [stats[f"em/{c}"] for c in chosen]
    var = sum(p * (1 - p) / stats[f"n/{c}"] for p, c in zip(ps, chosen))
    return sum(ps) / len(ps), math.sqrt(var) / len(ps)


def write_samples(path, examples, answers, iter_num, n_show):
    """Append n_show (prompt, reference, answer) examples, the same ones at every eval, to path."""
    shown = random.Random(0).sample(range(len(examples)), min(n_show, len(examples)))
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"=== iter {iter_num}\n")
        for i in sorted(shown):
            ex = examples[i]
            f.write(f"[{ex.get('task', 'all')}/{ex.get('difficulty', 'all')}] prompt: {ex['question']!r}\n"
                    f"  reference: {ex['answer']!r}\n  answer:    {answers[i]!r}"
                    f"{'  (exact)' if exact_match(ex, answers[i]) else ''}\n")


# -----------------------------------------------------------------------------
# statistics of the evaluations


def pass_at_k(n, c, k):
    """The unbiased estimator of pass@k from n samples of which c are correct (Chen et al. 2021):
    1 - C(n - c, k) / C(n, k), the chance that k samples drawn from the n hold a correct one."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def ranks(x):
    """Ranks 1..n of the values x (a list), ties given the mean of the ranks they span."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    out = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x, y):
    """Spearman's rank correlation: Pearson's correlation of the ranks (ties averaged), in [-1, 1];
    nan when either side is constant."""
    rx, ry = ranks(list(x)), ranks(list(y))
    n = len(rx)
    mx, my = sum(rx) / n, sum(ry) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx, sy = math.sqrt(sum((a - mx) ** 2 for a in rx)), math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (sx * sy) if sx > 0 and sy > 0 else float("nan")


def calibration(probs, outcomes, bins=10):
    """How well predicted probabilities match outcome frequencies. probs and outcomes (0 or 1) are
    lists; the probabilities are cut into equal-width bins. -> (ece, table): the expected
    calibration error sum over bins of (n_b / n) |accuracy_b - mean probability_b|, and per
    non-empty bin (low, high, n, mean probability, accuracy)."""
    n, ece, table = len(probs), 0.0, []
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        idx = [i for i, p in enumerate(probs) if lo <= p < hi or (b == bins - 1 and p == 1.0)]
        if not idx:
            continue
        conf = sum(probs[i] for i in idx) / len(idx)
        acc = sum(outcomes[i] for i in idx) / len(idx)
        ece += len(idx) / n * abs(acc - conf)
        table.append((lo, hi, len(idx), conf, acc))
    return ece, table
