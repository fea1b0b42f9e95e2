"""
Checkpoints in other projects' formats, in and out: nanoGPT's, and Hugging Face model folders
(GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, MixtralForCausalLM for a
mixture-of-experts model: config.json, model.safetensors, and a byte-level BPE's tokenizer files).

    from_nanogpt(state_dict, model_args)   a nanoGPT checkpoint -> (GPTConfig, our state dict)
    from_hf(folder)                        a model folder's weights -> (GPTConfig, our state dict)
    tokenizer_from_hf(folder)              its byte-level BPE -> a bpe.Tokenizer of kind hf
    hf_checkpoint(folder)                  both, as a checkpoint of ours (common.load_checkpoint)
    save_hf(model, folder)                 config.json + model.safetensors that transformers loads
    save_hf_tokenizer(tok, folder)         tokenizer.json + tokenizer_config.json, our chat template in it
    add_chat_tokens(tok, meta)             a tokenizer from elsewhere gets the chat template's tokens
    resize_vocab(model, vocab_size)        the model grows rows for them (new rows at the mean row)
    merged_state_dict(model)               the plain GPT a LoRA or quantized model computes

What the other side cannot compute exactly is refused, naming the field or the tensor.

    python sample.py --init_from=gpt2 --start="The meaning of life is" --temperature=0
    python sample.py --out_dir=out-sft --export_hf=out-sft-hf
"""

import json
import os
from dataclasses import asdict, replace

import torch

from bpe import (GPT2_PATTERN, GPT4_PATTERN, SPECIAL_TOKENS, Tokenizer, padded_vocab_size, render_bytes,
                 resolve_pattern, spell, unspell)
from model import GPT, GPTConfig, Linear, LoRALinear, is_lora_key, lora_layers, upcast

# -----------------------------------------------------------------------------
# nanoGPT


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


# -----------------------------------------------------------------------------
# Hugging Face folders: config.json + model.safetensors, as transformers' save_pretrained writes them.
# Two layouts of transformers' map onto this GPT, one for each family of switches:
#     GPT2LMHeadModel    pos_emb=learned, norm=layernorm, mlp=gelu, biases, usually a tied head
#     LlamaForCausalLM   pos_emb=rope, norm=rmsnorm, mlp=swiglu, grouped-query attention, either head
# MistralForCausalLM has Llama's layout; without its sliding window it is the same model. So has
# Qwen2ForCausalLM (Qwen2, Qwen2.5), with biases on q, k and v alone (qkv_bias) and full attention
# unless use_sliding_window. SmolLM2 is a LlamaForCausalLM. GPT-NeoX (Pythia) is refused by name.
# MixtralForCausalLM is Mistral with a MoE in every layer: a router (block_sparse_moe.gate) picks
# num_experts_per_tok of num_local_experts swiglu experts by a softmax over all of them, and mixes
# them by their probabilities renormalised over those picked; expert e's w1 is our c_gate, w3 c_fc,
# w2 c_proj (transformers 5 fuses w1 and w3 into gate_up_proj when it loads, and writes them apart).
HF_ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                    "qwen2": "Qwen2ForCausalLM", "mixtral": "MixtralForCausalLM"}
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
                   ("self_attn.o_proj", "attn.c_proj"))
        if arch == "MixtralForCausalLM":
            linears += (("block_sparse_moe.gate", "mlp.router"),)
            linears += tuple((f"block_sparse_moe.experts.{e}.{w}", f"mlp.experts.{e}.{ours}") for e in range(config.n_expert)
                             for w, ours in (("w1", "c_gate"), ("w3", "c_fc"), ("w2", "c_proj")))
        else:
            linears += (("mlp.gate_proj", "mlp.c_gate"), ("mlp.up_proj", "mlp.c_fc"), ("mlp.down_proj", "mlp.c_proj"))
        for i in range(config.n_layer):
            rows += [(f"model.layers.{i}.input_layernorm.weight", [f"h.{i}.ln_1.weight"], False),
                     (f"model.layers.{i}.post_attention_layernorm.weight", [f"h.{i}.ln_2.weight"], False)]
            for theirs, ours in linears:
                biased = config.bias or (config.qkv_bias and ours in ("attn.c_q", "attn.c_k", "attn.c_v"))
                for w in ("weight", "bias") if biased else ("weight",):
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
    if arch == "GPTNeoXForCausalLM" or hf.get("model_type") == "gpt_neox":
        rotary = hf.get("rotary_pct", (hf.get("rope_parameters") or {}).get("partial_rotary_factor", 0.25))
        refuse("architectures", "GPT-NeoX (Pythia) is not supported: it adds attention and the MLP to the residual "
               f"side by side (use_parallel_residual={hf.get('use_parallel_residual', True)}) and rotates only part "
               f"of each head (rotary_pct={rotary}); neither is a switch of this GPT")
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
        if arch in ("MistralForCausalLM", "MixtralForCausalLM") and hf.get("sliding_window") is not None:
            refuse("sliding_window", "Mistral's window is not mapped onto ours (use a config with sliding_window null)")
        qkv_bias = arch == "Qwen2ForCausalLM"  # Qwen2's q, k, v always have biases, its other layers never
        if qkv_bias and (hf.get("use_sliding_window") or
                         any(t != "full_attention" for t in hf.get("layer_types") or [])):
            refuse("use_sliding_window", "Qwen2's sliding window on its upper layers is not mapped onto ours")
        mixtral = arch == "MixtralForCausalLM"
        args = dict(vocab_size=need("vocab_size"), block_size=need("max_position_embeddings"),
                    n_layer=need("num_hidden_layers"), n_head=n_head, n_embd=n_embd,
                    n_kv_head=hf.get("num_key_value_heads") or n_head, bias=attention_bias, qkv_bias=qkv_bias,
                    pos_emb="rope",
                    rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 1e6 if mixtral else 10000.0))),
                    norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-5 if mixtral else 1e-6), mlp="swiglu",
                    n_inner=None if mixtral else need("intermediate_size"),  # Mixtral's: one expert's, below
                    tie_weights=hf.get("tie_word_embeddings", False))
        if mixtral:
            if hf.get("num_experts_per_tok", 2) == 1:
                refuse("num_experts_per_tok", "Mixtral renormalises the gates of the experts it picks, so a top-1 "
                       "gate is always 1; ours keeps the router's probability there (Switch Transformer)")
            args.update(n_expert=need("num_local_experts"), n_expert_active=hf.get("num_experts_per_tok", 2),
                        expert_hidden=need("intermediate_size"))
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
    """A Hugging Face model folder (GPT2LMHeadModel, LlamaForCausalLM, MixtralForCausalLM) ->
    (GPTConfig, our state dict), the weights in the dtype they were saved in. Refuses (ValueError,
    naming the field or the tensor) what this GPT cannot compute exactly. GPT-2 always has biases; if every one of
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

    if config.sliding_window is not None:
        refuse(f"sliding_window={config.sliding_window}" + (f", n_sink={config.n_sink}" if config.n_sink else "") +
               ": GPT2LMHeadModel and LlamaForCausalLM attend to the whole context, without attention sinks")
    if config.pos_emb == "sinusoidal":
        refuse("pos_emb=sinusoidal: neither GPT2LMHeadModel (learned) nor LlamaForCausalLM (rope) has fixed sinusoids")
    layout = (config.pos_emb, config.norm, config.mlp)
    if config.n_expert > 0:  # MixtralForCausalLM or nothing: what its MoE cannot express, by name
        moe = f"n_expert={config.n_expert}: a mixture-of-experts model exports as MixtralForCausalLM, "
        if layout != ("rope", "rmsnorm", "swiglu"):
            refuse(moe + f"which is rope / rmsnorm / swiglu, not pos_emb={config.pos_emb}, norm={config.norm}, "
                   f"mlp={config.mlp}")
        if config.moe_every > 1:
            refuse(moe + f"whose every layer is MoE; moe_every={config.moe_every} makes a hybrid dense/MoE stack")
        if config.n_shared_expert:
            refuse(moe + f"which has no shared experts (n_shared_expert={config.n_shared_expert})")
        if config.n_expert_active == 1:
            refuse(moe + "which renormalises the picked gates, so its top-1 gate is always 1; n_expert_active=1 "
                   "here keeps the router's probability as the gate (Switch Transformer)")
        if config.bias or config.qkv_bias:
            refuse(moe + f"which has no biases ({'bias' if config.bias else 'qkv_bias'}=True)")
        return "MixtralForCausalLM"
    if layout == ("learned", "layernorm", "gelu"):
        if config.n_kv_head != config.n_head:
            refuse(f"n_kv_head={config.n_kv_head} < n_head={config.n_head}: GPT-2 has no grouped-query attention")
        return "GPT2LMHeadModel"
    if layout == ("rope", "rmsnorm", "swiglu"):
        return "Qwen2ForCausalLM" if config.qkv_bias and not config.bias else "LlamaForCausalLM"
    refuse(f"pos_emb={config.pos_emb}, norm={config.norm}, mlp={config.mlp}: GPT2LMHeadModel is learned / "
           "layernorm / gelu and LlamaForCausalLM rope / rmsnorm / swiglu; this mix is neither")


def to_hf(model, bos_token_id=None, eos_token_id=None):
    """Our GPT -> (a transformers config.json as a dict, its tensors by their names), for
    GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM or MixtralForCausalLM (hf_architecture
    refuses the rest). A LoRA model goes out with its adapters merged into the weights; a bias=False
    GPT-2 with zero biases."""
    cfg = model.config
    sd = merged_state_dict(model) if cfg.lora_rank or model.quantization else model.state_dict()
    cfg = replace(cfg, lora_rank=0)
    arch = hf_architecture(cfg)
    dtype = str(sd["wte.weight"].dtype).removeprefix("torch.")
    model_type = {arch: model_type for model_type, arch in HF_ARCHITECTURES.items()}[arch]
    hf = dict(architectures=[arch], model_type=model_type,
              vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_weights, bos_token_id=bos_token_id,
              eos_token_id=eos_token_id, torch_dtype=dtype)
    if arch == "GPT2LMHeadModel":
        hf.update(n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                  n_inner=cfg.n_inner, activation_function={"none": "gelu", "tanh": "gelu_new"}[cfg.gelu_approximate],
                  layer_norm_epsilon=cfg.norm_eps, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
                  attn_pdrop=cfg.dropout)
    else:
        hf.update(hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_hidden, num_hidden_layers=cfg.n_layer,
                  num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, hidden_act="silu",
                  max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                  rope_scaling=None, attention_dropout=cfg.dropout)
        if arch == "Qwen2ForCausalLM":  # its q, k, v biases are fixed by the class; every layer attends fully
            hf.update(use_sliding_window=False, sliding_window=None)
        else:
            hf.update(head_dim=cfg.head_dim, attention_bias=cfg.bias, mlp_bias=cfg.bias)
    if arch == "MixtralForCausalLM":  # its intermediate_size is one expert's; no sliding window, no jitter
        hf.update(intermediate_size=cfg.expert_hidden, num_local_experts=cfg.n_expert,
                  num_experts_per_tok=cfg.n_expert_active, sliding_window=None, router_jitter_noise=0.0)
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


# -----------------------------------------------------------------------------
# our own weights: the plain export, the adapters alone, a grown vocabulary


def merged_state_dict(model):
    """The weights of the plain full-precision GPT that model computes: adapters folded in, adapter
    keys left out, quantized weights dequantized (the export of a QLoRA run). Loads strictly into
    GPT(replace(model.config, lora_rank=0)). The model itself is left as it is."""
    sd = {k: v for k, v in model.state_dict().items() if not is_lora_key(k)}
    for name, layer in model.named_modules():
        if not isinstance(layer, Linear):
            continue
        if isinstance(layer.weight, torch.Tensor):
            w = layer.weight.detach()  # the merged weight itself when merged
        else:  # a weight that is a module (quantized): its own keys out, its numbers in full
            for key in layer.weight.state_dict():
                del sd[f"{name}.weight.{key}"]
            w = layer.weight.dequantize()
        if isinstance(layer, LoRALinear) and not layer.merged:
            w = (upcast(w) + layer.delta_weight().detach()).to(w.dtype)
        sd[name + ".weight"] = w
    if model.config.tie_weights:  # a quantized copy of a tied head is the table, which is exact
        sd["lm_head.weight"] = sd["wte.weight"]
    return sd


def lora_state_dict(model):
    """Only the adapters: a fine-tune saved on its own, to load on top of its base checkpoint."""
    return {k: v for k, v in model.state_dict().items() if is_lora_key(k)}


def load_lora_state_dict(model, sd):
    """Load adapters saved by lora_state_dict: every adapter key, no other, into an unmerged model."""
    load_part(model, sd, "adapter state dict", adapters=True)


def load_base_weights(model, sd):
    """Load a base checkpoint (lora_rank 0): every key but the adapters', no other; the adapters
    keep their fresh init."""
    load_part(model, sd, "base state dict", adapters=False)


def load_part(model, sd, what, adapters):
    if any(layer.merged for layer in lora_layers(model)):
        raise RuntimeError(f"LoRA: unmerge_lora() before loading {'adapters' if adapters else 'base weights'}")
    own = {k: v for k, v in model.state_dict().items() if is_lora_key(k) == adapters}
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ValueError(f"LoRA: {what} does not fit this model: missing keys {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    for k, v in sd.items():
        if v.shape != own[k].shape:
            raise ValueError(f"LoRA: {what}: {k} has shape {tuple(v.shape)}, "
                             f"this model has {tuple(own[k].shape)} (another lora_rank?)")
    model.load_state_dict(sd, strict=False)


@torch.no_grad()
def resize_vocab(model, vocab_size):
    """Grow model's token embedding, and an untied head, to vocab_size rows, for tokens appended to
    the tokenizer (add_chat_tokens). Old ids compute exactly what they did. A new row starts at the
    mean of the old rows, so a new token begins as an average token with a logit near the mean,
    not as a random direction that may dominate the softmax (Hewitt 2021, "Initializing new word
    embeddings"). A frozen table (LoRA) stays frozen."""
    old = model.config.vocab_size
    if vocab_size < old:
        raise ValueError(f"resize_vocab grows the vocabulary: {vocab_size} < {old} rows")
    if isinstance(model.lm_head, LoRALinear):
        raise ValueError("resize_vocab: the head has LoRA adapters (lora_targets has lm_head); "
                         "resize before adding them")
    if not isinstance(model.lm_head.weight, torch.Tensor):
        raise ValueError("resize_vocab: the head is quantized (quantize_head); resize before quantizing")

    def grown(w):  # (old, C) -> (vocab_size, C)
        mean = upcast(w).mean(dim=0, keepdim=True).to(w.dtype)
        return torch.nn.Parameter(torch.cat((w, mean.expand(vocab_size - old, -1))), requires_grad=w.requires_grad)

    model.wte.weight = grown(model.wte.weight)
    model.wte.num_embeddings = vocab_size
    model.lm_head.weight = model.wte.weight if model.config.tie_weights else grown(model.lm_head.weight)
    model.lm_head.out_features = vocab_size
    model.config = replace(model.config, vocab_size=vocab_size)


# -----------------------------------------------------------------------------
# Hugging Face tokenizer files: GPT-2's vocab.json + merges.txt, or tokenizer.json, in; tokenizer.json out

# SmolLM2's and StarCoder2's pre-tokenizer, Digits(individual_digits) then ByteLevel with GPT-2's
# regex, as one regex: every numeral alone, and GPT-2's alternatives on the stretches between them,
# so none may run into a numeral (" ?\p{N}+" goes) and a whitespace run ends where a numeral starts
# as it would at the end of its stretch ((?!\S) becomes (?![^\s\p{N}])).
DIGITS_GPT2_PATTERN = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""


def step_types(spec, part):
    """The types of a tokenizer.json's normalizer, pre_tokenizer or decoder, a Sequence unrolled."""
    node = spec.get(part) or {}
    steps = node.get("normalizers") or node.get("pretokenizers") or node.get("decoders") or [node]
    return [step.get("type") for step in steps if step]


def split_pattern(pre):
    """The regex of a byte-level pre_tokenizer (tokenizer.json's, as a dict), or None when it is
    not one of the three that byte-level BPEs use: ByteLevel, which splits with GPT-2's regex
    (GPT-2, Pythia, a ByteLevelBPETokenizer trained by the tokenizers library); a Split by a regex
    then ByteLevel without one (Llama 3, Qwen2); Digits then ByteLevel (SmolLM2, StarCoder2)."""
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if not steps or steps[-1].get("type") != "ByteLevel" or steps[-1].get("add_prefix_space"):
        return None
    byte_regex = steps[-1].get("use_regex", True)
    if len(steps) == 1 and byte_regex:
        return GPT2_PATTERN
    if len(steps) != 2:
        return None
    first = steps[0]
    if (first.get("type") == "Split" and "Regex" in (first.get("pattern") or {}) and first.get("behavior") == "Isolated"
            and not first.get("invert") and not byte_regex):
        return replace_dollar(first["pattern"]["Regex"], r"(?=\n|\z)")  # Oniguruma's end of a line
    if first.get("type") == "Digits" and first.get("individual_digits") and byte_regex:
        return DIGITS_GPT2_PATTERN
    return None


def tokenizer_from_hf(folder):
    """The tokenizer of a Hugging Face model folder, if it is a byte-level BPE (GPT-2's, Llama 3's,
    SmolLM2's, Qwen2's ...), as a Tokenizer of kind hf with the folder's ids: its tokenizer.json,
    else GPT-2's vocab.json + merges.txt (with GPT-2's split pattern).

    tiktoken merges the adjacent pair whose joined bytes have the lowest rank, which is the id;
    the files list merges in priority order. The two agree when each merge makes a token of a
    higher id than the merge before it, which is checked. Every added token (added_tokens) is a
    special token at its own id, wherever that is (a tokenizer trained by the tokenizers library
    puts them first): encode() keeps its text as text unless allowed_special names it. That is
    transformers' rule for the tokens it calls special; an added token it does not call special
    (Qwen2.5's <tool_call>) it would split out of any text, and here it too stays text unless asked
    for. A vocab token that no merge makes (GPT-2's <|endoftext|>) can only be a special token, and
    is one. Raises ValueError naming the file and what does not map: a SentencePiece-style BPE
    (Llama 2, TinyLlama, Mistral: metaspace and byte fallback), a normaliser other than NFC, a
    word-piece prefix ..."""
    path = os.path.join(folder, "tokenizer.json")

    def refuse(what):
        raise ValueError(f"{path}: {what}")

    def read_json(p):
        try:
            with open(p, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read {p}: {e}") from None

    normalizer = None
    if os.path.isfile(path):
        spec = read_json(path)
        model = spec.get("model") or {}
        found = [f"{part} {t}" for part in ("normalizer", "pre_tokenizer", "decoder") for t in step_types(spec, part)
                 if t in ("Metaspace", "Prepend", "ByteFallback")]
        found += ["model.byte_fallback"] if model.get("byte_fallback") else []
        if found:
            refuse(f"a SentencePiece-style BPE ({', '.join(found)}), as Llama 2, TinyLlama and Mistral use: it merges "
                   "characters, writes a space as \u2581 and spells a character outside its vocab as <0xNN> byte "
                   "tokens. Not supported: tiktoken runs byte-level BPE, whose tokens are bytes (GPT-2, Llama 3, "
                   "SmolLM2, Qwen2)")
        if model.get("type") != "BPE":
            refuse(f"model.type={model.get('type')!r}: expected a byte-level BPE")
        for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
            if model.get(key):
                refuse(f"model.{key}={model[key]!r}: not part of a byte-level BPE")
        if spec.get("normalizer") is not None:
            if step_types(spec, "normalizer") != ["NFC"]:
                refuse(f"normalizer={'+'.join(map(str, step_types(spec, 'normalizer')))}: the text is encoded as "
                       "it is, or in NFC (Qwen2's), not otherwise normalised")
            normalizer = "NFC"
        pattern = split_pattern(spec.get("pre_tokenizer") or {})
        if pattern is None:
            refuse(f"pre_tokenizer={'+'.join(map(str, step_types(spec, 'pre_tokenizer')))}: expected ByteLevel "
                   "(with GPT-2's regex, without add_prefix_space), or a Split by a regex (Isolated) or Digits "
                   "(individual_digits) before it")
        vocab, merges, added = model["vocab"], model["merges"], spec.get("added_tokens") or []
    else:
        path = os.path.join(folder, "vocab.json")
        if not os.path.isfile(path) or not os.path.isfile(os.path.join(folder, "merges.txt")):
            raise ValueError(f"{folder}: no tokenizer.json, nor vocab.json and merges.txt")
        vocab, pattern = read_json(path), GPT2_PATTERN
        with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
            merges = [line for line in f.read().splitlines() if line and not line.startswith("#version")]
        config_path = os.path.join(folder, "tokenizer_config.json")
        decoder = read_json(config_path).get("added_tokens_decoder", {}) if os.path.isfile(config_path) else {}
        added = [dict(t, id=int(i)) for i, t in decoder.items()]

    spelled = {i: s for s, i in vocab.items()}

    def ordinary(t):  # an added token that is not special and is the vocab's own token at its id
        try:
            return not t.get("special") and t["id"] in spelled and unspell(spelled[t["id"]]) == t["content"].encode()
        except ValueError:
            return False

    specials = {t["content"]: t["id"] for t in added if not ordinary(t)}
    special_ids = set(specials.values())
    try:
        pattern = resolve_pattern(pattern)
        token = {i: unspell(s) for s, i in vocab.items() if i not in special_ids}
        merges = [tuple(unspell(p) for p in (m.split(" ") if isinstance(m, str) else m)) for m in merges]
    except ValueError as e:
        refuse(e)
    ids = {t: i for i, t in token.items()}
    made, last = set(), -1
    for n, pair in enumerate(merges):
        joined = b"".join(pair)
        if len(pair) != 2 or any(p not in ids for p in pair) or joined not in ids:
            refuse(f"merge {n} {[spell(p) for p in pair]} uses or makes a token that is not in the vocab")
        if ids[joined] <= last:
            refuse(f"merge {n} makes id {ids[joined]}, not above the id {last} that merge {n - 1} makes: "
                   "merge priority and rank would differ")
        made.add(joined)
        last = ids[joined]
    if any(bytes([b]) not in ids for b in range(256)):
        refuse("not byte-level: some of the 256 single bytes are not in the vocab")
    for i, t in token.items():
        if len(t) > 1 and t not in made:
            specials[t.decode("utf-8", errors="replace")] = i  # no merge makes it: only a special token can be it
            special_ids.add(i)
    ranks = {t: i for i, t in token.items() if i not in special_ids}
    try:
        return Tokenizer("hf", pattern=pattern, ranks=ranks, special_tokens=specials, normalizer=normalizer)
    except ValueError as e:
        refuse(e)


def save_hf_tokenizer(tok, folder, model_max_length=None):
    """Write tokenizer.json and tokenizer_config.json into folder: transformers' AutoTokenizer
    (a PreTrainedTokenizerFast) reads them as tok, with the same ids, and, where the
    chat tokens exist, with our chat template (apply_chat_template gives render_prompt's ids).
    The file lists merges: a gpt2 or hf tokenizer's are recovered from its ranks. Raises
    ValueError where there are none to recover, or two ids spell the same bytes (the file maps
    each spelling to one id). The special tokens keep their ids, wherever they are."""
    special_ids = set(tok.special_tokens.values())
    ordinary = {i: token for i, token in enumerate(tok.vocab) if i not in special_ids}  # id -> bytes
    if len(set(ordinary.values())) != len(ordinary):
        raise ValueError(f"this {tok.kind} tokenizer has ids that spell the same bytes, which "
                         "tokenizer.json cannot express")
    merges = tok.merges if tok.merges is not None else merges_from_ranks(ordinary)
    specials = sorted(tok.special_tokens.items(), key=lambda item: item[1])
    spec = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for name, i in specials],
        "normalizer": {"type": tok.normalizer} if tok.normalizer else None,
        # split by our regex, then spell each chunk's bytes as characters, as GPT-2's files do
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": replace_dollar(tok.pattern or GPT4_PATTERN, r"\z")},
             "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        # ignore_merges: a chunk that is one token is that token, as tiktoken encodes it
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  # the special tokens too, by name, as GPT-2's and SmolLM2's files have them: the
                  # tokenizers library reads an added token's id from the vocab, else puts it after it
                  "vocab": {**{spell(token): i for i, token in ordinary.items()}, **dict(specials)},
                  "merges": [[spell(ordinary[a]), spell(ordinary[b])] for a, b in merges]},
    }
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    if "<|endoftext|>" in tok.special_tokens:
        config.update(bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    if set(SPECIAL_TOKENS) <= set(tok.special_tokens):
        config["chat_template"] = CHAT_TEMPLATE
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(spec, f, ensure_ascii=False)
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)


def add_chat_tokens(tok, meta, verbose=True):
    """-> (tokenizer, meta) with the chat template's special tokens (SPECIAL_TOKENS). Ours
    reserve them; a tokenizer from elsewhere lacks some, and they are appended. Where the model
    has no rows for them, meta's vocab_size grows (to a multiple of 64) and the caller grows the
    model to it with resize_vocab(model, meta["vocab_size"])."""
    new = tok.with_special_tokens(SPECIAL_TOKENS)
    if new is tok:
        return tok, meta
    vocab_size = max(meta["vocab_size"], padded_vocab_size(new.n_vocab, 64))
    if verbose:
        added = [name for name in new.special_tokens if name not in tok.special_tokens]
        print(f"tokenizer: appended {' '.join(added)} as ids {tok.n_vocab}..{new.n_vocab - 1}; " +
              (f"the token embedding (and an untied head) grows from {meta['vocab_size']} to {vocab_size} rows"
               if vocab_size > meta["vocab_size"] else f"the model's {vocab_size} rows already cover them"))
    meta = dict(meta, tokenizer=new.kind, vocab_size=vocab_size, n_vocab=new.n_vocab,
                special_tokens=new.special_tokens, tokenizer_state=new.state())
    return new, meta


def merges_from_ranks(vocab):
    """The merges that ranks imply: the token of rank r is made from the two pieces that BPE,
    allowed only tokens ranked below r, leaves of its bytes (how GPT-2's merges.txt and its
    tiktoken ranks correspond). vocab: {rank: token bytes}, the ordinary tokens (a special token's
    id is no rank) -> [(rank, rank)] in rank order. Raises ValueError for a token that no two
    lower-ranked tokens make."""
    rank = {token: r for r, token in vocab.items()}
    merges = []
    for r, token in sorted(vocab.items()):
        if len(token) == 1:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            j = min(range(len(parts) - 1), key=lambda j: rank.get(parts[j] + parts[j + 1], r))
            if rank.get(parts[j] + parts[j + 1], r) >= r:
                break
            parts[j : j + 2] = [parts[j] + parts[j + 1]]
        if len(parts) != 2 or rank.get(parts[0], r) >= r or rank.get(parts[1], r) >= r:
            raise ValueError(f"token {r} ({render_bytes(token)!r}) is not the merge of two tokens ranked below it")
        merges.append((rank[parts[0]], rank[parts[1]]))
    return merges


def replace_dollar(pattern, anchor):
    r"""pattern with each $ anchor (not escaped, not inside [...]) replaced by anchor. transformers
    splits with Oniguruma's Ruby syntax, where $ matches at the end of every line; tiktoken and
    the regex package match it only at the end of the text, which all three spell \z. So
    "a \n" splits by \s+$ into "a", " ", "\n" there and "a", " \n" here (at |\s*[\r\n])."""
    out, i, depth = [], 0, 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            out.append(pattern[i : i + 2])
            i += 2
            continue
        if c == "[":
            depth += 1
        elif c == "]" and depth:
            depth -= 1
        elif c == "$" and not depth:
            c = anchor
        out.append(c)
        i += 1
    return "".join(out)


# our chat template (Tokenizer.render_prompt) in the Jinja of transformers' apply_chat_template
CHAT_TEMPLATE = ("<|endoftext|>{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] "
                 "+ '<|end|>' }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


# -----------------------------------------------------------------------------
# a folder as a checkpoint of ours


def hf_checkpoint(folder):
    """A Hugging Face model folder (GPT-2, Llama, Mistral or Qwen2 layout, with its byte-level BPE
    tokenizer) as a checkpoint of ours: {"model", "model_args", "meta", "stage": "hf"}. meta carries
    the tokenizer's state, so what a stage writes from it never needs the folder again."""
    config, state_dict = from_hf(folder)
    tok = tokenizer_from_hf(folder)
    if tok.n_vocab > config.vocab_size:
        raise ValueError(f"{folder}: the tokenizer has {tok.n_vocab} ids, the model only {config.vocab_size}")
    meta = {"tokenizer": tok.kind, "vocab_size": config.vocab_size, "n_vocab": tok.n_vocab,
            "special_tokens": tok.special_tokens, "tokenizer_state": tok.state(), "source": os.path.abspath(folder)}
    return {"model": state_dict, "model_args": asdict(config), "meta": meta, "stage": "hf"}
