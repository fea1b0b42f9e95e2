"""
The one GPT of this repository: a decoder-only transformer whose variants are switches in GPTConfig.

    positional encoding   pos_emb = learned | sinusoidal | rope | none
    normalisation         norm = layernorm | rmsnorm, with norm_eps
    feed-forward          mlp = gelu | swiglu, of n_inner hidden units (gelu_approximate = tanh: GPT-2's)
    attention             n_kv_head < n_head gives grouped-query attention (1: multi-query);
                          sliding_window = W with n_sink attention sinks
    weight tying          tie_weights
    mixture-of-experts    n_expert > 0 routes each token to the top n_expert_active expert MLPs, in
                          every moe_every-th layer, plus n_shared_expert experts every token uses
    low-rank adapters     lora_rank > 0 trains LoRA adapters on the layers in lora_targets
    scalar head           scalar_head adds a linear head to one number per position (reward, value)

Every stage imports it: train.py and sft.py call forward(idx, targets); sample.py and the RL stages
call generate() with a pre-allocated KV cache; reward modelling and PPO read per-token log-probs
(logprobs) and the final hidden states (forward(..., hidden=True)) for a scalar head.

LoRA. With lora_rank = r > 0 the linear layers named in lora_targets learn a low-rank update
W + (alpha/r) B A next to their frozen weight, and every other parameter is frozen. Base
checkpoints load unchanged (load_base_weights), adapters save and load on their own
(lora_state_dict, load_lora_state_dict), and merge_lora folds them into the weights.

Weights from elsewhere. from_nanogpt reads a nanoGPT checkpoint; from_hf a Hugging Face folder
of GPT2LMHeadModel or LlamaForCausalLM (config.json + model.safetensors), and save_hf writes one
that transformers loads. What the other side cannot compute exactly is refused by name.

Positions. Every forward takes, optionally, `pos` (B, T): the position of each token in its own
sequence. A left-padded batch of prompts has negative positions on its padding; such columns are
never attended to. Attention is a mask over positions, the same rule in training and decoding:

    query at position i sees key at position j  <=>  0 <= j <= i  and  (i - j < W  or  j < n_sink)

The KV cache. Per layer, keys and values are allocated once, (B, n_kv_head, S, head_dim), and
written in place; keys are stored with RoPE already applied. Position p lives in slot p, or with a
sliding window in a rolling buffer of S = n_sink + W slots: the sinks keep slots 0..n_sink-1
forever and position p >= n_sink goes to slot n_sink + (p - n_sink) % W. The ring then always
holds exactly the last W positions, so at decode time "slot s was written" is the whole mask.

Positions stay absolute, sinks included: a query at position 10,000 sees sink 0 at distance
10,000, which no training sequence of block_size tokens showed it. StreamingLLM instead renumbers
positions inside the cache so that distances stay within what training saw; we keep the rule
above so that the rolling cache computes exactly what a full forward under the same mask
computes, at any length (tested at 16 x block_size), and leave renumbering to a future switch.
"""

import contextlib
import json
import math
import os
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch.nn import functional as F

# scaled_dot_product_attention's enable_gqa came in torch 2.5; say so at import rather than fail in
# the middle of a forward with a TypeError about an unexpected keyword
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
    # Mixture-of-Experts: the MLP of layer i (0-based) is a routed set of experts when
    # (i + 1) % moe_every == 0, so moe_every=2 makes layers 1, 3, 5, ... MoE and the others dense
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
    # a linear head r = w . h + b on the final hidden states, beside the LM head: a reward model
    # reads it at the last real token of a sequence, PPO's value function at every completion token
    scalar_head: bool = False

    def __post_init__(self):
        def fail(msg):
            raise ValueError(f"GPTConfig: {msg}")

        for f in fields(self):  # types first: sliding_window=4.0 must fail here, not deep in generate
            v = getattr(self, f.name)
            if v is None and f.default is None:
                continue  # an optional field left unset
            if f.type is int and (not isinstance(v, int) or isinstance(v, bool)):
                fail(f"{f.name} must be an int, got {v!r}")
            if f.type is float:
                if not isinstance(v, (int, float)) or isinstance(v, bool):
                    fail(f"{f.name} must be a number, got {v!r}")
                setattr(self, f.name, float(v))
            if f.type in (bool, str) and not isinstance(v, f.type):
                fail(f"{f.name} must be a {f.type.__name__}, got {v!r}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                fail(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.n_embd % self.n_head:
            fail(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            fail(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if self.pos_emb not in ("learned", "sinusoidal", "rope", "none"):
            fail(f"pos_emb must be learned | sinusoidal | rope | none, got {self.pos_emb!r}")
        if self.pos_emb == "rope" and self.head_dim % 2:
            fail(f"rope needs an even head size, got n_embd/n_head = {self.head_dim}")
        if self.pos_emb == "sinusoidal" and self.n_embd % 2:
            fail(f"sinusoidal positions need an even n_embd, got {self.n_embd}")
        if self.rope_theta <= 0:
            fail(f"rope_theta must be > 0, got {self.rope_theta}")
        if self.norm not in ("layernorm", "rmsnorm"):
            fail(f"norm must be layernorm | rmsnorm, got {self.norm!r}")
        if self.mlp not in ("gelu", "swiglu"):
            fail(f"mlp must be gelu | swiglu, got {self.mlp!r}")
        if not self.norm_eps > 0:
            fail(f"norm_eps must be > 0, got {self.norm_eps}")
        if self.gelu_approximate not in ("none", "tanh"):
            fail(f"gelu_approximate must be none | tanh, got {self.gelu_approximate!r}")
        if self.gelu_approximate != "none" and self.mlp != "gelu":
            fail(f"gelu_approximate={self.gelu_approximate!r} needs mlp=gelu, not mlp={self.mlp}")
        n_inner = self.n_inner
        if n_inner is not None and (isinstance(n_inner, bool) or not isinstance(n_inner, int) or n_inner < 1):
            fail(f"n_inner must be None or an int >= 1, got {self.n_inner!r}")
        if not 0.0 <= self.dropout < 1.0:
            fail(f"dropout must be in [0, 1), got {self.dropout}")
        if self.sliding_window is not None and self.sliding_window < 1:
            fail(f"sliding_window must be None or >= 1, got {self.sliding_window}")
        if self.n_sink < 0:
            fail(f"n_sink must be >= 0, got {self.n_sink}")
        if self.n_sink and self.sliding_window is None:
            fail("n_sink only makes sense with a sliding_window")
        if self.n_expert < 0:
            fail(f"n_expert must be >= 0 (0 = dense), got {self.n_expert}")
        if self.moe_every < 1:
            fail(f"moe_every must be >= 1, got {self.moe_every}")
        if self.n_shared_expert < 0:
            fail(f"n_shared_expert must be >= 0, got {self.n_shared_expert}")
        if self.expert_hidden is not None and self.expert_hidden < 1:
            fail(f"expert_hidden must be None or >= 1, got {self.expert_hidden}")
        for name in ("moe_aux_coef", "moe_z_coef"):
            if getattr(self, name) < 0:
                fail(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.n_expert == 0 and self.n_shared_expert:
            fail("n_shared_expert needs routed experts too (n_expert > 0)")
        if self.n_expert > 0:
            if not 1 <= self.n_expert_active <= self.n_expert:
                fail(f"n_expert_active must be in 1..n_expert={self.n_expert}, got {self.n_expert_active}")
            if self.moe_every > self.n_layer:
                fail(f"moe_every={self.moe_every} > n_layer={self.n_layer} leaves no layer MoE")
            if self.expert_hidden is None:
                # A token goes through n_expert_active + n_shared_expert experts, so split the
                # dense hidden size between them: active parameters per token then match the
                # dense model's. Rounded up to a multiple of 8 for friendlier matmul shapes.
                n_used = self.n_expert_active + self.n_shared_expert
                self.expert_hidden = 8 * math.ceil(self.mlp_hidden / n_used / 8)
        # LoRA: targets are checked even when lora_rank is 0, so a typo never waits for the day
        # LoRA is switched on; a list (from JSON) or "c_q,c_v" (by hand) becomes a tuple
        if isinstance(self.lora_targets, str):
            self.lora_targets = tuple(t for t in self.lora_targets.split(",") if t)
        self.lora_targets = tuple(self.lora_targets)
        for t in self.lora_targets:
            if t == "c_proj":
                fail("lora_targets: 'c_proj' is ambiguous, say 'attn.c_proj' or 'mlp.c_proj'")
            if t not in LORA_TARGETS:
                fail(f"lora_targets: unknown target {t!r}, expected some of {', '.join(LORA_TARGETS)}")
        if self.lora_rank < 0:
            fail(f"lora_rank must be >= 0 (0 = off), got {self.lora_rank}")
        if self.lora_rank > 0:
            if not self.lora_targets:
                fail("lora_rank > 0 needs at least one name in lora_targets")
            alpha = self.lora_alpha
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
                fail(f"lora_alpha must be a number > 0, got {alpha!r}")
            if not 0.0 <= self.lora_dropout < 1.0:
                fail(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
            if self.mlp != "swiglu" and {"c_gate", "mlp.c_gate"} & set(self.lora_targets):
                fail(f"lora_targets: c_gate exists only with mlp=swiglu, not mlp={self.mlp}")
            if self.tie_weights and "lm_head" in self.lora_targets:
                # the head's weight is the token embedding: merging its adapter would change the
                # embedding too, so the merged model would no longer compute what was trained
                fail("lora_targets: lm_head needs tie_weights=False (a tied head is the embedding)")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self):
        # gelu: the classic 4x. swiglu has three matrices instead of two, so 2/3 of 4x keeps the
        # parameter count equal; rounded up to a multiple of 64 for friendlier matmul shapes.
        # A checkpoint from elsewhere (Llama's intermediate_size) states its own: n_inner.
        if self.n_inner is not None:
            return self.n_inner
        if self.mlp == "gelu":
            return 4 * self.n_embd
        return 64 * math.ceil(8 * self.n_embd / 3 / 64)

    def is_moe_layer(self, layer_idx):
        return self.n_expert > 0 and (layer_idx + 1) % self.moe_every == 0

    @property
    def unbounded_positions(self):
        """True when generation may run past block_size: a rolling cache and positions that are
        not a table of block_size rows."""
        return self.sliding_window is not None and self.pos_emb in ("rope", "none")

    def to_dict(self):
        return asdict(self)


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


# Decoding one row is a chain of matrix-vector products, bound by how fast the weights stream from
# memory. Whether PyTorch's own F.linear does that well depends on the CPU: on an AMD EPYC its MKL
# ran them on one thread at a fraction of the bandwidth, and cutting the weight's rows into one block
# per thread and running the blocks with bmm was 2-3x faster; on an Intel Xeon with large caches the
# same trick was 2x slower. So nothing is assumed: the first time a weight shape is used for a
# decode-sized matmul (at most 8 rows, on a CPU, without gradients, more than one thread), both
# paths are timed on that very weight, alternating, and the faster is kept for the rest of the
# process, the split path only when its median time is below 0.9 of the plain one's (beyond noise).
# LINEAR_PATHS holds the choices (bench.py prints them); set an entry, or LINEAR_FORCE to "plain" or
# "split", to override the measurement.
LINEAR_PATHS = {}  # (out, in, rows, dtype, threads) -> "split" | "plain"
LINEAR_FORCE = None  # None (measure) | "plain" | "split"


def _split_linear(x, weight, bias, n):
    rows = x.numel() // x.size(-1)
    x2 = x.reshape(rows, x.size(-1))
    y = torch.bmm(weight.view(n, -1, weight.size(1)), x2.t().expand(n, -1, -1))  # (n, out/n, rows)
    y = y.reshape(weight.size(0), rows).t().reshape(*x.shape[:-1], weight.size(0))
    return y if bias is None else y + bias


def _faster(plain, trick, device, repeats=15, calls=4):
    """Time plain() and trick(), alternating -> True when trick's median time is below 0.9 of
    plain's: a trick is kept only where it is faster beyond noise."""
    import time

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        return time.perf_counter() - t0

    timed(plain), timed(trick)  # warm up both
    ratios = sorted(timed(trick) / max(timed(plain), 1e-9) for _ in range(repeats))
    return ratios[len(ratios) // 2] < 0.9


def _faster_path(x, weight, bias, n):
    """Time F.linear and the split path on this input and weight, alternating: -> the faster."""
    split = _faster(lambda: F.linear(x, weight, bias), lambda: _split_linear(x, weight, bias, n), x.device)
    return "split" if split else "plain"


def linear(x, weight, bias=None):
    """F.linear, or for the few rows of a decode step on a multi-core CPU, whichever of F.linear and
    the split-weight bmm measured faster for this weight shape here (see LINEAR_PATHS above). The
    two give the same result, up to rounding. A quantized weight goes to quantized_linear."""
    if isinstance(weight, QuantizedWeight):
        return quantized_linear(x, weight, bias)
    n = torch.get_num_threads()
    rows = x.numel() // x.size(-1)
    if n == 1 or rows > 8 or x.device.type != "cpu" or weight.size(0) % n or torch.is_grad_enabled():
        return F.linear(x, weight, bias)
    key = (weight.size(0), weight.size(1), rows, weight.dtype, n)
    path = LINEAR_FORCE or LINEAR_PATHS.get(key)
    if path is None:
        path = LINEAR_PATHS[key] = _faster_path(x, weight, bias, n)
    return _split_linear(x, weight, bias, n) if path == "split" else F.linear(x, weight, bias)


class Dropout(nn.Dropout):
    """nn.Dropout that is skipped where it does nothing (eval mode, or p = 0): a decode step of a
    6-layer model passes through 13 of them, and nn.Dropout calls into ATen each time anyway."""

    def forward(self, x):
        return super().forward(x) if self.training and self.p > 0 else x


class Linear(nn.Linear):
    """nn.Linear with linear() above for decoding; the same parameters and state-dict keys."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)


class Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.c_q = Linear(config.n_embd, config.n_head * config.head_dim, bias=config.bias)
        self.c_k = Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=config.bias)
        self.c_v = Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=config.bias)
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
        gqa = self.n_kv_head != self.n_head
        if gqa and q.is_cuda and not isinstance(mask, bool):
            # On CUDA the kernel that takes a mask (memory-efficient attention) has no GQA, so
            # enable_gqa with a mask would fall back to the math kernel and its O(T^2) memory;
            # repeating each kv head for its group of query heads keeps the efficient kernel
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
    """Mixture-of-Experts in place of a layer's MLP: a router sends each token to n_expert_active
    of n_expert expert MLPs and mixes their outputs by its gates; the n_shared_expert experts see
    every token. Dropless: each expert runs once, on every token routed to it, so a token's output
    never depends on the rest of the batch (and cached decoding matches the full forward).
    After each forward, aux_loss, z_loss (scalars, with grad) and load (n_expert,) hold the routing
    statistics of that forward, for GPT.forward's loss and GPT.moe_stats()."""

    def __init__(self, config):
        super().__init__()
        self.n_expert, self.k = config.n_expert, config.n_expert_active
        self.router = Linear(config.n_embd, config.n_expert, bias=False)
        # each expert is a small MLP of the same kind as the dense one (gelu | swiglu); their
        # c_proj.weight names get GPT-2's depth-scaled init with the other residual projections
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
            # Renormalise the k chosen gates to sum to 1 (as Mixtral; the same as a softmax over
            # the k chosen logits), so the output's scale does not shrink when the router spreads
            # probability over experts it did not pick. Not for top-1, where the gate would always
            # be 1 and the router would learn nothing from the LM loss: top-1 keeps its
            # probability as the gate, as in Switch Transformer.
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
    """Keys and values of every layer for a batch of sequences, allocated once (on the first write,
    in the dtype the keys arrive in, so autocast is respected).

    Position p of a row is stored in slot p, or, with a sliding window, in the rolling buffer of
    n_sink + W slots described at the top of this file. Padding (negative positions) is never
    stored; neither is the part of a long prompt that the window has already left behind. Both
    are sent to slot S, one past the end, which is written but never read.

    static=False (eager decoding) attends to the slots written so far, a few more each step.
    static=True attends to all S slots at every step, masking those not written yet: one shape
    for every step, which is what a compiled decode step needs.
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

    def slot_of(self, pos):
        """The slot of position pos (a tensor, or an int)."""
        if self.window is None:
            return pos
        ring = self.n_sink + (pos - self.n_sink) % self.window
        if not torch.is_tensor(pos):
            return pos if pos < self.n_sink else ring
        return torch.where(pos < self.n_sink, pos, ring)

    def begin(self, pos):
        """Called once per forward, before the layers, with the positions (B, T) of the new
        columns. Returns the attention mask of a decode step (None where nothing is masked)."""
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
            if not self.padded:
                # without padding a row's positions are its columns 0, 1, ..., the same in every
                # row, so this step's token is at position length - 1 in all of them
                self.slot = self.slot_of(self.length - 1)
                return None
        # slot s holds a position <= the row's newest one exactly when s <= that position
        return (torch.arange(self.visible, device=pos.device) <= pos)[:, None, None, :]  # (B, 1, 1, S)

    def update(self, layer, k, v):
        """Write this forward's keys and values (B, n_kv_head, T, head_dim) for one layer and
        return what the queries attend to: the fresh ones in prefill, the cache when decoding."""
        B, H, T, D = k.shape
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

    def repeat_interleave(self, n):
        """After prefill: n copies of every row, row b becoming rows b*n .. b*n + n-1, so that n
        samples continue each prompt from one prefill (the cache is copied, not recomputed)."""
        self.k = [t.repeat_interleave(n, dim=0) for t in self.k]
        self.v = [t.repeat_interleave(n, dim=0) for t in self.v]
        self.batch_size *= n

    def nbytes(self):
        return 0 if self.k is None else sum(2 * t.numel() * t.element_size() for t in self.k)


# -----------------------------------------------------------------------------
# sampling


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


LOGPROB_CHUNK = 2**24  # float32 logits (64 MB) per chunk in GPT.head_logprobs


@dataclass
class Completions:
    """Sampled completions of a batch of prompts, as GPT.complete returns them (see there)."""

    idx: torch.Tensor
    pos: torch.Tensor
    mask: torch.Tensor
    truncated: torch.Tensor
    prompt_len: int

    def targets(self):
        """The next-token targets of idx[:, :-1]: the completion tokens, -1 everywhere else."""
        return self.idx[:, 1:].masked_fill(~self.mask[:, 1:], -1)

    def loss_mask(self, drop_truncated=False):
        """(N, L + T - 1), aligned with targets(): True on the completion tokens that carry a loss;
        with drop_truncated none of a completion that ran out of tokens (DAPO's overlong filter)."""
        mask = self.mask[:, 1:]
        return mask & ~self.truncated[:, None] if drop_truncated else mask


def last_index(mask):
    """The index of the last True in each row of mask (B, T) -> (B,) (T - 1 for a row with none)."""
    T = mask.size(1)
    return T - 1 - mask.flip(1).to(torch.int8).argmax(dim=1)


def left_pad(prompts, pad_id=0):
    """A list of 1-D prompts -> idx (B, L) padded on the left and pos (B, L), negative on padding.
    Left padding lines up every row's newest token in the last column, so decoding stays batched."""
    L = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), L), pad_id, dtype=torch.long, device=prompts[0].device)
    for b, p in enumerate(prompts):
        idx[b, L - len(p):] = p
    lengths = torch.tensor([len(p) for p in prompts], device=idx.device)
    pos = torch.arange(L, device=idx.device)[None] - (L - lengths)[:, None]
    return idx, pos


# -----------------------------------------------------------------------------
# LoRA

# A target names linear layers by their role. Each linear layer has one: attn.c_q attn.c_k
# attn.c_v attn.c_proj in attention; mlp.c_fc mlp.c_gate mlp.c_proj in a feed-forward network,
# which with MoE means every expert's and shared expert's as well as a dense layer's; router, the
# MoE gate; lm_head. "c_q" is short for attn.c_q, "c_fc" for mlp.c_fc (c_proj alone is ambiguous,
# so it is spelled with its module); "attn" is all four attention roles, "mlp" all three
# feed-forward roles. The router is adapted only when named: an adapter there changes which
# experts a token goes to, which is rarely what fine-tuning the MLPs means.
LORA_TARGETS = (
    "c_q", "c_k", "c_v", "attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj",  # attention
    "c_fc", "c_gate", "mlp.c_fc", "mlp.c_gate", "mlp.c_proj",  # MLP (c_gate: swiglu only)
    "router",  # MoE only
    "lm_head",  # untied heads only
    "attn", "mlp",  # all four attention linears; all MLP linears (dense, experts, shared)
)
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

    A starts random and B at zero, so at first the layer computes exactly what W alone does, and
    gradients reach B at once (through the random A) and A as soon as B is nonzero. It is built
    around an existing nn.Linear and takes over its weight and bias tensors: the state-dict keys
    stay c_q.weight and c_q.bias, with the adapter beside them as c_q.lora_A and c_q.lora_B.

    Merging folds scale B A into W for inference at the plain cost. It keeps the original W aside,
    so unmerge restores it bit for bit (W + BA - BA is not W in bf16), and the state dict always
    holds the original W: a state dict taken while merged loads back to the same model instead
    of applying the adapters twice. `enabled = False` computes W alone (the reference policy of
    the RL stages: the same weights, adapters off, no second copy in memory).
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
        self.enabled = True  # False: the adapter is skipped (GPT.adapters_off)
        self._base_weight = None  # the original W while merged
        # as nn.Linear initialises its own weight; any nonzero A works, what matters is B = 0
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


# -----------------------------------------------------------------------------
# weight-only quantization

# Decoding streams every weight from memory once per token, so storing the weights of the blocks in
# 8 or 4 bits instead of 32 or 16 is the largest decode speed-up left, and makes a frozen LoRA base
# (QLoRA) 4 to 8 times smaller. Weight-only and symmetric: the activations stay in floating point,
# and a weight w stands for q * scale with q a small integer.
#
#   int8  one scale per output row (absmax / 127), q in -127..127
#   int4  one scale per group_size consecutive inputs of a row (absmax / 7), q in -7..7, two a byte
#
# GPT.quantize replaces the weight Parameter of a Linear by a QuantizedWeight, and linear() sends
# it here. Each matmul then takes one of two paths that compute the same product up to rounding:
# "kernel", PyTorch's own (QUANT_KERNELS), which reads the integers; "dequantize", which rebuilds
# the weight in the activation dtype and calls linear(), always possible. As for LINEAR_PATHS,
# nothing is assumed: without gradients, for up to QUANT_MAX_ROWS rows, the two are timed once per
# (bits, group, shape, rows rounded up to a power of two, dtype, device, threads) and the kernel is
# kept only when its median time is below 0.9 of the dequantize path's (QUANT_PATHS; QUANT_FORCE
# overrides). On the 2-core AMD EPYC this was written on (one thread, a shared machine), both
# kernels ran a decode step's matmul about 2x faster than float32 with bf16 activations, and 10-40x
# slower with float32 ones (not vectorised there): quantize a bf16 model for speed. From 64 rows on
# they were slower than the dequantize path, 2-3x at 256 and 1024 rows, where the matmul is
# compute-bound and one dequantized weight serves every row: longer prefills and training always
# dequantize. Under autograd the weight is dequantized again in the backward pass instead of being
# kept from the forward (_DequantizedMatmul): no layer's full-precision copy outlives its matmul,
# which is what keeps a QLoRA base small while it trains.
QUANT_PATHS = {}  # (bits, group_size, out, in, rows bucket, dtype, device type, threads) -> "kernel" | "dequantize"
QUANT_FORCE = None  # None (measure) | "kernel" | "dequantize"
QUANT_MAX_ROWS = 64  # more rows than this: the dequantize path, unmeasured
QUANT_KERNELS = {  # (device type, bits) -> the kernel the "kernel" path calls, where torch has it for the device
    ("cpu", 8): "torch._weight_int8pack_mm",
    ("cuda", 8): "torch._weight_int8pack_mm",
    ("cpu", 4): "torch._weight_int4pack_mm_for_cpu",
    ("cuda", 4): "torch._weight_int4pack_mm",
}
QUANT_FORMATS = {  # what a checkpoint's "quantization" entry says of its tensors
    8: "int8: W.q int8 (out, in), W.scale (out,) in the model's dtype; W = q * scale[:, None]",
    4: "int4: W.q uint8 (out, in/2), byte j of a row = (q[2j] + 8) << 4 | (q[2j+1] + 8); W.scale (out, "
       "in/group_size) in the model's dtype; W[n, k] = q[n, k] * scale[n, k // group_size]",
}


def quantize_int8(w):
    """Symmetric int8 with one scale per output row: w (out, in) -> q int8 (out, in), scale (out,):

        scale[n] = max_k |w[n, k]| / 127,    q[n, k] = round(w[n, k] / scale[n])  in -127..127

    so that |w - q scale| <= scale / 2 everywhere. The scale is rounded to w's dtype first and q is
    computed against the rounded scale, so the bound holds for the scale as it is stored (a bf16
    rounding moves the largest |w| / scale to below 127.5, which still rounds to 127)."""
    w32 = w.float()
    scale = (w32.abs().amax(dim=1) / 127).to(w.dtype)
    s = scale.float().clamp(min=torch.finfo(torch.float32).tiny)[:, None]  # a zero row: q = 0
    return torch.round(w32 / s).clamp(-127, 127).to(torch.int8), scale


def dequantize_int8(q, scale, dtype):
    """q scale, (out, in) in dtype."""
    return q.to(dtype) * scale.to(dtype)[:, None]


def pack_int4(q):
    """Integers q (out, in) in -8..7 -> uint8 (out, in/2): byte j of a row holds q[2j] + 8 in its
    high four bits and q[2j+1] + 8 in its low four (the layout torch's CUDA int4 kernel packs from)."""
    u = (q + 8).to(torch.uint8)
    return u[:, 0::2] << 4 | u[:, 1::2]


def unpack_int4(packed):
    """The inverse of pack_int4: uint8 (out, in/2) -> int8 (out, in) in -8..7."""
    nibbles = torch.stack((packed >> 4, packed & 15), dim=-1)  # (out, in/2, 2): the high one first
    return nibbles.view(packed.size(0), -1).to(torch.int8) - 8


def quantize_int4(w, group_size):
    """Symmetric int4 in groups of group_size consecutive inputs: w (out, in) -> packed uint8
    (out, in/2) (see pack_int4), scale (out, in/group_size):

        scale[n, g] = max |w[n, gG : (g+1)G]| / 7,    q[n, k] = round(w[n, k] / scale[n, k // G])  in -7..7

    so that |w - q scale| <= scale / 2 in every group (-8 stays unused: the range is symmetric).
    As in quantize_int8 q is computed against the scale as stored."""
    out, n_in = w.shape
    w32 = w.float().view(out, n_in // group_size, group_size)
    scale = (w32.abs().amax(dim=-1) / 7).to(w.dtype)
    s = scale.float().clamp(min=torch.finfo(torch.float32).tiny)[..., None]
    q = torch.round(w32 / s).clamp(-7, 7).view(out, n_in).to(torch.int8)
    return pack_int4(q), scale


def dequantize_int4(packed, scale, dtype):
    """q scale, group by group, (out, in) in dtype."""
    q = unpack_int4(packed)
    out, n_in = q.shape
    return (q.view(out, scale.size(1), -1).to(dtype) * scale.to(dtype)[..., None]).view(out, n_in)


class QuantizedWeight(nn.Module):
    """The weight of a Linear in 8 or 4 bits (quantize_int8, quantize_int4), in place of its weight
    Parameter: the state dict holds c_q.weight.q and c_q.weight.scale (QUANT_FORMATS), and linear()
    multiplies by it. Frozen: nothing in it has a gradient; LoRA adapters train beside it."""

    def __init__(self, weight, bits, group_size=None):
        super().__init__()
        self.bits, self.group_size = bits, group_size
        self.out_features, self.in_features = weight.shape
        with torch.no_grad():
            q, scale = quantize_int8(weight) if bits == 8 else quantize_int4(weight, group_size)
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)
        self.kernel_int4 = None  # (device, dtype, packed, scale_and_zeros) as torch's int4 kernel reads them
        self.last_path = None  # the path of the last matmul without gradients, for bench.py

    def numel(self):
        return self.out_features * self.in_features

    def dequantize(self, dtype=None):
        """The weight (out, in) it stands for, in dtype (default the scale's, the model's)."""
        dequantize = dequantize_int8 if self.bits == 8 else dequantize_int4
        return dequantize(self.q, self.scale, dtype or self.scale.dtype)

    def int4_kernel_weight(self, device, dtype):
        """The weight and scales as torch's int4 kernel on this device takes them: its own packing of
        the nibbles (made here, once, and kept beside q: another half byte per weight while the
        kernel is in use) and (scale, zero) pairs (in/G, out, 2) in dtype, zero 0 (symmetric)."""
        if self.kernel_int4 is None or self.kernel_int4[:2] != (device, dtype):
            if device.type == "cuda":  # packs from our layout; inner k tiles: the largest that fits
                tiles = next(t for t in (8, 4, 2) if self.in_features % (16 * t) == 0)
                packed = torch._convert_weight_to_int4pack(self.q, tiles)
            else:  # the CPU kernel packs from one int32 per weight, 0..15 (it subtracts the 8)
                packed = torch._convert_weight_to_int4pack_for_cpu(unpack_int4(self.q).to(torch.int32) + 8, 2)
            scale = self.scale.to(dtype).t()
            self.kernel_int4 = (device, dtype, packed, torch.stack((scale, torch.zeros_like(scale)), -1).contiguous())
        return self.kernel_int4[2:]

    def extra_repr(self):
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"int{self.bits}{group}, in_features={self.in_features}, out_features={self.out_features}"


def count_weights(module):
    """The parameters of module, each shared tensor once, plus the weights its QuantizedWeights
    stand for."""
    return sum(p.numel() for p in module.parameters()) + sum(
        m.numel() for m in module.modules() if isinstance(m, QuantizedWeight))


def _dequantized_matmul(x, q, scale, bits):
    """x (rows, in) W^T for W = q scale, rebuilt in x's dtype."""
    if bits == 8:  # x (q scale)^T = (x q^T) scale: the row scales factor out of the matmul
        return linear(x, q.to(x.dtype)) * scale.to(x.dtype)
    return linear(x, dequantize_int4(q, scale, x.dtype))


def _quantized_matmul(x, w, path):
    """x (rows, in) W^T -> (rows, out), in x's dtype, by path "kernel" or "dequantize"."""
    if path == "dequantize":
        return _dequantized_matmul(x, w.q, w.scale, w.bits)
    if w.bits == 8:
        return torch._weight_int8pack_mm(x, w.q, w.scale.to(x.dtype))
    packed, scale_and_zeros = w.int4_kernel_weight(x.device, x.dtype)
    if x.is_cuda:
        return torch._weight_int4pack_mm(x, packed, w.group_size, scale_and_zeros)
    return torch._weight_int4pack_mm_for_cpu(x, packed, w.group_size, scale_and_zeros)


def _quantized_path(x, w):
    """The path for x (rows, in) times w without gradients, measured (see QUANT_PATHS above)."""
    rows = x.size(0)
    if rows > QUANT_MAX_ROWS:
        return "dequantize"
    bucket = 1 << (rows - 1).bit_length()  # a prompt of any length up to 64 costs at most 7 measurements
    key = (w.bits, w.group_size, w.out_features, w.in_features, bucket, x.dtype, x.device.type, torch.get_num_threads())
    path = QUANT_FORCE or QUANT_PATHS.get(key)
    if path is None:
        try:  # a kernel that refuses this input (its dtype, its shape, this device) is no candidate
            _quantized_matmul(x, w, "kernel")
            kernel = _faster(lambda: _quantized_matmul(x, w, "dequantize"), lambda: _quantized_matmul(x, w, "kernel"),
                             x.device)
        except (RuntimeError, NotImplementedError):
            kernel = False
        path = QUANT_PATHS[key] = "kernel" if kernel else "dequantize"
        if not kernel:
            w.kernel_int4 = None  # not used: give its memory back
    return path


class _DequantizedMatmul(torch.autograd.Function):
    """x W^T for a frozen quantized W under autograd. F.linear on the dequantized W would keep that
    full-precision W alive until the backward pass, for every layer at once; this keeps only the
    integers and dequantizes again for dx = dy W. W gets no gradient."""

    @staticmethod
    def forward(ctx, x, q, scale, bits):
        ctx.save_for_backward(q, scale)
        ctx.bits = bits
        return _dequantized_matmul(x, q, scale, bits)  # what the same rows compute without autograd

    @staticmethod
    def backward(ctx, dy):
        q, scale = ctx.saved_tensors
        if ctx.bits == 8:  # dy (q scale) = (dy scale) q
            return (dy * scale.to(dy.dtype)) @ q.to(dy.dtype), None, None, None
        return dy @ dequantize_int4(q, scale, dy.dtype), None, None, None


def quantized_linear(x, weight, bias=None):
    """x W^T + b for a QuantizedWeight W, computed in the activation dtype: autocast's when it is
    on (torch's int kernels are not on autocast's lists), else x's."""
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    x2 = x.reshape(-1, x.size(-1)).to(dtype).contiguous()  # (rows, in): the kernels take 2-D inputs
    if torch.is_grad_enabled() and x2.requires_grad:
        y = _DequantizedMatmul.apply(x2, weight.q, weight.scale, weight.bits)
    else:
        path = _quantized_path(x2, weight)
        weight.last_path = QUANT_KERNELS.get((x.device.type, weight.bits), "kernel") if path == "kernel" else "dequantize"
        y = _quantized_matmul(x2, weight, path)
    y = y.view(*x.shape[:-1], weight.out_features)
    return y if bias is None else y + bias.to(dtype)


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
        # GPT-2: the projections that write into the residual stream (two per layer) are scaled
        # by 1/sqrt(2 n_layer), so the stream's variance does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        self.compiled_decode_step = None  # set by compile_decode()
        # activation checkpointing for training: keep only each block's input in the forward pass
        # and recompute the block in the backward pass (about one more forward of compute, for the
        # activations of one block at a time instead of all of them), and the loss over chunks of
        # the logits (see forward); the stages' grad_checkpointing setting
        self.grad_checkpointing = False
        self.quantization = None  # set by quantize(): {bits, group_size, quantize_head, format}
        if config.lora_rank > 0:
            self._add_lora()  # after the base init, so a seed gives the same base weights either way

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # --- forward ---------------------------------------------------------------

    def attention_mask(self, pos, T, device):
        """Mask for T fresh tokens attending to each other: True (plain causal, the fast kernel)
        when there is no window and no padding, else a boolean (B, 1, T, T) from the positions."""
        W, n_sink = self.config.sliding_window, self.config.n_sink
        if W is None and pos is None:
            return True
        if pos is None:
            pos = torch.arange(T, device=device)[None]
        q, k = pos[:, :, None], pos[:, None, :]  # (B, T, 1), (B, 1, T)
        mask = (k >= 0) & (k <= q)
        if W is not None:
            mask &= (q - k < W) | (k < n_sink)
        # a padding query sees nothing; let it see itself so its (unused) output stays finite
        mask |= torch.eye(T, dtype=torch.bool, device=device) & (q < 0)
        return mask[:, None]

    def forward(self, idx, targets=None, pos=None, cache=None, hidden=False):
        """idx (B, T) token ids -> (logits (B, T, vocab_size), loss or None).

        targets (B, T): next-token ids, -1 where no loss is taken; the loss is their mean
            cross-entropy. That is all the loss is, so that it can be logged and compared across
            architectures; a MoE model's load-balancing terms come from aux_loss(), which the
            training step adds.
        pos (B, T): each token's position; None means 0..T-1 in every row. Negative = padding.
        cache: a KVCache to fill (prefill, the whole prompt) or to extend (one token per row).
        hidden: return the final hidden states (B, T, n_embd) after the last norm instead of
            the logits, for a scalar head (reward, value).
        With grad_checkpointing, targets and gradients on, the logits come back None: the loss is
        taken chunk by chunk without ever holding all of them.
        """
        cfg = self.config
        B, T = idx.shape
        # positions, not columns, are what block_size bounds: a left-padded batch of completions with
        # per-row budgets may be wider than block_size while no row's position reaches it
        if T > cfg.block_size and not cfg.unbounded_positions and (pos is None or int(pos.max()) >= cfg.block_size):
            raise ValueError(f"sequence length {T} exceeds block_size {cfg.block_size}")
        p = pos if pos is not None else torch.arange(T, device=idx.device)[None]
        x = self.wte(idx)  # (B, T, C)
        if cfg.pos_emb == "learned":
            x = x + self.wpe(p.clamp(min=0))
        elif cfg.pos_emb == "sinusoidal":
            x = x + sinusoidal_embedding(p, cfg.n_embd, x.dtype)
        rope = rope_cos_sin(p, cfg.head_dim, cfg.rope_theta, x.dtype) if cfg.pos_emb == "rope" else None
        x = self.drop(x)

        if cache is not None and cache.k is not None:  # decode: one new token per row
            if T != 1:
                raise ValueError("a KV cache that already holds a prompt takes one token per step")
            mask = cache.begin(p.expand(B, T))
        else:
            mask = self.attention_mask(pos, T, idx.device)
            if cache is not None:
                cache.begin(p.expand(B, T))
        for block in self.h:
            if self.grad_checkpointing and torch.is_grad_enabled() and cache is None:
                x = torch.utils.checkpoint.checkpoint(block, x, rope, mask, cache, use_reentrant=False)
            else:
                x = block(x, rope, mask, cache)
        x = self.ln_f(x)
        if hidden:
            return x, None
        if targets is not None and self.grad_checkpointing and torch.is_grad_enabled():
            # at a large vocabulary the float32 logits of the batch, and their gradient, are the
            # largest activations of a step: take the same loss over chunks of rows instead, each
            # recomputed in the backward pass (head_logprobs), and return no logits
            logp, _ = self.head_logprobs(x, targets)
            return None, -logp.sum() / (targets >= 0).sum()
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(upcast(logits).view(B * T, -1), targets.reshape(B * T), ignore_index=-1)
        return logits, loss

    def moe_layers(self):
        return [block.mlp for block in self.h if isinstance(block.mlp, MoE)]

    def aux_loss(self):
        """The auxiliary training losses of the last forward: for MoE, moe_aux_coef times the
        load-balancing loss plus moe_z_coef times the router z-loss, each averaged over the MoE
        layers (a tensor with grad); 0.0 for a dense model. Training steps add it to their loss."""
        moe = self.moe_layers()
        if not moe or moe[0].aux_loss is None:
            return 0.0
        cfg = self.config
        return (cfg.moe_aux_coef * sum(m.aux_loss for m in moe) + cfg.moe_z_coef * sum(m.z_loss for m in moe)) / len(moe)

    def moe_stats(self):
        """Routing statistics of the last forward, for logging; None for a dense model (or before
        any forward). aux_loss and z_loss are means over the MoE layers; load (n_moe_layer,
        n_expert) is the fraction of routed (token, expert) pairs each expert got, per layer;
        load_cv is the mean over layers of its coefficient of variation std / mean (0 = even)."""
        moe = self.moe_layers()
        if not moe or moe[0].load is None:
            return None
        load = torch.stack([m.load for m in moe])  # (n_moe_layer, n_expert)
        cv = load.std(dim=-1, correction=0) / load.mean(dim=-1)
        return dict(aux_loss=sum(m.aux_loss.item() for m in moe) / len(moe),
                    z_loss=sum(m.z_loss.item() for m in moe) / len(moe),
                    load=load, load_cv=cv.mean().item())

    def logprobs(self, idx, targets, pos=None, temperature=1.0, vocab_limit=None):
        """Per-token log-probabilities (B, T) of targets, 0 where targets == -1:

            logprobs[b, t] = log softmax(logits[b, t, :vocab_limit] / temperature)[targets[b, t]]

        with logits[b, t] the model's prediction after idx[b, :t+1]. The RL stages score their
        completions with this, and must pass the temperature and vocab_limit they sampled with:
        the ratio and the KL are then those of the distribution the tokens were drawn from.
        (top_k / top_p truncate that distribution further; see sample_next.)"""
        x, _ = self(idx, pos=pos, hidden=True)
        return self.head_logprobs(x, targets, temperature, vocab_limit)[0]

    def head_logprobs(self, x, targets, temperature=1.0, vocab_limit=None, entropy=False):
        """logprobs from final hidden states x (B, T, n_embd) -> (logprobs (B, T), entropy (B, T)
        of the same tempered distribution, or None). entropy: False (None back), True (with its
        graph, for an entropy bonus), or "log" (detached: for the log only, no graph kept for it).
        The head runs on chunks of rows, so the float32 logits of only one chunk exist at a time;
        with gradients each chunk is recomputed in the backward pass (activation checkpointing)
        instead of being kept. At this repo's vocab sizes one chunk is the whole batch."""
        if temperature <= 0:
            raise ValueError(f"log-probs need the sampling temperature > 0, got {temperature} "
                             "(greedy decoding has no distribution to score)")
        B, T, C = x.shape
        V = self.config.vocab_size if vocab_limit is None else min(vocab_limit, self.config.vocab_size)
        x, targets = x.reshape(B * T, C), targets.reshape(B * T)

        def chunk(xc, tc):
            logits = upcast(self.lm_head(xc))[:, :V] / temperature
            lse = torch.logsumexp(logits, dim=-1)
            logp = logits.gather(1, tc.clamp(min=0)[:, None]).squeeze(1) - lse
            if not entropy:
                return logp, torch.zeros_like(lse)
            with torch.set_grad_enabled(torch.is_grad_enabled() and entropy is True):
                lg = logits if entropy is True else logits.detach()
                ent = torch.logsumexp(lg, dim=-1) - (F.softmax(lg, dim=-1) * lg).sum(-1)
            return logp, ent

        rows = max(1, LOGPROB_CHUNK // V)
        outs = []
        for i in range(0, B * T, rows):
            xc, tc = x[i : i + rows], targets[i : i + rows]
            if torch.is_grad_enabled() and B * T > rows:
                outs.append(torch.utils.checkpoint.checkpoint(chunk, xc, tc, use_reentrant=False))
            else:
                outs.append(chunk(xc, tc))
        keep = targets >= 0
        logp = torch.cat([o[0] for o in outs]).masked_fill(~keep, 0.0).view(B, T)
        ent = torch.cat([o[1] for o in outs]).masked_fill(~keep, 0.0).view(B, T) if entropy else None
        return logp, ent

    @torch.no_grad()
    def reset_token_rows(self, ids, match_norm=False, generator=None):
        """Give the token-embedding rows of ids (and, untied, the head's) a fresh random start:
        N(0, 0.02) as at initialisation, or with match_norm random directions as long as the mean
        row of the other ids. For tokens training never showed as inputs: their rows only ever
        learned to be unlikely outputs, which pushed them all the same way, so as inputs they are
        nearly one vector."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.wte.weight.device)
        if isinstance(self.lm_head.weight, QuantizedWeight):
            raise ValueError("reset_token_rows: the head is quantized (quantize_head); reset before quantizing")
        tables = [self.wte.weight] + ([] if self.config.tie_weights else [self.lm_head.weight])
        for w in tables:
            fresh = torch.randn(len(ids), w.size(1), generator=generator, device="cpu").to(w) * 0.02
            if match_norm:
                others = torch.ones(w.size(0), dtype=torch.bool, device=w.device)
                others[ids] = False
                fresh = F.normalize(fresh, dim=1) * w[others].norm(dim=1).mean()
            w[ids] = fresh

    # --- the scalar head ---------------------------------------------------------

    def head_scores(self, x):
        """The scalar head on final hidden states x (B, T, n_embd) -> (B, T), in at least float32."""
        if self.score_head is None:
            raise RuntimeError("this model has no scalar head (GPTConfig.scalar_head=False)")
        return upcast(self.score_head(x)).squeeze(-1)

    def scores(self, idx, pos=None):
        """The scalar head at every position (B, T): PPO's values, read at each completion token.
        Position t's score sees idx[:, :t+1] only, so padding after a sequence never changes it."""
        x, _ = self(idx, pos=pos, hidden=True)
        return self.head_scores(x)

    def sequence_scores(self, idx, last, pos=None):
        """A reward model's reading: the scalar head at the last real token of each row, whose
        index is last (B,) -> (B,). For a right-padded batch last is the length - 1; for left
        padding (prompts) followed by completions, last_index(mask). That token is the one that
        has seen the whole sequence: for a reply rendered by the chat template, its <|end|>."""
        x, _ = self(idx, pos=pos, hidden=True)
        return self.head_scores(x[torch.arange(idx.size(0), device=idx.device), last][:, None])[:, 0]

    # --- generation ------------------------------------------------------------

    def prefill(self, idx, pos, cache):
        """Run the prompts (B, T) once, filling the cache -> logits (B, vocab_size) of each
        row's next token."""
        x, _ = self(idx, pos=pos, cache=cache, hidden=True)
        return self.lm_head(x[:, -1])  # left padding puts every row's newest token last

    def decode_step(self, token, pos, cache):
        """One new token per row (B, 1) at positions pos (B, 1), against the cache -> logits
        (B, vocab_size) of the token after it."""
        x, _ = self(token, pos=pos, cache=cache, hidden=True)
        return self.lm_head(x[:, -1])

    def compile_decode(self, batch_size=1, measure=True):
        """Compile decode_step, as gpt-fast does: one graph per batch shape over a static cache
        (every slot, unwritten ones masked), and on a GPU CUDA graphs ("reduce-overhead"), which
        remove the per-kernel launch cost that dominates decoding a small model one token at a
        time. The weights are read at every call, so it stays valid as they train.
        Whether it pays depends on the machine (on a 2-core CPU the eager step was faster), so with
        measure the compiled step and the eager one are timed here, alternating, on batch_size rows
        at about the middle of the context, and the compiled step is kept only where it is faster
        by 10%. -> "compiled" or "eager", and the two step times in ms."""
        import time

        on_gpu = self.wte.weight.is_cuda
        compiled = torch.compile(self.decode_step, mode="reduce-overhead" if on_gpu else None)
        if not measure:
            self.compiled_decode_step = compiled
            return "compiled", None, None
        cfg, dev = self.config, self.wte.weight.device
        L = max(1, min(cfg.block_size, 256) // 2)
        prompt = torch.zeros(batch_size, L, dtype=torch.long, device=dev)
        pos = torch.arange(L, device=dev)[None].expand(batch_size, L)

        def steps(step, static, n=8):
            cache = KVCache(cfg, batch_size, L + 2 * n + 2, static=static)
            with torch.no_grad():
                self.prefill(prompt, pos, cache)
                token = torch.zeros(batch_size, 1, dtype=torch.long, device=dev)
                step(token, pos[:, -1:] + 1, cache)  # compile / warm up on this cache
                if on_gpu:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                for t in range(n):
                    step(token, pos[:, -1:] + 2 + t, cache)
                if on_gpu:
                    torch.cuda.synchronize()
            return (time.perf_counter() - t0) / n

        was_training = self.training
        self.eval()
        times = {"eager": [], "compiled": []}
        for _ in range(3):
            times["eager"].append(steps(self.decode_step, False))
            times["compiled"].append(steps(compiled, True))
        self.train(was_training)
        eager, comp = (sorted(v)[1] * 1000 for v in (times["eager"], times["compiled"]))
        choice = "compiled" if comp < 0.9 * eager else "eager"
        self.compiled_decode_step = compiled if choice == "compiled" else None
        return choice, eager, comp

    @torch.no_grad()
    def generate_tokens(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                        use_cache=True, generator=None, pos=None, vocab_limit=None, num_samples=1, last_pos=None):
        """Yield (next_token (N,), logits (N, vocab_size)) for each of max_new_tokens steps, with
        N = B * num_samples: sample g of prompt b is row b * num_samples + g.

        With use_cache, the prompt is run once (prefill) and each step then runs one token per
        row against the KV cache; num_samples copies of each prompt's cache then continue it, so
        a group of samples pays for one prefill. Without the cache, every step recomputes the
        whole context: the reference the cached path must match. Past block_size, without a
        rolling cache, both crop the context to the last block_size tokens, as nanoGPT does,
        which means a full recompute per step.
        last_pos (N,): the last position each row may take; a row that has reached it goes on
        at that position (what it draws then is filler, complete() masks it), so a batch whose
        rows have budgets of their own never leaves block_size in any row.
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
        # the largest position of any row so far (the longest prompt has no padding): block_size
        # bounds it, not the number of columns
        top, cap = L - 1, None if last_pos is None else int(last_pos.max())
        if num_samples > 1 and not (use_cache and (L <= cfg.block_size or cfg.unbounded_positions)):
            # no prefill to share (the reference path, or a prompt too long for the cache): the
            # samples start as copies of their prompt
            tokens, pos = idx.repeat_interleave(num_samples, 0), pos.repeat_interleave(num_samples, 0)
        try:
            for _ in range(max_new_tokens):
                T = tokens.size(1)
                if use_cache and (top < cfg.block_size or cfg.unbounded_positions):
                    if cache is None:
                        max_len = L + max_new_tokens
                        if not cfg.unbounded_positions:
                            max_len = min(max_len, cfg.block_size)
                        cache = KVCache(cfg, B, max_len, static=compiled is not None)
                        logits = self.prefill(tokens, pos, cache)
                        if num_samples > 1:
                            cache.repeat_interleave(num_samples)
                            logits = logits.repeat_interleave(num_samples, 0)
                            tokens, pos = tokens.repeat_interleave(num_samples, 0), pos.repeat_interleave(num_samples, 0)
                    else:
                        logits = decode(tokens[:, -1:], pos[:, -1:], cache)
                        if compiled is not None:
                            # with CUDA graphs the output buffer is reused by the next replay:
                            # the caller may still hold these logits then
                            logits = logits.clone()
                else:
                    ctx, ctx_pos = tokens, pos
                    if top >= cfg.block_size and not cfg.unbounded_positions:
                        ctx, ctx_pos = tokens[:, -cfg.block_size:], pos[:, -cfg.block_size:]
                        ctx_pos = ctx_pos - ctx_pos[:, :1].clamp(min=0)  # each row restarts at 0
                    logits = self.lm_head(self(ctx, pos=ctx_pos, hidden=True)[0][:, -1])
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
            + g, sharing one prefill. temperature 0 is greedy; a torch.Generator makes sampling
        reproducible; vocab_limit keeps the padding ids of a padded vocabulary (>= the tokenizer's
        size) from ever being drawn. For RL rollouts, complete() returns the masks as well.
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
        """Sample num_samples completions of each prompt (a list of 1-D LongTensors), all rows in
        one batch, sharing one prefill per prompt, each row stopping at the first of stop_tokens
        (an id or several) it draws, or when it has max_new_tokens, or (within_block, a model
        whose positions are bounded) when its sequence fills block_size: a row's budget is
        min(max_new_tokens, block_size - its prompt's length), so a long prompt gets a shorter
        completion rather than none. -> Completions, what an RL step needs without a second pass:

            idx (N, L + T)  each prompt left-padded to the longest (L), then its completion; the
                            tokens after a row's stop are filler (its stop token repeated, when
                            fill_after_stop, else 0)
            pos (N, L + T)  positions, negative on the left padding and on the filler
            mask (N, L + T) True on the completion's tokens up to and including its stop token
            truncated (N,)  True where the budget ran out before a stop token
            prompt_len      L

        with N = len(prompts) * num_samples, sample g of prompt p in row p * num_samples + g, and
        T the longest completion: generation stops once every row has stopped. The log-probs of
        the completions are then logprobs(idx[:, :-1], idx[:, 1:] where mask[:, 1:] else -1,
        pos[:, :-1], temperature, vocab_limit). Without within_block, a row past block_size goes on
        in a cropped context (generate's nanoGPT-style sampling)."""
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
        return Completions(idx=idx, pos=pos, mask=mask, truncated=~stopped, prompt_len=L)

    # --- LoRA ------------------------------------------------------------------

    def _add_lora(self):
        """Put a LoRALinear around every nn.Linear that lora_targets names, then freeze every
        parameter but the adapters'."""
        cfg = self.config
        matched = set()
        for name, module in list(self.named_modules()):
            if not isinstance(module, nn.Linear):
                continue
            hits = [t for t in cfg.lora_targets if lora_target_matches(t, linear_role(name))]
            if hits:
                parent, _, child = name.rpartition(".")
                lora = LoRALinear(module, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
                setattr(self.get_submodule(parent), child, lora)
                matched.update(hits)
        unmatched = [t for t in cfg.lora_targets if t not in matched]
        if unmatched:
            raise ValueError(f"LoRA: lora_targets {unmatched} name no nn.Linear in this model")
        for name, p in self.named_parameters():
            # a scalar head is new to the model, so it trains in full beside the adapters
            p.requires_grad = is_lora_key(name) or name.startswith("score_head.")

    def lora_layers(self):
        return [m for m in self.modules() if isinstance(m, LoRALinear)]

    def merge_lora(self):
        """Fold every adapter into its weight (W += scale B A): the model then runs as a plain GPT,
        at the plain cost (and the memory of one more copy of the adapted weights, kept to undo
        it). Merging twice is refused. Train only unmerged: merged, the adapters are bypassed and
        get no gradient. state_dict() is the same merged or not. A quantized base is refused: it has
        no full-precision weight to fold into (merged_state_dict() dequantizes for an export)."""
        if self.quantization:
            raise ValueError(f"merge_lora: the base weights are int{self.quantization['bits']} (quantize): "
                             "use merged_state_dict() for the merged weights, dequantized")
        for layer in self.lora_layers():
            layer.merge()

    def unmerge_lora(self):
        """Undo merge_lora: every adapted weight is restored bit for bit."""
        for layer in self.lora_layers():
            layer.unmerge()

    @contextlib.contextmanager
    def adapters_off(self):
        """Inside, the model computes what its base weights alone compute: every LoRA adapter
        is skipped (merged or not). The RL stages take a LoRA policy's reference this way, at no
        memory cost. A model without adapters is unchanged."""
        layers = self.lora_layers()
        for layer in layers:
            layer.enabled = False
        try:
            yield self
        finally:
            for layer in layers:
                layer.enabled = True

    def merged_state_dict(self):
        """The weights of the plain full-precision GPT this model computes: adapters folded in,
        adapter keys left out, quantized weights dequantized (here, once: the export of a QLoRA
        run). Loads strictly into GPT(dataclasses.replace(config, lora_rank=0)). The model itself
        is left as it is, merged or not, quantized or not."""
        sd = {k: v for k, v in self.state_dict().items() if not is_lora_key(k)}
        for name, layer in self.named_modules():
            if not isinstance(layer, Linear):
                continue
            if isinstance(layer.weight, QuantizedWeight):
                del sd[name + ".weight.q"], sd[name + ".weight.scale"]
                w = layer.weight.dequantize()
            else:
                w = layer.weight.detach()  # the merged weight itself when merged
            if isinstance(layer, LoRALinear) and not layer.merged:
                w = (upcast(w) + layer.delta_weight().detach()).to(w.dtype)
            sd[name + ".weight"] = w
        if self.config.tie_weights:  # a quantized copy of a tied head is the table, which is exact
            sd["lm_head.weight"] = sd["wte.weight"]
        return sd

    def lora_state_dict(self):
        """Only the adapters (lora_A, lora_B of each target): a fine-tune saved on its own, to be
        loaded on top of the base checkpoint it was trained from."""
        return {k: v for k, v in self.state_dict().items() if is_lora_key(k)}

    def _check_keys(self, what, sd, expected):
        missing = sorted(set(expected) - set(sd))
        unexpected = sorted(set(sd) - set(expected))
        if missing or unexpected:
            raise ValueError(f"LoRA: {what} does not fit this model: missing keys {missing[:8]}"
                             f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
                             f"{' ...' if len(unexpected) > 8 else ''}")
        for k, v in sd.items():
            if v.shape != expected[k].shape:
                raise ValueError(f"LoRA: {what}: {k} has shape {tuple(v.shape)}, "
                                 f"this model has {tuple(expected[k].shape)} (another lora_rank?)")

    def load_lora_state_dict(self, sd):
        """Load adapters saved by lora_state_dict. Every adapter key must be there, no other,
        with the right shapes; the model must not be merged (the weights would disagree)."""
        if any(layer.merged for layer in self.lora_layers()):
            raise RuntimeError("LoRA: unmerge_lora() before loading adapters")
        own = self.lora_state_dict()
        self._check_keys("adapter state dict", sd, own)
        with torch.no_grad():
            for k, v in sd.items():
                own[k].copy_(v)

    def load_base_weights(self, sd):
        """Load a checkpoint of the base model (lora_rank 0) into this one: every key but the
        adapters' must be there, and nothing else. The adapters keep their fresh init.
        (load_state_dict(sd, strict=False) does the same, less the checks.)"""
        if any(layer.merged for layer in self.lora_layers()):
            raise RuntimeError("LoRA: unmerge_lora() before loading base weights")
        own = {k: v for k, v in self.state_dict().items() if not is_lora_key(k)}
        self._check_keys("base state dict", sd, own)
        self.load_state_dict(sd, strict=False)

    # --- quantization ------------------------------------------------------------

    @torch.no_grad()
    def quantize(self, bits, group_size=None, quantize_head=False):
        """Store the weight of every linear layer of the blocks in bits = 8 (int8, a scale per
        output row) or 4 (int4, a scale per group_size = 32 | 64 | 128 inputs, two weights a byte),
        weight-only and symmetric (see quantize_int8, quantize_int4); the matmuls then read the
        integers (quantized_linear). Quantize in the dtype the model will run in: the scales are
        stored in it. -> the model. Refused with a ValueError naming the setting: other bits, a
        group_size that does not divide a layer's input width, a model already quantized, LoRA
        adapters merged into the weights (the base must be the pretrained one; unmerge first).

        Left in floating point: the MoE routers (n_expert x n_embd, a rounding error there changes
        which expert a token goes to rather than nudging an output), the scalar head, the norms,
        and unless quantize_head the token embedding and LM head: the head's logits are the most
        precision-sensitive numbers of the model (every weight of it moves every logit of the
        softmax), and a tied head is the embedding table itself. With quantize_head a tied head
        gets a quantized copy of the table for its matmul, the lookup keeps the table.

        LoRA adapters stay in full precision beside a quantized weight and train on it (QLoRA):
        add them first (lora_rank in the config), then quantize. state_dict() then holds the
        integers and scales (QUANT_FORMATS) and the adapters; merged_state_dict() the merged
        weights, dequantized."""
        if bits not in (8, 4):
            raise ValueError(f"quantize: bits={bits!r}: 8 (int8, a scale per output row) or 4 (int4, group-wise)")
        if bits == 8 and group_size is not None:
            raise ValueError(f"quantize: group_size={group_size}: int8 has one scale per output row, no groups "
                             "(group_size is for bits=4)")
        if bits == 4 and group_size not in (32, 64, 128):
            raise ValueError(f"quantize: group_size={group_size!r}: int4 groups are 32, 64 or 128 inputs")
        if self.quantization:
            raise ValueError(f"quantize: the model is already int{self.quantization['bits']}; quantize once, "
                             "from the full-precision weights")
        if any(layer.merged for layer in self.lora_layers()):
            raise ValueError("quantize: the LoRA adapters are merged into the weights (merge_lora); unmerge_lora() "
                             "first: a quantized base keeps its adapters beside it")
        layers = [(name, m) for name, m in self.named_modules() if isinstance(m, Linear)
                  and linear_role(name) != "router" and (name != "lm_head" or quantize_head)]
        for name, m in layers:
            if bits == 4 and m.in_features % group_size:
                raise ValueError(f"quantize: group_size={group_size} does not divide the input width "
                                 f"{m.in_features} of {name}")
        for name, m in layers:  # the float weight is freed as its layer is done
            weight = m.weight.detach()
            del m.weight  # a Parameter's name takes only a Parameter: free it for the module
            m.weight = QuantizedWeight(weight, bits, group_size)
            del weight
        self.quantization = dict(bits=bits, group_size=group_size, quantize_head=quantize_head,
                                 format=QUANT_FORMATS[bits])
        return self

    def quantized_weights(self):
        return [m for m in self.modules() if isinstance(m, QuantizedWeight)]

    # --- a larger vocabulary -----------------------------------------------------

    @torch.no_grad()
    def resize_vocab(self, vocab_size):
        """Grow the token embedding, and an untied head, to vocab_size rows, for tokens appended
        to the tokenizer (SFT's chat tokens on a model from elsewhere). Old ids compute exactly
        what they did. Each new row starts at the mean of the old rows, so a new token begins as
        an average token, with a logit near the mean logit, rather than as a random direction
        that may dominate the softmax (Hewitt 2021, "Initializing new word embeddings").
        A frozen table (LoRA) stays frozen."""
        old = self.config.vocab_size
        if vocab_size < old:
            raise ValueError(f"resize_vocab grows the vocabulary: {vocab_size} < {old} rows")
        if isinstance(self.lm_head, LoRALinear):
            raise ValueError("resize_vocab: the head has LoRA adapters (lora_targets has lm_head); "
                             "resize before adding them")
        if isinstance(self.lm_head.weight, QuantizedWeight):
            raise ValueError("resize_vocab: the head is quantized (quantize_head); resize before quantizing")

        def grown(w):  # (old, C) -> (vocab_size, C)
            mean = upcast(w).mean(dim=0, keepdim=True).to(w.dtype)
            return nn.Parameter(torch.cat((w, mean.expand(vocab_size - old, -1))), requires_grad=w.requires_grad)

        self.wte.weight = grown(self.wte.weight)
        self.wte.num_embeddings = vocab_size
        self.lm_head.weight = self.wte.weight if self.config.tie_weights else grown(self.lm_head.weight)
        self.lm_head.out_features = vocab_size
        self.config = replace(self.config, vocab_size=vocab_size)

    # --- sizes, FLOPs, optimizer -----------------------------------------------

    def num_params(self, non_embedding=True, active=False):
        """Parameters, each shared tensor counted once, a quantized weight as the numbers it stands
        for. As in nanoGPT, non_embedding leaves out the position table (the token table stays: with
        tied weights it is also the LM head). active counts only what one token uses:
        n_expert_active of each MoE layer's routed experts."""
        n = count_weights(self)
        if self.config.tie_weights and isinstance(self.lm_head.weight, QuantizedWeight):
            n -= self.lm_head.weight.numel()  # a quantized copy of the tied table: the same weights
        if non_embedding and self.config.pos_emb == "learned":
            n -= self.wpe.weight.numel()
        if active:
            for moe in self.moe_layers():
                n -= (moe.n_expert - moe.k) * count_weights(moe.experts[0])
        return n

    def flops_per_token(self, T=None):
        """Training FLOPs (forward + backward) per token for sequences of length T: 6 per weight
        (2 forward, 4 backward) plus attention's QK^T and AV, as in the PaLM paper's appendix.
        With MoE only the active weights count: a token skips the experts it is not routed to.
        A frozen weight (LoRA, a quantized base) costs 4, not 6: its own gradient is never computed."""
        cfg = self.config
        T = cfg.block_size if T is None else T
        context = T if cfg.sliding_window is None else min(T, cfg.sliding_window + cfg.n_sink)
        n_active = self.num_params(active=True)
        n_frozen = 0
        if cfg.lora_rank or self.quantization:
            n_frozen = self.num_params(non_embedding=False) - sum(p.numel() for p in self.parameters() if p.requires_grad)
        return 6 * n_active - 2 * min(n_frozen, n_active) + 12 * cfg.n_layer * cfg.n_embd * context

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, head_lr_scale=1.0):
        """AdamW over the trainable parameters: weight decay on matrices that multiply
        activations, none on norms, biases, untied embedding tables and LoRA adapters. A scalar
        head in a model that also trains its backbone (PPO's value head) may learn at
        head_lr_scale times the rate: it starts from nothing while the backbone is fine-tuned.
        Each group carries its lr_scale, which common.set_lr applies."""
        embeddings = {id(self.wte.weight)} if not self.config.tie_weights else set()
        if self.config.pos_emb == "learned":
            embeddings.add(id(self.wpe.weight))
        # LoRA adapters take no decay either: the rank already bounds the update, and decay would
        # shrink the random A toward zero whatever the data says (with lora_rank > 0 they are
        # the only trainable parameters, so the decay group is then empty)
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


# -----------------------------------------------------------------------------
# loading weights from elsewhere


def from_nanogpt(state_dict, model_args):
    """A nanoGPT checkpoint's state dict and model_args -> (GPTConfig, our state dict).

    nanoGPT's GPT is ours with learned positions, layernorm, gelu and tied weights; its keys live
    under transformer.*, and its attention projects q, k and v with one fused c_attn matrix,
    which we cut into c_q, c_k, c_v.
    """
    config = GPTConfig(vocab_size=model_args["vocab_size"], block_size=model_args["block_size"],
                       n_layer=model_args["n_layer"], n_head=model_args["n_head"], n_embd=model_args["n_embd"],
                       bias=model_args.get("bias", True), dropout=0.0, pos_emb="learned", norm="layernorm",
                       mlp="gelu", tie_weights=True)
    out = {}
    for k, v in state_dict.items():
        k = k.removeprefix("_orig_mod.").removeprefix("transformer.")
        if k.endswith(".attn.bias") or k.endswith(".attn.masked_bias"):
            continue  # the causal-mask buffer of nanoGPT's non-flash path, not a weight
        if ".attn.c_attn." in k:
            for name, part in zip(("c_q", "c_k", "c_v"), v.chunk(3, dim=0)):
                out[k.replace("c_attn", name)] = part.clone()
        else:
            out[k] = v
    return config, out


# Hugging Face folders: config.json + model.safetensors, as transformers' save_pretrained writes them.
# Two layouts of transformers' map onto this GPT, one for each family of switches:
#     GPT2LMHeadModel    pos_emb=learned, norm=layernorm, mlp=gelu, biases, usually a tied head
#     LlamaForCausalLM   pos_emb=rope, norm=rmsnorm, mlp=swiglu, grouped-query attention, either head
# MistralForCausalLM has Llama's layout; without its sliding window it is the same model.
HF_ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
# tensors of some checkpoints that are not weights: GPT-2's causal-mask buffers, Llama's rope table
HF_BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


def hf_tensor_names(config, arch):
    """How our state dict and theirs name the same weights: rows of (their name, our names,
    transposed). GPT-2 keeps its weights in Conv1D layers, (in, out), the transpose of nn.Linear's
    (out, in), and projects q, k, v with one fused c_attn: our c_q, c_k, c_v stacked, transposed.
    Llama's rope rotates the two halves of each head (rotate_half), as apply_rope does, so its
    q_proj and k_proj need no permutation. Both directions of the conversion read this table."""
    rows = []
    if arch == "GPT2LMHeadModel":
        rows += [("transformer.wte.weight", ["wte.weight"], False), ("transformer.wpe.weight", ["wpe.weight"], False)]
        for i in range(config.n_layer):
            for name, conv1d in (("ln_1", False), ("attn.c_attn", True), ("attn.c_proj", True), ("ln_2", False),
                                 ("mlp.c_fc", True), ("mlp.c_proj", True)):
                for w in ("weight", "bias"):  # GPT-2 always has biases; ours may be zeros (bias=False)
                    if name == "attn.c_attn":
                        ours = [f"h.{i}.attn.{n}.{w}" for n in ("c_q", "c_k", "c_v")]
                    else:
                        ours = [f"h.{i}.{name}.{w}"]
                    rows.append((f"transformer.h.{i}.{name}.{w}", ours, conv1d and w == "weight"))
        rows += [("transformer.ln_f.weight", ["ln_f.weight"], False), ("transformer.ln_f.bias", ["ln_f.bias"], False)]
    else:
        rows.append(("model.embed_tokens.weight", ["wte.weight"], False))
        linears = (("self_attn.q_proj", "attn.c_q"), ("self_attn.k_proj", "attn.c_k"), ("self_attn.v_proj", "attn.c_v"),
                   ("self_attn.o_proj", "attn.c_proj"), ("mlp.gate_proj", "mlp.c_gate"), ("mlp.up_proj", "mlp.c_fc"),
                   ("mlp.down_proj", "mlp.c_proj"))
        for i in range(config.n_layer):
            rows += [(f"model.layers.{i}.input_layernorm.weight", [f"h.{i}.ln_1.weight"], False),
                     (f"model.layers.{i}.post_attention_layernorm.weight", [f"h.{i}.ln_2.weight"], False)]
            for theirs, ours in linears:
                for w in ("weight", "bias") if config.bias else ("weight",):
                    rows.append((f"model.layers.{i}.{theirs}.{w}", [f"h.{i}.{ours}.{w}"], False))
        rows.append(("model.norm.weight", ["ln_f.weight"], False))
    if not config.tie_weights:
        rows.append(("lm_head.weight", ["lm_head.weight"], False))
    return rows


def config_from_hf(hf, source="config.json"):
    """A transformers config.json (as a dict) -> (GPTConfig, architecture). What this GPT cannot
    compute exactly (another architecture, rope scaling, attention biases without MLP biases,
    heads narrower than hidden_size / num_attention_heads ...) is refused with a ValueError that
    names the field. dropout is left at 0: a training script sets its own."""

    def refuse(field, why):
        raise ValueError(f"{source}: {field}={hf.get(field)!r}: {why}")

    def need(field):
        if field not in hf:
            raise ValueError(f"{source}: no {field!r}")
        return hf[field]

    archs = hf.get("architectures") or [HF_ARCHITECTURES.get(hf.get("model_type"), hf.get("model_type"))]
    arch = archs[0]
    if len(archs) != 1 or arch not in HF_ARCHITECTURES.values():
        refuse("architectures", f"only {', '.join(HF_ARCHITECTURES.values())} map onto this GPT")
    if arch == "GPT2LMHeadModel":
        approximate = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}.get(
            hf.get("activation_function", "gelu_new"))
        if approximate is None:
            refuse("activation_function", "expected gelu_new, gelu_pytorch_tanh (both tanh-approximated) or gelu")
        if not hf.get("scale_attn_weights", True):
            refuse("scale_attn_weights", "attention here is always scaled by 1/sqrt(head_dim)")
        if hf.get("scale_attn_by_inverse_layer_idx", False):
            refuse("scale_attn_by_inverse_layer_idx", "attention here is not scaled by the layer index")
        if hf.get("add_cross_attention", False):
            refuse("add_cross_attention", "a decoder-only GPT has no cross-attention")
        args = dict(vocab_size=need("vocab_size"), block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
                    n_layer=need("n_layer"), n_head=need("n_head"), n_embd=need("n_embd"), bias=True,
                    pos_emb="learned", norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp="gelu",
                    gelu_approximate=approximate, n_inner=hf.get("n_inner"),
                    tie_weights=hf.get("tie_word_embeddings", True))
    else:
        if hf.get("hidden_act", "silu") != "silu":
            refuse("hidden_act", "swiglu here gates with silu")
        if hf.get("rope_scaling") is not None:
            refuse("rope_scaling", "only plain rope (no scaling of positions or frequencies) is implemented")
        rope = hf.get("rope_parameters") or {}  # where transformers 5 keeps rope_theta and the scaling
        if rope.get("rope_type", "default") != "default" or set(rope) - {"rope_type", "rope_theta"}:
            refuse("rope_parameters", "only plain rope (rope_type default, no scaling) is implemented")
        n_embd, n_head = need("hidden_size"), need("num_attention_heads")
        if n_embd % n_head or hf.get("head_dim") not in (None, n_embd // n_head):
            refuse("head_dim", f"heads here are hidden_size / num_attention_heads = {n_embd / n_head:g} wide")
        attention_bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)
        if attention_bias != mlp_bias:
            refuse("attention_bias" if attention_bias else "mlp_bias",
                   "bias here is one switch for every linear layer: attention_bias and mlp_bias must agree")
        if arch == "MistralForCausalLM" and hf.get("sliding_window") is not None:
            refuse("sliding_window", "Mistral's window is not mapped onto ours (use a config with sliding_window null)")
        args = dict(vocab_size=need("vocab_size"), block_size=need("max_position_embeddings"),
                    n_layer=need("num_hidden_layers"), n_head=n_head, n_embd=n_embd,
                    n_kv_head=hf.get("num_key_value_heads") or n_head, bias=attention_bias, pos_emb="rope",
                    rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))), norm="rmsnorm",
                    norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu", n_inner=need("intermediate_size"),
                    tie_weights=hf.get("tie_word_embeddings", False))
    try:
        config = GPTConfig(**args)
        if config.n_inner is not None and GPTConfig(**dict(args, n_inner=None)).mlp_hidden == config.n_inner:
            config = replace(config, n_inner=None)  # the size we would pick: a round trip keeps the config equal
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    return config, arch


def read_hf_folder(folder):
    """-> (config.json as a dict, every tensor by its name) of a Hugging Face model folder: from
    model.safetensors, or the shards its index lists, or else the older pytorch_model.bin
    (read with weights_only: no code runs from the file)."""
    from safetensors.torch import load_file  # here, not at the top: only folders need the package

    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            hf = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    for name in ("model.safetensors", "pytorch_model.bin"):
        index = os.path.join(folder, name + ".index.json")  # a sharded checkpoint
        if os.path.isfile(os.path.join(folder, name)):
            files = [name]
        elif os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            continue
        tensors = {}
        for file in files:
            p = os.path.join(folder, file)
            try:
                tensors.update(load_file(p) if file.endswith(".safetensors")
                               else torch.load(p, map_location="cpu", weights_only=True))
            except Exception as e:
                raise ValueError(f"{p} is damaged or not a checkpoint: {type(e).__name__}: {e}") from None
        return hf, tensors
    raise ValueError(f"{folder}: config.json but no model.safetensors or pytorch_model.bin (or an index of shards)")


def from_hf(folder):
    """A Hugging Face model folder (GPT2LMHeadModel, LlamaForCausalLM) -> (GPTConfig, our state
    dict), the weights in the dtype they were saved in. Refuses (ValueError, naming the field or
    the tensor) what this GPT cannot compute exactly. GPT-2 always has biases; if every one of
    them is zero (a fresh init, or our export of a bias=False model) the model is bias=False."""
    hf, tensors = read_hf_folder(folder)
    config, arch = config_from_hf(hf, source=os.path.join(folder, "config.json"))
    # a bare GPT2Model / LlamaModel saved on its own has no prefix; a tied head may be saved too
    prefix = "transformer." if arch == "GPT2LMHeadModel" else "model."
    tensors = {k if k.startswith(prefix) or k == "lm_head.weight" else prefix + k: v
               for k, v in tensors.items() if not k.endswith(HF_BUFFERS)}
    if config.tie_weights:
        tensors.pop("lm_head.weight", None)
    rows = hf_tensor_names(config, arch)
    missing = [theirs for theirs, _, _ in rows if theirs not in tensors]
    unexpected = sorted(set(tensors) - {theirs for theirs, _, _ in rows})
    if missing or unexpected:
        raise ValueError(f"{folder}: the tensors do not fit {arch} as config.json describes it: missing "
                         f"{missing[:6]}{' ...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}"
                         f"{' ...' if len(unexpected) > 6 else ''}")
    with torch.device("meta"):  # the shapes our model expects, without allocating it
        expected = GPT(config).state_dict()
    sd = {}
    for theirs, ours, transposed in rows:
        t = tensors[theirs].t() if transposed else tensors[theirs]
        for name, part in zip(ours, t.chunk(len(ours))):
            if part.shape != expected[name].shape:
                raise ValueError(f"{folder}: {theirs} has shape {tuple(tensors[theirs].shape)}, but config.json "
                                 f"implies {tuple(expected[name].shape)} for our {name}")
            sd[name] = part.contiguous()
    if arch == "GPT2LMHeadModel" and not any(v.any() for k, v in sd.items() if k.endswith(".bias")):
        config = replace(config, bias=False)
        sd = {k: v for k, v in sd.items() if not k.endswith(".bias")}
    if config.tie_weights:
        sd["lm_head.weight"] = sd["wte.weight"]  # our state dict names the shared matrix twice
    return config, sd


def hf_architecture(config):
    """The transformers class that computes exactly what this config does, or a ValueError that
    says why there is none."""

    def refuse(why):
        raise ValueError(f"cannot export to transformers: {why}")

    if config.n_expert > 0:
        refuse(f"n_expert={config.n_expert}: mixture-of-experts layers have no transformers class with our layout")
    if config.sliding_window is not None:
        refuse(f"sliding_window={config.sliding_window}" + (f", n_sink={config.n_sink}" if config.n_sink else "") +
               ": GPT2LMHeadModel and LlamaForCausalLM attend to the whole context, without attention sinks")
    if config.pos_emb == "sinusoidal":
        refuse("pos_emb=sinusoidal: neither GPT2LMHeadModel (learned) nor LlamaForCausalLM (rope) has fixed sinusoids")
    layout = (config.pos_emb, config.norm, config.mlp)
    if layout == ("learned", "layernorm", "gelu"):
        if config.n_kv_head != config.n_head:
            refuse(f"n_kv_head={config.n_kv_head} < n_head={config.n_head}: GPT-2 has no grouped-query attention")
        return "GPT2LMHeadModel"
    if layout == ("rope", "rmsnorm", "swiglu"):
        return "LlamaForCausalLM"
    refuse(f"pos_emb={config.pos_emb}, norm={config.norm}, mlp={config.mlp}: GPT2LMHeadModel is learned / "
           "layernorm / gelu and LlamaForCausalLM rope / rmsnorm / swiglu; this mix is neither")


def to_hf(model, bos_token_id=None, eos_token_id=None):
    """Our GPT -> (a transformers config.json as a dict, its tensors by their names), for
    GPT2LMHeadModel or LlamaForCausalLM (hf_architecture refuses the rest). A LoRA model goes out
    with its adapters merged into the weights; a bias=False GPT-2 with zero biases."""
    cfg = model.config
    sd = model.merged_state_dict() if cfg.lora_rank or model.quantization else model.state_dict()
    cfg = replace(cfg, lora_rank=0)
    arch = hf_architecture(cfg)
    dtype = str(sd["wte.weight"].dtype).removeprefix("torch.")
    hf = dict(architectures=[arch], model_type="gpt2" if arch == "GPT2LMHeadModel" else "llama",
              vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_weights, bos_token_id=bos_token_id,
              eos_token_id=eos_token_id, torch_dtype=dtype)
    if arch == "GPT2LMHeadModel":
        hf.update(n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                  n_inner=cfg.n_inner, activation_function={"none": "gelu", "tanh": "gelu_new"}[cfg.gelu_approximate],
                  layer_norm_epsilon=cfg.norm_eps, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
                  attn_pdrop=cfg.dropout)
    else:
        hf.update(hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_hidden, num_hidden_layers=cfg.n_layer,
                  num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim,
                  hidden_act="silu", max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps,
                  rope_theta=cfg.rope_theta, rope_scaling=None, attention_bias=cfg.bias, mlp_bias=cfg.bias,
                  attention_dropout=cfg.dropout)
    tensors = {}
    for theirs, ours, transposed in hf_tensor_names(cfg, arch):
        parts = []
        for name in ours:
            if name not in sd:  # a bias of a bias=False model, which GPT-2 must have: zeros
                weight = sd[name.removesuffix("bias") + "weight"]
                parts.append(torch.zeros(weight.size(0), dtype=weight.dtype))
            else:
                parts.append(sd[name])
        t = torch.cat(parts) if len(parts) > 1 else parts[0]
        tensors[theirs] = (t.t() if transposed else t).detach().cpu().contiguous()
    return hf, tensors


def save_hf(model, folder, bos_token_id=None, eos_token_id=None):
    """Write config.json and model.safetensors, a folder that transformers'
    AutoModelForCausalLM.from_pretrained loads (see to_hf). -> the config written."""
    from safetensors.torch import save_file  # here, not at the top: only folders need the package

    hf, tensors = to_hf(model, bos_token_id, eos_token_id)
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    return hf
