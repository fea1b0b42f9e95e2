"""
The GPT of this repository: a decoder-only transformer whose variants (positions, norm, MLP,
grouped-query and sliding-window attention, mixture-of-experts, LoRA, a scalar head) are switches
in GPTConfig, with its KV cache, generation, and its parameter/FLOP counts and optimizer groups.

One forward, several heads. forward(idx, pos, cache) gives the final hidden states (B, T, n_embd)
after the last norm, and the heads read them: logits(x), loss(x, targets) (the mean cross-entropy),
logprobs(x, targets, temperature) (per token, for the RL stages) and scores(x) (the scalar head).
A stage calls its module, compiled or wrapped for DDP, for the hidden states, and the plain model
for the head it means:

    x = model(idx)                        # (B, T, n_embd)
    loss = raw_model.loss(x, targets)     # pretraining, SFT
    logp, _ = raw_model.logprobs(x, targets, temperature)   # GRPO, PPO, DPO

Positions. forward takes, optionally, pos (B, T): each token's position in its own sequence,
negative on left padding, which is never attended to. Attention is one rule over positions, the
same in training and in cached decoding (W = sliding_window):

    query at position i sees key at position j  <=>  0 <= j <= i  and  (i - j < W  or  j < n_sink)

Positions stay absolute, sinks included (StreamingLLM renumbers them inside the cache instead), so
a rolling cache computes exactly what a full forward under the same mask computes, at any length.

sampling.py holds what generation hands around (the sampler, padded prompt batches, Completions, a
Prefix) and is the one file of the repository this one imports. quantize.py (int8 / int4 weights,
see linear), convert.py (other checkpoint formats, the merged export, the adapters alone) and
autotune.py live beside it.
"""

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch.nn import functional as F

from sampling import Completions, left_pad, sample_next

# scaled_dot_product_attention's enable_gqa came in torch 2.5: say so here, not mid-forward
if tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) < (2, 5):
    raise ImportError(f"this repository needs torch >= 2.5 (found {torch.__version__}): pip install -r requirements.txt")


@dataclass
class GPTConfig:
    vocab_size: int = 320  # tokenizer size, padded to a multiple of 64 by the prepare scripts
    block_size: int = 256  # the longest sequence the model is trained on
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    n_kv_head: int = None  # None = n_head; fewer = grouped-query attention; 1 = multi-query
    dropout: float = 0.0
    bias: bool = False  # biases in linear layers and layernorms
    qkv_bias: bool = False  # biases on the q, k and v projections even without bias (Qwen2's only biases)
    pos_emb: str = "rope"  # learned | sinusoidal | rope | none
    rope_theta: float = 10000.0
    norm: str = "rmsnorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5  # the epsilon of every norm (GPT-2 and nanoGPT 1e-5; Llamas 1e-5 or 1e-6)
    mlp: str = "swiglu"  # gelu | swiglu
    gelu_approximate: str = "none"  # mlp=gelu: none (exact, erf) | tanh (GPT-2's "gelu_new")
    n_inner: int = None  # MLP hidden size (GPT-2's name); None = 4 n_embd, swiglu 8/3 n_embd up to a multiple of 64
    tie_weights: bool = True  # token embedding and LM head share one matrix
    sliding_window: int = None  # None = full causal attention; W = attend to the last W positions
    n_sink: int = 0  # the first n_sink positions stay visible to every query (attention sinks)
    # Mixture-of-Experts: layer i (0-based) is MoE when (i + 1) % moe_every == 0
    n_expert: int = 0  # routed experts per MoE layer; 0 = dense MLP everywhere
    n_expert_active: int = 2  # top-k: routed experts each token goes through
    moe_every: int = 1  # 1 = every layer is MoE; k = every k-th layer (a hybrid dense/MoE stack)
    n_shared_expert: int = 0  # experts every token goes through besides its routed ones (DeepSeekMoE)
    expert_hidden: int = None  # None = mlp_hidden / (n_expert_active + n_shared_expert), see __post_init__
    moe_aux_coef: float = 0.01  # weight of the Switch Transformer load-balancing loss
    moe_z_coef: float = 0.001  # weight of the router z-loss (ST-MoE), keeps router logits small
    # LoRA: low-rank adapters on the linear layers named in lora_targets, everything else frozen
    lora_rank: int = 0  # 0 = off; r, the rank of each adapter's update B A
    lora_alpha: float = 16.0  # the update is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0  # dropout on the input of the adapter branch only
    lora_targets: tuple = ("c_q", "c_v")  # linear layers that get adapters, see LORA_TARGETS
    scalar_head: bool = False  # a linear head to one number per position (reward model, PPO's values)

    def __post_init__(self):
        def require(ok, msg):
            if not ok:
                raise ValueError(f"GPTConfig: {msg}")

        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if isinstance(self.lora_targets, str):  # "c_q,c_v" typed by hand; a list from JSON
            self.lora_targets = tuple(t for t in self.lora_targets.split(",") if t)
        self.lora_targets = tuple(self.lora_targets)
        # the configurator has checked the types; ranges, then the rules that tie fields together
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "moe_every"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("n_inner", "sliding_window", "expert_hidden"):
            require(getattr(self, name) is None or getattr(self, name) >= 1,
                    f"{name} must be None or >= 1, got {getattr(self, name)}")
        for name in ("n_sink", "n_expert", "n_shared_expert", "moe_aux_coef", "moe_z_coef", "lora_rank"):
            require(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("rope_theta", "norm_eps", "lora_alpha"):
            require(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("dropout", "lora_dropout"):
            require(0.0 <= getattr(self, name) < 1.0, f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name, allowed in (("pos_emb", ("learned", "sinusoidal", "rope", "none")),
                              ("norm", ("layernorm", "rmsnorm")), ("mlp", ("gelu", "swiglu")),
                              ("gelu_approximate", ("none", "tanh"))):
            value = getattr(self, name)
            require(value in allowed, f"{name} must be {' | '.join(allowed)}, got {value!r}")
        require(self.n_embd % self.n_head == 0, f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        require(self.n_kv_head >= 1 and self.n_head % self.n_kv_head == 0,
                f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        require(self.pos_emb != "rope" or self.head_dim % 2 == 0,
                f"rope needs an even head size, got n_embd/n_head = {self.head_dim}")
        require(self.pos_emb != "sinusoidal" or self.n_embd % 2 == 0,
                f"sinusoidal positions need an even n_embd, got {self.n_embd}")
        require(self.gelu_approximate == "none" or self.mlp == "gelu",
                f"gelu_approximate={self.gelu_approximate!r} needs mlp=gelu, not mlp={self.mlp}")
        require(not self.n_sink or self.sliding_window is not None, "n_sink only makes sense with a sliding_window")
        require(self.n_expert > 0 or not self.n_shared_expert, "n_shared_expert needs routed experts (n_expert > 0)")
        if self.n_expert > 0:
            require(1 <= self.n_expert_active <= self.n_expert,
                    f"n_expert_active must be in 1..n_expert={self.n_expert}, got {self.n_expert_active}")
            require(self.moe_every <= self.n_layer,
                    f"moe_every={self.moe_every} > n_layer={self.n_layer} leaves no layer MoE")
            if self.expert_hidden is None:
                # split the dense hidden size between the experts a token uses, so its active
                # parameters match the dense model's (up to a multiple of 8)
                n_used = self.n_expert_active + self.n_shared_expert
                self.expert_hidden = 8 * math.ceil(self.mlp_hidden / n_used / 8)
        # checked even with lora_rank 0, so a typo never waits for the day LoRA is switched on
        for t in self.lora_targets:
            require(t != "c_proj", "lora_targets: 'c_proj' is ambiguous, say 'attn.c_proj' or 'mlp.c_proj'")
            require(t in LORA_TARGETS,
                    f"lora_targets: unknown target {t!r}, expected some of {', '.join(LORA_TARGETS)}")
        if self.lora_rank > 0:
            require(self.lora_targets, "lora_rank > 0 needs at least one name in lora_targets")
            require(self.mlp == "swiglu" or not {"c_gate", "mlp.c_gate"} & set(self.lora_targets),
                    f"lora_targets: c_gate exists only with mlp=swiglu, not mlp={self.mlp}")
            # merging a tied head's adapter would change the token embedding too
            require(not (self.tie_weights and "lm_head" in self.lora_targets),
                    "lora_targets: lm_head needs tie_weights=False (a tied head is the embedding)")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self):
        # swiglu has three matrices instead of two: 2/3 of gelu's 4x keeps the parameter count
        if self.n_inner is not None:
            return self.n_inner
        if self.mlp == "gelu":
            return 4 * self.n_embd
        return 64 * math.ceil(8 * self.n_embd / 3 / 64)

    def is_moe_layer(self, layer_idx):
        return self.n_expert > 0 and (layer_idx + 1) % self.moe_every == 0

    @property
    def unbounded_positions(self):
        """Generation may run past block_size: a rolling cache, and positions not from a table."""
        return self.sliding_window is not None and self.pos_emb in ("rope", "none")


# -----------------------------------------------------------------------------
# building blocks


def make_norm(config):
    if config.norm == "layernorm":
        return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)
    return nn.RMSNorm(config.n_embd, eps=config.norm_eps)


def rope_cos_sin(pos, head_dim, theta, dtype):
    """cos and sin of the rotation angles for positions pos (B, T): each (B, 1, T, head_dim/2)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim)
    angles = pos.clamp(min=0).float()[..., None] * inv_freq  # (B, T, head_dim/2)
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def upcast(x):
    """At least float32, for softmax and losses under bf16/fp16 autocast; float64 stays."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def cross_entropy(logits, targets):
    """The mean cross-entropy of logits (B, T, V) against targets (B, T), over the targets >= 0, in
    at least float32."""
    return F.cross_entropy(upcast(logits).flatten(0, -2), targets.flatten(), ignore_index=-1)


def apply_rope(x, cos, sin):
    # rotate each pair (x1[i], x2[i]) made of the two halves of the head (the GPT-NeoX layout)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # under autocast x may be bf16
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def sinusoidal_embedding(pos, n_embd, dtype):
    """The fixed encoding of "Attention is all you need": (B, T, n_embd) for positions pos (B, T)."""
    inv_freq = 10000.0 ** (-torch.arange(0, n_embd, 2, device=pos.device, dtype=torch.float32) / n_embd)
    angles = pos.clamp(min=0).float()[..., None] * inv_freq
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2).to(dtype)


def attention_mask(pos, T, window, n_sink, device, key_pos=None):
    """The mask of T fresh tokens attending to each other, by the rule at the top of this file: True
    (plain causal, the fast kernel) when there is no window and no padding (pos None), else a
    boolean (B, 1, T, T) from the positions pos (B, T). key_pos (B, S + T): the positions of S
    columns before these (a Prefix's) and then of these, which the queries see: (B, 1, T, S + T)."""
    if key_pos is None:
        if window is None and pos is None:
            return True
        if pos is None:
            pos = torch.arange(T, device=device)[None]
        key_pos = pos
    q, k = pos[:, :, None], key_pos[:, None, :]  # (B, T, 1), (B, 1, S + T)
    mask = (k >= 0) & (k <= q)
    if window is not None:
        mask &= (q - k < window) | (k < n_sink)
    # a padding query sees nothing: let it see itself, so its (unused) output stays finite
    S = key_pos.size(1) - T
    own = torch.arange(S + T, device=device) == torch.arange(S, S + T, device=device)[:, None]  # (T, S + T)
    mask |= own & (q < 0)
    return mask[:, None]


def shared_prompt_attention(q, prompt_k, prompt_v, prompt_visible, k, v):
    """A decode step's attention when rows continue prompts in groups of G (KVCache.share): rows
    b G .. b G + G - 1 attend to prompt b's keys, held once, and then each to its own, in one softmax.
    q (N, n_head, 1, hd), N = P G; prompt_k, prompt_v (P, n_kv_head, L, hd); prompt_visible (P, L),
    False on padding; k, v (N, n_kv_head, t, hd), each row's own tokens so far, all visible."""
    N, H, _, D = q.shape
    P, Hkv, L, _ = prompt_k.shape
    G, r = N // P, H // Hkv  # rows per prompt, query heads per kv head
    q = q.view(N, Hkv, r, D)
    qg = q.view(P, G, Hkv, r, D).transpose(1, 2).reshape(P, Hkv, G * r, D)  # a group's queries together
    s_prompt = (qg @ prompt_k.transpose(-1, -2)).masked_fill(~prompt_visible[:, None, None], float("-inf"))
    s_prompt = s_prompt.view(P, Hkv, G, r, L).transpose(1, 2).reshape(N, Hkv, r, L)
    scores = torch.cat((s_prompt, q @ k.transpose(-1, -2)), dim=-1) * D**-0.5  # (N, Hkv, r, L + t)
    p_prompt, p_own = upcast(scores).softmax(dim=-1).to(v.dtype).split((L, k.size(2)), dim=-1)
    y = p_prompt.view(P, G, Hkv, r, L).transpose(1, 2).reshape(P, Hkv, G * r, L) @ prompt_v
    y = y.view(P, Hkv, G, r, D).transpose(1, 2).reshape(N, Hkv, r, D) + p_own @ v
    return y.view(N, H, 1, D)


def linear(x, weight, bias=None):
    """x W^T + b. W is a tensor, or a module that stands for one (quantize.QuantizedWeight, its
    numbers in 8 or 4 bits): such a weight computes the product itself, as weight(x, bias)."""
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight, bias)
    return weight(x, bias)


class Dropout(nn.Dropout):
    """nn.Dropout, skipped where it does nothing (eval, or p = 0) instead of calling into ATen."""

    def forward(self, x):
        return super().forward(x) if self.training and self.p > 0 else x


class Linear(nn.Linear):
    """nn.Linear whose weight may be a module standing for a tensor (see linear), with numel() and
    dequantize(). The same parameters and state-dict keys as nn.Linear."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)


def count_weights(module):
    """The numbers in module's weights, each shared tensor once, a weight that is a module counted
    as the numbers it stands for."""
    stand_ins = [m.weight for m in module.modules() if isinstance(m, Linear) and not isinstance(m.weight, torch.Tensor)]
    return sum(p.numel() for p in module.parameters()) + sum(w.numel() for w in stand_ins)


class Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        qkv_bias = config.bias or config.qkv_bias
        self.c_q = Linear(config.n_embd, config.n_head * config.head_dim, bias=qkv_bias)
        self.c_k = Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=qkv_bias)
        self.c_v = Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=qkv_bias)
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = Dropout(config.dropout)
        self.dropout = config.dropout

    def forward(self, x, rope, mask, cache):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            # prefill attends to its own fresh keys; a decode step to everything cached so far
            k, v = cache.update(self.layer_idx, k, v)
        if cache is not None and cache.group:  # a decode step of rows that share their prompt, held once
            y = shared_prompt_attention(q, cache.prompt_k[self.layer_idx], cache.prompt_v[self.layer_idx],
                                        cache.prompt_visible, k, v)
        else:
            gqa = self.n_kv_head != self.n_head
            if gqa and q.is_cuda and not isinstance(mask, bool):
                # CUDA's memory-efficient kernel (the one that takes a mask) has no GQA: enable_gqa
                # would fall back to the O(T^2)-memory math kernel, so repeat the kv heads instead
                k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
                v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
                gqa = False
            y = F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=None if isinstance(mask, bool) else mask,
                is_causal=mask is True,
                dropout_p=self.dropout if self.training else 0.0,
                enable_gqa=gqa,
            )
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config, hidden=None):
        super().__init__()
        hidden = config.mlp_hidden if hidden is None else hidden  # experts pass their own size
        self.swiglu = config.mlp == "swiglu"
        self.gelu_approximate = config.gelu_approximate  # "tanh": GPT-2's gelu_new, 0.5 x (1 + tanh(...))
        self.c_fc = Linear(config.n_embd, hidden, bias=config.bias)
        if self.swiglu:
            self.c_gate = Linear(config.n_embd, hidden, bias=config.bias)
        self.c_proj = Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = Dropout(config.dropout)

    def forward(self, x):
        if self.swiglu:
            h = F.silu(self.c_gate(x)) * self.c_fc(x)
        else:
            h = F.gelu(self.c_fc(x), approximate=self.gelu_approximate)
        return self.dropout(self.c_proj(h))


class MoE(nn.Module):
    """Mixture-of-Experts in place of a layer's MLP: a router sends each token to n_expert_active of
    n_expert expert MLPs and mixes their outputs by its gates; shared experts see every token.
    Dropless, so a token's output never depends on the rest of the batch (cached decoding matches
    the full forward). Each forward leaves aux_loss, z_loss (with grad) and load (n_expert,)."""

    def __init__(self, config):
        super().__init__()
        self.n_expert, self.k = config.n_expert, config.n_expert_active
        self.router = Linear(config.n_embd, config.n_expert, bias=False)
        # their c_proj.weight names get GPT-2's depth-scaled init with the other residual projections
        self.experts = nn.ModuleList([MLP(config, config.expert_hidden) for _ in range(config.n_expert)])
        # n shared experts of hidden size H, summed, are one MLP of hidden size n * H
        self.shared = MLP(config, config.n_shared_expert * config.expert_hidden) if config.n_shared_expert else None
        self.aux_loss = self.z_loss = self.load = None

    def forward(self, x):
        B, T, C = x.shape
        x = x.reshape(B * T, C)
        logits = upcast(self.router(x))  # (N, n_expert), N = B*T; the softmax in >= float32
        probs = F.softmax(logits, dim=-1)
        gates, chosen = torch.topk(probs, self.k, dim=-1)  # (N, k)
        if self.k > 1:
            # the k gates sum to 1 (Mixtral), so the output does not shrink when the router spreads
            # probability over experts it did not pick; top-1 keeps its probability as the gate
            # (Switch Transformer): a gate of 1 would teach the router nothing
            gates = gates / gates.sum(dim=-1, keepdim=True)

        # dispatch: sort the N*k (token, expert) pairs by expert, run each expert once on its
        # contiguous run of tokens, then add every output, gated, back onto its token
        chosen = chosen.flatten()  # (N*k,), pair i belongs to token i // k
        order = torch.argsort(chosen, stable=True)
        token = order // self.k  # (N*k,) the token of each pair, in expert order
        counts = torch.bincount(chosen, minlength=self.n_expert)  # (n_expert,)
        # the chunk sizes must be known on the host: one sync per MoE layer on a GPU
        groups = x[token].split(counts.tolist())  # n_expert chunks (some maybe empty) of (n_e, C)
        out = torch.cat([expert(xe) for expert, xe in zip(self.experts, groups)])  # (N*k, C)
        out = out * gates.flatten()[order, None].to(out.dtype)
        y = out.new_zeros(B * T, C).index_add_(0, token, out)  # (N, C)
        if self.shared is not None:
            y = y + self.shared(x)

        # Switch Transformer load balancing: n_expert * sum_e f_e * P_e, with f_e the fraction of
        # routed pairs sent to expert e (no gradient: it comes from the top-k) and P_e the mean
        # router probability of e (which carries the gradient). 1 when routing is uniform.
        self.load = counts.float() / chosen.numel()  # (n_expert,) f_e, sums to 1
        self.aux_loss = self.n_expert * (self.load * probs.mean(dim=0)).sum()
        # router z-loss: penalise large logits, which make the softmax brittle in low precision
        self.z_loss = torch.logsumexp(logits, dim=-1).square().mean()
        return y.view(B, T, C)


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = Attention(config, layer_idx)
        self.ln_2 = make_norm(config)
        self.mlp = MoE(config) if config.is_moe_layer(layer_idx) else MLP(config)

    def forward(self, x, rope, mask, cache):
        x = x + self.attn(self.ln_1(x), rope, mask, cache)
        x = x + self.mlp(self.ln_2(x))
        return x


# -----------------------------------------------------------------------------
# the KV cache


class KVCache:
    """Keys (RoPE applied) and values of every layer for a batch of sequences, per layer
    (B, n_kv_head, S + 1, head_dim), allocated once on the first write, in the keys' dtype.

    Position p lives in slot p, or with a sliding window in a ring of S = n_sink + W slots: the
    sinks keep slots 0..n_sink-1 and p >= n_sink goes to slot n_sink + (p - n_sink) % W, so the
    ring holds exactly the last W positions. Padding, and what a long prompt's window has left
    behind, go to slot S, written but never read.

    static=True attends to all S slots at every step, masking those not written yet: one shape
    for every step, as a compiled decode step needs; else to the slots written so far.
    """

    def __init__(self, config, batch_size, max_len, static=False):
        self.config = config
        self.window, self.n_sink = config.sliding_window, config.n_sink
        self.batch_size = batch_size
        self.n_slots = max_len if self.window is None else min(max_len, self.n_sink + self.window)
        self.static = static
        self.k = self.v = None  # per layer (B, n_kv_head, n_slots + 1, head_dim), once allocated
        self.length = 0  # columns seen so far: the prompt's, then one per decode step
        self.padded = False  # does any row start with padding? (decided at prefill)
        self.group = 0  # after share(n): n rows per prompt, the prompt held once (prompt_k, prompt_v)

    def slot_of(self, pos):
        """The slot of position pos (a tensor, or an int)."""
        if self.window is None:
            return pos
        ring = self.n_sink + (pos - self.n_sink) % self.window
        if not torch.is_tensor(pos):
            return pos if pos < self.n_sink else ring
        return torch.where(pos < self.n_sink, pos, ring)

    def begin(self, pos):
        """Once per forward, before the layers, with the positions (B, T) of the new columns ->
        the attention mask of a decode step (None where nothing is masked)."""
        if self.group:  # after share(): every row writes its own next column, and sees all it wrote
            self.column = self.length - self.prompt_k[0].size(2)
            self.length += 1
            return None
        keep = pos >= 0
        if self.window is not None:  # of a long prompt keep only the sinks and the last W
            keep = keep & ((pos < self.n_sink) | (pos > pos[:, -1:] - self.window))
        self.slots = torch.where(keep, self.slot_of(pos), self.n_slots)
        self.slot = None  # the one slot every row writes in this decode step, where known here
        self.is_prefill = self.k is None
        if self.is_prefill:
            self.padded = bool((pos[:, 0] < 0).any())
            self.length = pos.size(1)
            return None
        if self.static:
            self.visible = self.n_slots
        else:
            self.length += 1
            self.visible = min(self.length, self.n_slots)  # no row has written past this yet
            if not self.padded:  # every row's new token is at position length - 1
                self.slot = self.slot_of(self.length - 1)
                return None
        # slot s holds a position <= the row's newest one exactly when s <= that position
        return (torch.arange(self.visible, device=pos.device) <= pos)[:, None, None, :]  # (B, 1, 1, S)

    def update(self, layer, k, v):
        """Write this forward's keys and values (B, n_kv_head, T, head_dim) for one layer and
        return what the queries attend to: the fresh ones in prefill, the cache when decoding."""
        B, H, T, D = k.shape
        if self.group:
            self.k[layer][:, :, self.column] = k[:, :, 0]
            self.v[layer][:, :, self.column] = v[:, :, 0]
            return self.k[layer][:, :, : self.column + 1], self.v[layer][:, :, : self.column + 1]
        if self.k is None:
            shape = (B, H, self.n_slots + 1, D)
            self.k = [torch.zeros(shape, device=k.device, dtype=k.dtype) for _ in range(self.config.n_layer)]
            self.v = [torch.zeros(shape, device=k.device, dtype=k.dtype) for _ in range(self.config.n_layer)]
        if T == 1 and self.slot is not None:  # decode, every row at the same slot: a plain copy
            self.k[layer][:, :, self.slot] = k[:, :, 0]
            self.v[layer][:, :, self.slot] = v[:, :, 0]
        elif T == 1:  # decode: row b writes its one slot; index_put_ stays in place when compiled
            rows = torch.arange(B, device=k.device)
            self.k[layer][rows, :, self.slots[:, 0]] = k[:, :, 0]
            self.v[layer][rows, :, self.slots[:, 0]] = v[:, :, 0]
        else:
            index = self.slots[:, None, :, None].expand(B, H, T, D)
            self.k[layer].scatter_(2, index, k)
            self.v[layer].scatter_(2, index, v)
        if self.is_prefill:
            return k, v
        return self.k[layer][:, :, : self.visible], self.v[layer][:, :, : self.visible]

    def share(self, n, new_tokens):
        """After prefill: n rows continue each row, row b becoming rows b*n .. b*n + n-1. The
        prompt's keys and values stay once per prompt (shared_prompt_attention), and each row's
        next new_tokens tokens go to columns of its own. A rolling or static cache is copied."""
        if self.window is not None or self.static:
            return self.repeat_interleave(n)
        L = self.length
        self.prompt_k = [t[:, :, :L].contiguous() for t in self.k]
        self.prompt_v = [t[:, :, :L].contiguous() for t in self.v]
        # position p is in slot p: a row's prompt fills the slots up to its last position
        self.prompt_visible = torch.arange(L, device=self.slots.device) <= self.slots[:, -1:]  # (P, L)
        P, H, _, D = self.k[0].shape
        self.k = [t.new_zeros(P * n, H, new_tokens, D) for t in self.k]
        self.v = [t.new_zeros(P * n, H, new_tokens, D) for t in self.v]
        self.group, self.batch_size = n, P * n

    def repeat_interleave(self, n):
        """After prefill: n copies of every row, row b becoming rows b*n .. b*n + n-1."""
        self.k = [t.repeat_interleave(n, dim=0) for t in self.k]
        self.v = [t.repeat_interleave(n, dim=0) for t in self.v]
        self.batch_size *= n

    def nbytes(self):
        held = [] if self.k is None else self.k + (self.prompt_k if self.group else [])
        return sum(2 * t.numel() * t.element_size() for t in held)


class PrefixKV:
    """A Prefix's keys and values in every layer for one forward, kept in the autograd graph (a
    KVCache is written in place): the prefix's pass records them, the rows' pass reads its group's."""

    group = 0  # rows reading a prompt held once in decoding (KVCache.share): not here

    def __init__(self, prefix):
        self.prefix, self.k, self.v, self.recording = prefix, [], [], True

    def update(self, layer, k, v):
        if self.recording:
            self.k.append(k)
            self.v.append(v)
            return k, v
        return (torch.cat((self.prefix.per_row(self.k[layer]), k), dim=2),
                torch.cat((self.prefix.per_row(self.v[layer]), v), dim=2))


LOGPROB_CHUNK = 2**24  # float32 logits (64 MB) per chunk in GPT.logprobs


# -----------------------------------------------------------------------------
# LoRA

# A target names linear layers by their role (linear_role): "mlp.c_fc" is every dense, expert and
# shared expert c_fc; "c_q" is short for attn.c_q (c_proj alone is ambiguous); "attn" and "mlp" are
# all their roles. The router is adapted only when named: that changes which experts a token uses.
LORA_TARGETS = ("c_q", "c_k", "c_v", "attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj",
                "c_fc", "c_gate", "mlp.c_fc", "mlp.c_gate", "mlp.c_proj",  # c_gate: swiglu only
                "router", "lm_head", "attn", "mlp")  # router: MoE only; lm_head: untied only
_LORA_SHORT = {"c_q": "attn.c_q", "c_k": "attn.c_k", "c_v": "attn.c_v", "c_fc": "mlp.c_fc", "c_gate": "mlp.c_gate"}


def linear_role(name):
    """The LoRA role of the linear layer at module path `name` (see LORA_TARGETS), or None.
    h.3.attn.c_q -> attn.c_q; h.3.mlp.c_fc and h.3.mlp.experts.5.c_fc -> mlp.c_fc;
    h.3.mlp.router -> router; lm_head -> lm_head."""
    parts = name.split(".")
    if name == "lm_head":
        return "lm_head"
    if "attn" in parts:
        return "attn." + parts[-1]
    if parts[-1] == "router":
        return "router"
    if "mlp" in parts:
        return "mlp." + parts[-1]
    return None


def lora_target_matches(target, role):
    target = _LORA_SHORT.get(target, target)
    return role is not None and (target == role or (target in ("attn", "mlp") and role.startswith(target + ".")))


class LoRALinear(Linear):
    """A linear layer whose weight W stays frozen while it learns a low-rank update:

        y = x W^T + b + scale * dropout(x) A^T B^T,   A (r, in), B (out, r), scale = alpha / r

    B starts at zero, so at first the layer computes what W alone does. It takes over an existing
    nn.Linear's weight and bias: the keys stay c_q.weight and c_q.bias, beside c_q.lora_A, c_q.lora_B.
    merge() folds scale B A into W and keeps the original aside: unmerge restores it bit for bit
    (W + BA - BA is not W in bf16), and the state dict always holds the original W, so a merged
    model's loads back without applying the adapters twice. enabled = False computes W alone.
    """

    def __init__(self, base, rank, alpha, dropout):
        nn.Module.__init__(self)  # not nn.Linear.__init__, which would allocate a second weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.rank, self.scale = rank, alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        self.lora_dropout = Dropout(dropout)
        self.merged = False  # True while scale * B A is folded into the weight
        self.enabled = True  # False: the adapter is skipped (adapters_off)
        self._base_weight = None  # the original W while merged
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        if self.merged and not self.enabled:
            return linear(x, self._base_weight, self.bias)
        y = linear(x, self.weight, self.bias)
        if self.merged or not self.enabled:
            return y
        # two thin matmuls through the rank-r bottleneck; B A itself (out x in) is never formed
        return y + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scale

    def delta_weight(self):
        """scale * B A (out, in), computed in at least float32."""
        return upcast(self.lora_B) @ upcast(self.lora_A) * self.scale

    @torch.no_grad()
    def merge(self):
        if self.merged:
            raise RuntimeError("LoRA: the adapters are already merged into the weights")
        self._base_weight = self.weight.detach().clone()
        # add in float32 and round once, not once per operand, when the weights are bf16
        self.weight.copy_(upcast(self.weight) + self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            raise RuntimeError("LoRA: the adapters are not merged")
        self.weight.copy_(self._base_weight)  # exactly W again: subtracting B A would round
        self._base_weight = None
        self.merged = False

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:  # the state dict holds W, never W + scale B A beside the adapters
            destination[prefix + "weight"] = self._base_weight

    def extra_repr(self):
        return f"{super().extra_repr()}, rank={self.rank}, scale={self.scale:g}, merged={self.merged}"


def is_lora_key(key):
    return key.endswith((".lora_A", ".lora_B"))


def add_lora(model):
    """Put a LoRALinear around every nn.Linear that lora_targets name (GPT.__init__ calls this), then
    freeze every parameter but the adapters' and a scalar head's (new to the model, it trains in full)."""
    cfg = model.config
    matched = set()
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        hits = [t for t in cfg.lora_targets if lora_target_matches(t, linear_role(name))]
        if hits:
            parent, _, child = name.rpartition(".")
            lora = LoRALinear(module, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
            setattr(model.get_submodule(parent), child, lora)
            matched.update(hits)
    unmatched = [t for t in cfg.lora_targets if t not in matched]
    if unmatched:
        raise ValueError(f"LoRA: lora_targets {unmatched} name no nn.Linear in this model")
    for name, p in model.named_parameters():
        p.requires_grad = is_lora_key(name) or name.startswith("score_head.")


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge_lora(model):
    """Fold every adapter into its weight (W += scale B A), for inference at the plain cost. Train
    only unmerged: merged, the adapters get no gradient. A quantized base has no full-precision
    weight to fold into (convert.merged_state_dict dequantizes for an export)."""
    if model.quantization:
        raise ValueError(f"merge_lora: the base weights are int{model.quantization['bits']} (quantize.py): "
                         "use convert.merged_state_dict(model) for the merged weights, dequantized")
    for layer in lora_layers(model):
        layer.merge()


def unmerge_lora(model):
    """Undo merge_lora: every adapted weight is restored bit for bit."""
    for layer in lora_layers(model):
        layer.unmerge()


@contextlib.contextmanager
def adapters_off(model):
    """Inside, every LoRA adapter is skipped, merged or not: the RL stages' reference of a LoRA
    policy, at no memory cost."""
    layers = lora_layers(model)
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.enabled = True


# -----------------------------------------------------------------------------
# the model


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        if config.pos_emb == "learned":
            self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.ln_f = make_norm(config)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight
        self.score_head = nn.Linear(config.n_embd, 1, bias=True) if config.scalar_head else None
        self.apply(self._init_weights)
        # GPT-2: the two projections per layer into the residual stream are scaled by
        # 1/sqrt(2 n_layer), so the stream's variance does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        self.compiled_decode_step = None  # set by autotune.compile_decode where it measures faster
        # recompute each block, and the loss in chunks, in the backward pass (see body and loss)
        self.grad_checkpointing = False
        self.quantization = None  # set by quantize.quantize: {bits, group_size, quantize_head, format}
        if config.lora_rank > 0:
            add_lora(self)  # after the base init, so a seed gives the same base weights either way

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # --- forward: the hidden states ---------------------------------------------

    def forward(self, idx, pos=None, cache=None, prefix=None):
        """idx (B, T) token ids -> the final hidden states (B, T, n_embd), after the last norm.

        pos (B, T): each token's position; None means 0..T-1 in every row. Negative = padding.
        cache: a KVCache to fill (prefill, the whole prompt) or to extend (one token per row).
        prefix: a sampling.Prefix, columns before idx's that groups of rows share, run once per group; idx's
            columns get the hidden states a forward of the whole rows gives them (to rounding).
            Needs pos; a MoE's balancing terms (aux_loss) then cover idx's tokens only.
        """
        cfg = self.config
        B, T = idx.shape
        # block_size bounds positions, not columns: a left-padded batch may be wider
        if T > cfg.block_size and not cfg.unbounded_positions and (pos is None or int(pos.max()) >= cfg.block_size):
            raise ValueError(f"sequence length {T} exceeds block_size {cfg.block_size}")
        p = pos if pos is not None else torch.arange(T, device=idx.device)[None]
        if prefix is not None and prefix.idx.size(1) > 0:
            if cache is not None or pos is None:
                raise ValueError("a forward with a prefix takes the positions of its columns (pos) and no KV cache")
            # the shared columns once per group, keeping every layer's keys and values with their graph
            cache = PrefixKV(prefix)
            S = prefix.idx.size(1)
            self.body(prefix.idx, prefix.pos, attention_mask(prefix.pos, S, cfg.sliding_window, cfg.n_sink,
                                                             idx.device), cache)
            cache.recording = False
            key_pos = torch.cat((prefix.per_row(prefix.pos), pos), dim=1)  # (B, S + T)
            mask = attention_mask(pos, T, cfg.sliding_window, cfg.n_sink, idx.device, key_pos)
        elif cache is not None and cache.k is not None:  # decode: one new token per row
            if T != 1:
                raise ValueError("a KV cache that already holds a prompt takes one token per step")
            mask = cache.begin(p.expand(B, T))
        else:
            mask = attention_mask(pos, T, cfg.sliding_window, cfg.n_sink, idx.device)
            if cache is not None:  # prefill: the prompt fills the cache
                cache.begin(p.expand(B, T))
        return self.ln_f(self.body(idx, p, mask, cache))

    def body(self, idx, pos, mask, cache):
        """The embeddings and every block, before the last norm: forward's trunk, for tokens idx
        (B, T) at positions pos (B, T) under the attention mask, reading and writing cache."""
        cfg = self.config
        x = self.wte(idx)  # (B, T, C)
        if cfg.pos_emb == "learned":
            x = x + self.wpe(pos.clamp(min=0))
        elif cfg.pos_emb == "sinusoidal":
            x = x + sinusoidal_embedding(pos, cfg.n_embd, x.dtype)
        rope = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, x.dtype) if cfg.pos_emb == "rope" else None
        x = self.drop(x)
        for block in self.h:
            if self.grad_checkpointing and torch.is_grad_enabled() and cache is None:
                x = torch.utils.checkpoint.checkpoint(block, x, rope, mask, cache, use_reentrant=False)
            else:
                x = block(x, rope, mask, cache)
        return x

    # --- the heads, on the hidden states x of forward -----------------------------

    def logits(self, x):
        """x (..., n_embd) -> the logits (..., vocab_size)."""
        return self.lm_head(x)

    def loss(self, x, targets):
        """The mean cross-entropy of the next-token targets (B, T), -1 where no loss is taken (a MoE's
        balancing terms are aux_loss(), which the training step adds). With grad_checkpointing it
        is taken in chunks (logprobs), so the batch's float32 logits never exist at once."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            logp, _ = self.logprobs(x, targets)
            return -logp.sum() / (targets >= 0).sum()
        return cross_entropy(self.logits(x), targets)

    def logprobs(self, x, targets, temperature=1.0, vocab_limit=None, entropy=False):
        """Per-token log-probabilities of targets (B, T), 0 where targets == -1, and the entropy of
        the same distribution (or None):

            logprobs[b, t] = log softmax(logits[b, t, :vocab_limit] / temperature)[targets[b, t]]

        The RL stages pass the temperature and vocab_limit they sampled with, so the ratio and the
        KL are those of the distribution the tokens were drawn from. entropy: False, True (with its
        graph, for an entropy bonus) or "log" (detached). Only positions with a target go through
        the head, in chunks of rows, each recomputed in the backward pass rather than kept."""
        if temperature <= 0:
            raise ValueError(f"log-probs need the sampling temperature > 0, got {temperature} "
                             "(greedy decoding has no distribution to score)")
        B, T, C = x.shape
        V = self.config.vocab_size if vocab_limit is None else min(vocab_limit, self.config.vocab_size)
        keep = targets.reshape(B * T) >= 0
        x, targets = x.reshape(B * T, C)[keep], targets.reshape(B * T)[keep]  # (K, C), (K,)

        def chunk(xc, tc):
            logits = upcast(self.lm_head(xc))[:, :V] / temperature
            lse = torch.logsumexp(logits, dim=-1)
            logp = logits.gather(1, tc[:, None]).squeeze(1) - lse
            if not entropy:
                return logp, None
            with torch.set_grad_enabled(torch.is_grad_enabled() and entropy is True):
                lg, lz = (logits, lse) if entropy is True else (logits.detach(), lse.detach())
                ent = lz - (torch.exp(lg - lz[:, None]) * lg).sum(-1)  # -sum p log p, log p = lg - lz
            return logp, ent

        rows = max(1, LOGPROB_CHUNK // V)
        outs = []
        for i in range(0, max(len(x), 1), rows):
            xc, tc = x[i : i + rows], targets[i : i + rows]
            if torch.is_grad_enabled() and len(x) > rows:
                outs.append(torch.utils.checkpoint.checkpoint(chunk, xc, tc, use_reentrant=False))
            else:
                outs.append(chunk(xc, tc))
        logp = torch.cat([o[0] for o in outs])
        logp = logp.new_zeros(B * T).masked_scatter(keep, logp).view(B, T)
        ent = None
        if entropy:
            ent = torch.cat([o[1] for o in outs])
            ent = ent.new_zeros(B * T).masked_scatter(keep, ent).view(B, T)
        return logp, ent

    def scores(self, x, last=None):
        """The scalar head, in at least float32: (B, T), a score at every position (PPO's values),
        or with last (B,) the score at each row's index last -> (B,) (a reward model's, at the last
        real token: sampling.last_index(mask))."""
        if self.score_head is None:
            raise RuntimeError("this model has no scalar head (GPTConfig.scalar_head=False)")
        if last is not None:
            x = x[torch.arange(x.size(0), device=x.device), last]
        return upcast(self.score_head(x)).squeeze(-1)

    def moe_layers(self):
        return [block.mlp for block in self.h if isinstance(block.mlp, MoE)]

    def aux_loss(self):
        """The auxiliary losses of the last forward, which training steps add: moe_aux_coef times the
        load-balancing loss plus moe_z_coef times the router z-loss, means over the MoE layers; 0.0
        for a dense model."""
        moe = self.moe_layers()
        if not moe or moe[0].aux_loss is None:
            return 0.0
        cfg = self.config
        return (cfg.moe_aux_coef * sum(m.aux_loss for m in moe) + cfg.moe_z_coef * sum(m.z_loss for m in moe)) / len(moe)

    def moe_stats(self):
        """Routing statistics of the last forward for the log (None without MoE): aux_loss, z_loss;
        load, per MoE layer the fraction of routed pairs each expert got; load_cv, the mean over
        layers of load's std / mean (0 = even)."""
        moe = self.moe_layers()
        if not moe or moe[0].load is None:
            return None
        load = torch.stack([m.load for m in moe])  # (n_moe_layer, n_expert)
        cv = load.std(dim=-1, correction=0) / load.mean(dim=-1)
        return dict(aux_loss=sum(m.aux_loss.item() for m in moe) / len(moe),
                    z_loss=sum(m.z_loss.item() for m in moe) / len(moe),
                    load=load.tolist(), load_cv=cv.mean().item())

    # --- generation ------------------------------------------------------------

    def prefill(self, idx, pos, cache):
        """The prompts (B, T), filling the cache -> logits (B, vocab_size) of each row's next token."""
        return self.logits(self(idx, pos, cache)[:, -1])  # left padding puts every row's newest token last

    def decode_step(self, token, pos, cache):
        """One new token per row (B, 1) at pos (B, 1) -> logits (B, vocab_size) of the next."""
        return self.logits(self(token, pos, cache)[:, -1])

    @torch.no_grad()
    def generate_tokens(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                        use_cache=True, generator=None, pos=None, vocab_limit=None, num_samples=1, last_pos=None):
        """Yield (next_token (N,), logits (N, vocab_size)) for each of max_new_tokens steps, with
        N = B * num_samples: sample g of prompt b is row b * num_samples + g.

        With use_cache, one prefill per prompt, then one token per row per step against the KV
        cache (the samples of a prompt share its keys and values, KVCache.share). Without it, every
        step recomputes the whole context: the reference the cached path must match. Past
        block_size, without a rolling cache, both crop the context to the last block_size tokens.
        last_pos (N,): the last position each row may take; a row there stays at it (drawing filler,
        which complete() masks), so rows with budgets of their own never leave block_size.
        """
        cfg = self.config
        compiled = self.compiled_decode_step
        decode = compiled or self.decode_step
        was_training = self.training
        self.eval()
        B, L = idx.shape
        if pos is None:
            pos = torch.arange(L, device=idx.device)[None].expand(B, L)
        tokens, cache = idx, None
        # the largest position of any row so far, which block_size bounds
        top, cap = L - 1, None if last_pos is None else int(last_pos.max())
        if num_samples > 1 and not (use_cache and (L <= cfg.block_size or cfg.unbounded_positions)):
            # no prefill to share: the samples start as copies of their prompt
            tokens, pos = idx.repeat_interleave(num_samples, 0), pos.repeat_interleave(num_samples, 0)
        try:
            for _ in range(max_new_tokens):
                if use_cache and (top < cfg.block_size or cfg.unbounded_positions):
                    if cache is None:
                        max_len = L + max_new_tokens
                        if not cfg.unbounded_positions:
                            max_len = min(max_len, cfg.block_size)
                        cache = KVCache(cfg, B, max_len, static=compiled is not None)
                        logits = self.prefill(tokens, pos, cache)
                        if num_samples > 1:
                            cache.share(num_samples, min(max_new_tokens, cfg.block_size))
                            logits = logits.repeat_interleave(num_samples, 0)
                            tokens, pos = tokens.repeat_interleave(num_samples, 0), pos.repeat_interleave(num_samples, 0)
                    else:
                        logits = decode(tokens[:, -1:], pos[:, -1:], cache)
                        if compiled is not None:
                            # CUDA graphs reuse the output buffer, and the caller may still hold it
                            logits = logits.clone()
                else:
                    ctx, ctx_pos = tokens, pos
                    if top >= cfg.block_size and not cfg.unbounded_positions:
                        ctx, ctx_pos = tokens[:, -cfg.block_size:], pos[:, -cfg.block_size:]
                        ctx_pos = ctx_pos - ctx_pos[:, :1].clamp(min=0)  # each row restarts at 0
                    logits = self.logits(self(ctx, ctx_pos)[:, -1])
                next_token = sample_next(logits, temperature, top_k, top_p, generator, vocab_limit)
                yield next_token, logits
                tokens = torch.cat((tokens, next_token[:, None]), dim=1)
                step = pos[:, -1:] + 1
                pos = torch.cat((pos, step if last_pos is None else torch.minimum(step, last_pos[:, None])), dim=1)
                top = top + 1 if cap is None else min(top + 1, cap)
        finally:
            self.train(was_training)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 use_cache=True, eos_token=None, generator=None, vocab_limit=None, num_samples=1):
        """Continue prompts by max_new_tokens sampled tokens.

        idx (B, T) LongTensor -> (B * num_samples, T + max_new_tokens). With eos_token (an id, or
            several: any of them stops a row), a row that has produced it is filled with that
            token afterwards, and generation stops once every row has.
        idx a list of 1-D LongTensors (mixed lengths, generated together, left-padded) -> a list
            of 1-D tensors, each its prompt and its completion (up to and including its stop).
        num_samples: completions per prompt, sample g of prompt b in row (or item) b * num_samples
            + g. temperature 0 is greedy; vocab_limit keeps a padded vocabulary's padding ids from
            being drawn. For RL rollouts, complete() returns the masks as well.
        """
        as_list = isinstance(idx, (list, tuple))
        out = self.complete(idx if as_list else list(idx), max_new_tokens, num_samples, temperature, top_k, top_p,
                            stop_tokens=() if eos_token is None else eos_token, generator=generator,
                            vocab_limit=vocab_limit, use_cache=use_cache, fill_after_stop=True, within_block=False)
        if not as_list:
            return out.idx[:, out.prompt_len - idx.size(1):]  # idx had no padding: drop none of it
        prompts = [p for p in idx for _ in range(num_samples)]
        return [torch.cat((p, row[out.prompt_len:][m[out.prompt_len:]]))
                for p, row, m in zip(prompts, out.idx, out.mask)]

    @torch.no_grad()
    def complete(self, prompts, max_new_tokens, num_samples=1, temperature=1.0, top_k=None, top_p=None,
                 stop_tokens=(), generator=None, vocab_limit=None, use_cache=True, fill_after_stop=False,
                 within_block=True):
        """Sample num_samples completions of each prompt (a list of 1-D LongTensors) in one batch,
        each row stopping at the first of stop_tokens (an id or several) it draws, after
        max_new_tokens, or (within_block, bounded positions) when its sequence fills block_size,
        so a long prompt gets a shorter completion rather than none. -> Completions:

            idx (N, L + T)  each prompt left-padded to the longest (L), then its completion; the
                            tokens after a row's stop are filler (its stop token repeated, when
                            fill_after_stop, else 0)
            pos (N, L + T)  positions, negative on the left padding and on the filler
            mask (N, L + T) True on the completion's tokens up to and including its stop token
            truncated (N,)  True where the budget ran out before a stop token
            prompt_len      L

        with N = len(prompts) * num_samples, sample g of prompt p in row p * num_samples + g, and
        T the longest completion. The log-probs of the completions are then
        logprobs(self(idx[:, :-1], pos[:, :-1]), Completions.targets(), temperature, vocab_limit)."""
        device = prompts[0].device
        stops = torch.tensor([stop_tokens] if isinstance(stop_tokens, int) else list(stop_tokens),
                             dtype=torch.long, device=device)
        lengths = torch.tensor([len(p) for p in prompts], device=device).repeat_interleave(num_samples)
        budget, last_pos = None, None
        if within_block and not self.config.unbounded_positions:
            budget = (self.config.block_size - lengths).clamp(max=max_new_tokens)  # (N,)
            if int(budget.min()) < 1:
                raise ValueError(f"a prompt of {int(lengths.max())} tokens leaves no room in block_size "
                                 f"{self.config.block_size} for a completion")
            last_pos = lengths + budget - 1
            max_new_tokens = int(budget.max())
        idx, pos = left_pad(prompts)
        N, L = idx.size(0) * num_samples, idx.size(1)
        done = torch.zeros(N, dtype=torch.bool, device=device)
        stopped = torch.zeros(N, dtype=torch.bool, device=device)
        new, live = [], []
        for t, (token, _) in enumerate(self.generate_tokens(idx, max_new_tokens, temperature, top_k, top_p, use_cache,
                                                            generator, pos, vocab_limit, num_samples, last_pos)):
            live.append(~done)  # this row had not stopped before this token: it is the row's own
            if fill_after_stop and new:
                token = torch.where(done, new[-1], token)
            elif new:
                token = token.masked_fill(done, 0)
            new.append(token)
            hit = torch.isin(token, stops) & ~done
            stopped |= hit
            done = done | hit if budget is None else done | hit | (budget <= t + 1)
            if bool(done.all()):
                break
        T = len(new)
        gen = torch.stack(new, dim=1) if new else idx.new_zeros(N, 0)
        gen_mask = torch.stack(live, dim=1) if live else torch.zeros(N, 0, dtype=torch.bool, device=device)
        idx = torch.cat((idx.repeat_interleave(num_samples, 0), gen), dim=1)
        pos = pos.repeat_interleave(num_samples, 0)
        gen_pos = (pos[:, -1:] + 1 + torch.arange(T, device=device)).masked_fill(~gen_mask, -1)  # filler: padding
        pos = torch.cat((pos, gen_pos), dim=1)
        mask = torch.cat((torch.zeros(N, L, dtype=torch.bool, device=device), gen_mask), dim=1)
        return Completions(idx=idx, pos=pos, mask=mask, truncated=~stopped, prompt_len=L, num_samples=num_samples)

    # --- sizes, FLOPs, optimizer -----------------------------------------------

    def num_params(self, non_embedding=True, active=False):
        """Parameters, each shared tensor once, a quantized weight as the numbers it stands for.
        non_embedding leaves out the position table (nanoGPT's rule); active counts only the
        n_expert_active routed experts a token uses."""
        n = count_weights(self)
        if self.config.tie_weights and not isinstance(self.lm_head.weight, torch.Tensor):
            n -= self.lm_head.weight.numel()  # a quantized copy of the tied table: the same weights
        if non_embedding and self.config.pos_emb == "learned":
            n -= self.wpe.weight.numel()
        if active:
            for moe in self.moe_layers():
                n -= (moe.n_expert - moe.k) * count_weights(moe.experts[0])
        return n

    def flops_per_token(self, T=None):
        """Training FLOPs per token for sequences of length T: 6 per active weight (2 forward, 4
        backward; 4 for a frozen one, whose gradient is never computed) plus attention's QK^T and
        AV (the PaLM paper's appendix)."""
        cfg = self.config
        T = cfg.block_size if T is None else T
        context = T if cfg.sliding_window is None else min(T, cfg.sliding_window + cfg.n_sink)
        n_active = self.num_params(active=True)
        n_frozen = 0
        if cfg.lora_rank or self.quantization:
            n_frozen = self.num_params(non_embedding=False) - sum(p.numel() for p in self.parameters() if p.requires_grad)
        return 6 * n_active - 2 * min(n_frozen, n_active) + 12 * cfg.n_layer * cfg.n_embd * context

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, head_lr_scale=1.0):
        """AdamW over the trainable parameters: weight decay on matrices that multiply activations,
        none on norms, biases, untied embedding tables and LoRA adapters. A scalar head (PPO's value
        head) may learn at head_lr_scale times the rate; each group's lr_scale is for common.set_lr."""
        embeddings = {id(self.wte.weight)} if not self.config.tie_weights else set()
        if self.config.pos_emb == "learned":
            embeddings.add(id(self.wpe.weight))
        # LoRA adapters: the rank already bounds the update, and decay would shrink A toward zero
        exempt = embeddings | {id(p) for n, p in self.named_parameters() if is_lora_key(n)}
        head = {id(p) for p in self.score_head.parameters()} if self.score_head is not None and head_lr_scale != 1.0 else set()
        params = [p for p in self.parameters() if p.requires_grad and id(p) not in head]
        decay = [p for p in params if p.dim() >= 2 and id(p) not in exempt]
        no_decay = [p for p in params if p.dim() < 2 or id(p) in exempt]
        groups = [{"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
                  {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]
        if head:
            groups.append({"params": list(self.score_head.parameters()), "weight_decay": 0.0, "lr_scale": head_lr_scale,
                           "lr": learning_rate * head_lr_scale})
        fused = device_type == "cuda"
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)
