"""
What generation hands around, beside model.py (which imports this file and nothing else of the
repository): the sampler of one next token, a batch of prompts padded on the left, the sampled
completions of a batch (GPT.complete), and the Prefix their rows share (the prompt of an RL group,
run once per group by GPT.forward).
"""

from dataclasses import dataclass

import torch
from torch.nn import functional as F


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None, vocab_limit=None):
    """Pick one token per row from logits (B, vocab_size). temperature 0 is greedy; top_k keeps
    the k most likely tokens, top_p the smallest set whose probability reaches p (nucleus).
    vocab_limit: only ids below it are drawn (the ids above pad the vocab to a round size)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be None or >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:  # top_p = 0 would keep no token at all
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p}")
    if vocab_limit is not None and vocab_limit < logits.size(-1):
        logits = logits[:, :vocab_limit]
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first always stays)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class Completions:
    """Sampled completions of a batch of prompts (see GPT.complete)."""

    idx: torch.Tensor
    pos: torch.Tensor
    mask: torch.Tensor
    truncated: torch.Tensor
    prompt_len: int
    num_samples: int = 1

    def targets(self):
        """The next-token targets of idx[:, :-1]: the completion tokens, -1 everywhere else."""
        return self.idx[:, 1:].masked_fill(~self.mask[:, 1:], -1)

    def loss_mask(self, drop_truncated=False):
        """(N, L + T - 1), aligned with targets(): True on the completion tokens that carry a loss;
        with drop_truncated none of a completion that ran out of tokens (DAPO's overlong filter)."""
        mask = self.mask[:, 1:]
        return mask & ~self.truncated[:, None] if drop_truncated else mask

    def prefix(self, rows=None):
        """The prompt up to its last token, once per prompt, as the Prefix of the rows (an index
        tensor; None = all). A forward of idx[:, prompt_len - 1 : -1] at pos[:, prompt_len - 1 : -1]
        with it gives the hidden states whose targets are targets()[:, prompt_len - 1:]."""
        S, G = self.prompt_len - 1, self.num_samples
        return Prefix(self.idx[::G, :S], self.pos[::G, :S], G if rows is None else rows // G)


def last_index(mask):
    """The index of the last True in each row of mask (B, T) -> (B,) (T - 1 for a row with none)."""
    T = mask.size(1)
    return T - 1 - mask.flip(1).to(torch.int8).argmax(dim=1)


def left_pad(prompts, pad_id=0):
    """A list of 1-D prompts -> idx (B, L) padded on the left (every row's newest token in the last
    column, so decoding stays batched) and pos (B, L), negative on padding."""
    L = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), L), pad_id, dtype=torch.long, device=prompts[0].device)
    for b, p in enumerate(prompts):
        idx[b, L - len(p):] = p
    lengths = torch.tensor([len(p) for p in prompts], device=idx.device)
    pos = torch.arange(L, device=idx.device)[None] - (L - lengths)[:, None]
    return idx, pos


@dataclass
class Prefix:
    """The first columns of a batch's rows where groups of rows share them (the prompt an RL group's
    samples continue), given once per group. forward(idx, pos, prefix=...) runs them once per group
    and the rest of each row attends to its group's, as if every row were run whole.

        idx, pos (P, S)   the shared columns, once per group (left-padded: negative positions)
        rows              (B,) the group of each row of the batch, an index into P; or an int G:
                          every group in order, G rows each (rows b G .. b G + G - 1 are group b's)
    """

    idx: torch.Tensor
    pos: torch.Tensor
    rows: object

    def per_row(self, t):
        """t (P, ...), one per group -> (B, ...), each row's group's."""
        if isinstance(self.rows, int):  # a copy whose gradient is a sum over each group, not a scatter
            return t[:, None].expand(-1, self.rows, *t.shape[1:]).flatten(0, 1)
        return t[self.rows]
