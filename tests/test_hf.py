"""
Hugging Face interop: folders that transformers writes load into our GPT and compute the same
logits and greedy tokens; what we export, transformers loads and computes the same; ours -> HF ->
ours is bit-identical; the folder's tokenizer encodes as transformers' does; what does not map is
refused with a message naming the field. Every model is tiny and random, built and saved here:
nothing is downloaded.

    python -m pytest tests/test_hf.py -q
"""

import json
import os
import random
from dataclasses import asdict

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import bpe  # noqa: E402
import common  # noqa: E402
from conftest import TEXT, run_forked, save_byte_checkpoint  # noqa: E402
from convert import (config_from_hf, from_hf, hf_architecture, resize_vocab, save_hf, save_hf_tokenizer,  # noqa: E402
                     tokenizer_from_hf)
from model import GPT, GPTConfig, apply_rope, rope_cos_sin  # noqa: E402

transformers.logging.set_verbosity_error()
TOL = 1e-5  # fp32, max |logit difference|

# -----------------------------------------------------------------------------
# helpers: tiny random models saved by transformers, text to tokenize


def randomize(model, std, seed=0):
    """Every parameter drawn afresh, norms and biases included (a fresh init has biases at 0 and
    norm weights at 1, which would hide a bias or a norm weight that went to the wrong place)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def hf_gpt2(folder, std=0.3, **kw):
    """A random GPT2LMHeadModel saved to folder."""
    args = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32, bos_token_id=None, eos_token_id=None)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**args, **kw})).eval()
    randomize(model, std).save_pretrained(folder)
    return model


def hf_llama(folder, std=0.3, mistral=False, **kw):
    """A random LlamaForCausalLM (grouped-query attention, untied head, a rope_theta, eps and
    MLP size of its own) saved to folder; or the same as a MistralForCausalLM."""
    args = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=32, rope_theta=500000.0, rms_norm_eps=1e-6,
                tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, **kw)
    if mistral:
        model = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=None, **args))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**args))
    randomize(model.eval(), std).save_pretrained(folder)
    return model


def hf_mixtral(folder, std=0.3, **kw):
    """A random MixtralForCausalLM (4 experts, top-2, grouped-query attention, an untied head)
    saved to folder."""
    args = dict(vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=32, num_local_experts=4, num_experts_per_tok=2,
                rope_theta=500000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=None,
                eos_token_id=None, **kw)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**args))
    randomize(model.eval(), std).save_pretrained(folder)
    return model


def ours_from(folder):
    config, sd = from_hf(folder)
    model = GPT(config).eval()
    model.load_state_dict(sd)
    return model


def max_diff(ours, theirs, idx):
    with torch.no_grad():
        return (ours.logits(ours(idx)) - theirs(idx).logits).abs().max().item()


PIECES = ["the", "The", " of", " and", "ROMEO", "citizen", "don't", "I'm", "we'll", "they're", "IT'S", "'s",
          "naïve", "café", "Straße", "über", "日本語", "中文字", "한국어", "Ελληνικά", "русский", "😀", "👍🏽", "🇫🇷",
          "e\u0301", "x²", "½", "1234567", "3.14", "2024-01-01", "$100", "<|endoftext|>", "<|end|>", "<|user|>",
          "<|", "|>", "\u200b", "\u00a0", "\t", "\n", "\r\n", "  ", "   ", "\n\n\n", " \n ", "...", "!!!", "?!",
          "-->", "#", "@user", "http://x.y/z?a=b", "\x00", "\x7f", "ǅ", "''"]


def varied_strings(n, seed):
    """n strings mixing words, scripts, emoji, digits, whitespace runs and special-looking text."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(1, 8)
        parts = [rng.choice(PIECES) if rng.random() < 0.8 else chr(rng.choice([rng.randint(32, 0x2FFF),
                 rng.randint(0x1F300, 0x1FAFF)])) for _ in range(k)]
        out.append("".join(p + rng.choice(["", "", " ", "  ", "\n", "\t"]) for p in parts))
    return out


def write_gpt2_tokenizer(folder, tok):
    """Our trained bpe tokenizer written as GPT-2's vocab.json + merges.txt, in GPT-2's id order:
    the 256 bytes sorted by the character that spells them (the printable ones first, so id 0 is
    "!", not byte 0), then one id per merge, then <|endoftext|>. -> the ids the files give (bytes)."""
    order = sorted(range(256), key=lambda b: bpe.BYTE_CHARS[b])
    vocab = [bytes([b]) for b in order] + tok.vocab[256: tok.n_vocab - len(tok.special_tokens)]
    spelled = {bpe.spell(t): i for i, t in enumerate(vocab)}
    spelled["<|endoftext|>"] = len(vocab)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(spelled, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in tok.merges:
            f.write(f"{bpe.spell(tok.vocab[a])} {bpe.spell(tok.vocab[b])}\n")
    return vocab


@pytest.fixture(scope="module")
def trained():
    """A small byte-level BPE with GPT-2's split pattern, trained on varied text."""
    return bpe.train([TEXT[:3000], *varied_strings(400, seed=1)], 700, pattern="gpt2")


# -----------------------------------------------------------------------------
# the switches interop needs: defaults that keep every old checkpoint's model, checked values


def test_new_config_fields_default_to_the_old_model_and_are_checked():
    new = ("norm_eps", "gelu_approximate", "n_inner", "qkv_bias")
    old = {k: v for k, v in asdict(GPTConfig()).items() if k not in new}
    model = GPT(GPTConfig(**old))  # a checkpoint written before these fields existed
    assert model.h[0].ln_1.eps == 1e-5 and model.h[0].mlp.c_fc.out_features == 1024  # 8/3 * 384 up to 64
    assert model.h[0].attn.c_q.bias is None
    assert GPT(GPTConfig(**dict(old, mlp="gelu"))).h[0].mlp.gelu_approximate == "none"  # exact, erf
    for bad, message in [(dict(norm_eps=0.0), "norm_eps"), (dict(gelu_approximate="sigmoid"), "gelu_approximate"),
                         (dict(gelu_approximate="tanh"), "needs mlp=gelu"), (dict(n_inner=0), "n_inner")]:
        with pytest.raises(ValueError, match=message):
            GPTConfig(**bad)


# -----------------------------------------------------------------------------
# loading: their model, our GPT, the same numbers


@pytest.mark.parametrize("activation", ["gelu_new", "gelu"])
def test_gpt2_folder_gives_the_same_logits_and_greedy_tokens(tmp_path, activation):
    theirs = hf_gpt2(tmp_path, activation_function=activation, layer_norm_epsilon=1e-6)
    ours = ours_from(tmp_path)
    cfg = ours.config
    assert (cfg.pos_emb, cfg.norm, cfg.mlp, cfg.bias, cfg.tie_weights, cfg.norm_eps) == ("learned", "layernorm", "gelu",
                                                                                          True, True, 1e-6)
    assert cfg.gelu_approximate == ("tanh" if activation == "gelu_new" else "none")
    idx = torch.randint(0, 64, (3, 32), generator=torch.Generator().manual_seed(0))
    assert max_diff(ours, theirs, idx) < TOL
    prompt = idx[:1, :5]
    expected = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False)
    assert torch.equal(ours.generate(prompt, 20, temperature=0), expected)  # with our KV cache


@pytest.mark.parametrize("mistral", [False, True])
def test_llama_folder_gives_the_same_logits_and_greedy_tokens(tmp_path, mistral):
    theirs = hf_llama(tmp_path, mistral=mistral)
    ours = ours_from(tmp_path)
    cfg = ours.config
    assert (cfg.pos_emb, cfg.norm, cfg.mlp, cfg.bias, cfg.tie_weights) == ("rope", "rmsnorm", "swiglu", False, False)
    assert (cfg.n_kv_head, cfg.rope_theta, cfg.norm_eps, cfg.n_inner) == (2, 500000.0, 1e-6, 48)
    idx = torch.randint(0, 64, (3, 32), generator=torch.Generator().manual_seed(0))
    assert max_diff(ours, theirs, idx) < TOL
    prompt = idx[:1, :5]
    expected = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False)
    assert torch.equal(ours.generate(prompt, 20, temperature=0), expected)


def test_mixtral_folder_gives_the_same_logits_and_greedy_tokens(tmp_path):
    theirs = hf_mixtral(tmp_path)
    ours = ours_from(tmp_path)
    cfg = ours.config
    assert (cfg.n_expert, cfg.n_expert_active, cfg.expert_hidden, cfg.moe_every, cfg.n_shared_expert) == (4, 2, 24, 1, 0)
    assert (cfg.n_kv_head, cfg.rope_theta, cfg.norm_eps, cfg.tie_weights) == (2, 500000.0, 1e-6, False)
    idx = torch.randint(0, 64, (3, 32), generator=torch.Generator().manual_seed(0))
    assert max_diff(ours, theirs, idx) < TOL
    ours(idx)
    assert min(min(layer) for layer in ours.moe_stats()["load"]) > 0  # every expert took tokens: all are checked
    prompt = idx[:1, :5]
    expected = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False)
    assert torch.equal(ours.generate(prompt, 20, temperature=0), expected)


def test_our_rope_is_llamas_rotate_half():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=2, rope_theta=50.0)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 2, 9, 32, generator=g), torch.randn(2, 2, 9, 32, generator=g)
    pos = torch.arange(9)[None].expand(2, 9)
    cos, sin = LlamaRotaryEmbedding(config)(q, pos)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin)
    rope = rope_cos_sin(pos, 32, 50.0, torch.float32)
    assert torch.allclose(apply_rope(q, *rope), q_hf, atol=1e-6)
    assert torch.allclose(apply_rope(k, *rope), k_hf, atol=1e-6)
    assert not torch.allclose(q_hf, q, atol=1e-2)  # the rotation did something


def test_zero_biases_load_as_bias_false_and_bare_or_sharded_checkpoints_load(tmp_path):
    theirs = hf_gpt2(tmp_path / "a")
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if name.endswith(".bias"):
                p.zero_()
    theirs.save_pretrained(tmp_path / "b", max_shard_size="20KB")  # a sharded checkpoint with its index
    assert os.path.isfile(tmp_path / "b" / "model.safetensors.index.json")
    ours = ours_from(tmp_path / "b")
    assert ours.config.bias is False
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    assert max_diff(ours, theirs, idx) < TOL
    # the older pickle, saved from the bare GPT2Model (no "transformer." prefix) with mask buffers
    bare = {k.removeprefix("transformer."): v for k, v in theirs.state_dict().items() if k != "lm_head.weight"}
    bare["h.0.attn.bias"] = torch.tril(torch.ones(32, 32))[None, None]
    os.makedirs(tmp_path / "c")
    torch.save(bare, tmp_path / "c" / "pytorch_model.bin")
    os.link(tmp_path / "b" / "config.json", tmp_path / "c" / "config.json")
    assert max_diff(ours_from(tmp_path / "c"), theirs, idx) < TOL


# -----------------------------------------------------------------------------
# export: our GPT, their model, the same numbers; and back, bit for bit

EXPORTS = {
    "gpt2": dict(pos_emb="learned", norm="layernorm", mlp="gelu"),
    "gpt2_tanh_bias_untied": dict(pos_emb="learned", norm="layernorm", mlp="gelu", gelu_approximate="tanh",
                                  bias=True, tie_weights=False, n_inner=48, norm_eps=1e-6),
    "llama_gqa_untied": dict(n_kv_head=2, tie_weights=False, rope_theta=5e5, norm_eps=1e-6),
    "llama_bias_tied": dict(bias=True, n_inner=80),
    "qwen2_qkv_bias_gqa": dict(qkv_bias=True, n_kv_head=2, rope_theta=1e6, norm_eps=1e-6),
    # the router's softmax, its top-k and the renormalised gates must be Mixtral's to agree at 1e-5
    "mixtral_gqa_untied": dict(n_expert=4, n_expert_active=2, n_kv_head=2, tie_weights=False, rope_theta=5e5),
    "mixtral_top3_tied": dict(n_expert=5, n_expert_active=3, expert_hidden=40, norm_eps=1e-6),
}


@pytest.mark.parametrize("name", EXPORTS)
def test_export_loads_in_transformers_and_round_trips_bit_identical(tmp_path, name):
    config = GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32, **EXPORTS[name])
    ours = randomize(GPT(config).eval(), 0.3)
    hf = save_hf(ours, tmp_path, eos_token_id=3)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    arch = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "mixtral": "MixtralForCausalLM"}[name.split("_")[0]]
    assert type(theirs).__name__ == hf["architectures"][0] == arch
    idx = torch.randint(0, 64, (3, 32), generator=torch.Generator().manual_seed(0))
    assert max_diff(ours, theirs, idx) < TOL
    config_back, sd_back = from_hf(tmp_path)
    assert config_back == config
    sd = ours.state_dict()
    assert sd.keys() == sd_back.keys() and all(torch.equal(sd[k], sd_back[k]) for k in sd)


def test_lora_model_exports_its_merged_weights(tmp_path):
    config = GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32, lora_rank=4,
                       lora_targets=("attn",))
    ours = randomize(GPT(config).eval(), 0.3)  # lora_B too: the adapters change the output
    save_hf(ours, tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    assert max_diff(ours, theirs, idx) < TOL
    assert from_hf(tmp_path)[0].lora_rank == 0


# -----------------------------------------------------------------------------
# what does not map is refused, naming the field

LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=64, hidden_size=32,
             intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=32, rms_norm_eps=1e-6, rope_theta=10000.0, hidden_act="silu")
MIXTRAL = dict(LLAMA, architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=4,
               num_experts_per_tok=2)
GPT2 = dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=64, n_positions=32, n_embd=32,
            n_layer=2, n_head=4, activation_function="gelu_new")


@pytest.mark.parametrize("base, change, field", [
    (LLAMA, dict(architectures=["FalconForCausalLM"]), "architectures"),
    (LLAMA, dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling"),
    (LLAMA, dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}), "rope_parameters"),
    (LLAMA, dict(attention_bias=True), "attention_bias"),
    (LLAMA, dict(mlp_bias=True), "mlp_bias"),
    (LLAMA, dict(head_dim=16), "head_dim"),
    (LLAMA, dict(hidden_act="gelu"), "hidden_act"),
    (dict(LLAMA, architectures=["MistralForCausalLM"]), dict(sliding_window=4096), "sliding_window"),
    (MIXTRAL, dict(sliding_window=4096), "sliding_window"),
    (MIXTRAL, dict(num_experts_per_tok=1), "num_experts_per_tok=1: Mixtral renormalises"),
    (MIXTRAL, dict(num_local_experts=2, num_experts_per_tok=3), "n_expert_active must be in 1..n_expert=2"),
    (GPT2, dict(activation_function="relu"), "activation_function"),
    (GPT2, dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    (GPT2, dict(add_cross_attention=True), "add_cross_attention"),
    (GPT2, dict(n_head=5), "n_embd=32 is not divisible by n_head=5"),
])
def test_unmappable_configs_are_refused_by_name(base, change, field):
    config_from_hf(base)  # the base maps
    with pytest.raises(ValueError, match=field):
        config_from_hf({**base, **change})


def test_rope_parameters_of_transformers_5_are_read():
    config, _ = config_from_hf({**LLAMA, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
    assert config.rope_theta == 5e5


@pytest.mark.parametrize("change, message", [
    (dict(pos_emb="sinusoidal", norm="layernorm", mlp="gelu"), "pos_emb=sinusoidal"),
    (dict(norm="layernorm", mlp="gelu"), "pos_emb=rope, norm=layernorm, mlp=gelu"),
    (dict(pos_emb="none"), "pos_emb=none"),
    (dict(sliding_window=8, n_sink=2), "sliding_window=8, n_sink=2"),
    (dict(pos_emb="learned", norm="layernorm", mlp="gelu", n_kv_head=2), "no grouped-query attention"),
    # what Mixtral's MoE cannot express, each by name
    (dict(n_expert=4, pos_emb="learned", norm="layernorm", mlp="gelu"), "n_expert=4: .* MixtralForCausalLM, which is "
                                                                         "rope / rmsnorm / swiglu"),
    (dict(n_expert=4, moe_every=2), "moe_every=2 makes a hybrid dense/MoE stack"),
    (dict(n_expert=4, n_shared_expert=1), r"no shared experts \(n_shared_expert=1\)"),
    (dict(n_expert=4, n_expert_active=1), "n_expert_active=1 here keeps the router's probability"),
    (dict(n_expert=4, bias=True), r"no biases \(bias=True\)"),
])
def test_what_transformers_cannot_compute_is_not_exported(change, message):
    config = GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32, **change)
    with pytest.raises(ValueError, match=message):
        hf_architecture(config)


def test_folder_errors_name_the_file(tmp_path):
    hf_llama(tmp_path)
    with open(tmp_path / "config.json") as f:
        hf = json.load(f)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(dict(hf, intermediate_size=64), f)
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.gate_proj.weight has shape \(48, 32\)"):
        from_hf(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="no model.safetensors"):
        from_hf(tmp_path)


# -----------------------------------------------------------------------------
# the tokenizer: the folder's ids, encoded as transformers encodes them


def assert_same_encoding(ours, theirs, texts):
    """Ours encodes as transformers does (special-token text as text, or as the tokens when asked
    for), and both decode back to the text (in NFC, where the tokenizer normalises)."""
    for text in texts:
        plain = theirs.encode(text, add_special_tokens=False, split_special_tokens=True)
        assert ours.encode(text) == plain, text
        ids = theirs.encode(text, add_special_tokens=False)
        assert ours.encode(text, allowed_special="all") == ids, text
        assert ours.decode(ids) == theirs.decode(ids) == ours.normalize(text), text


def test_gpt2_files_encode_as_transformers_does(tmp_path, trained):
    vocab = write_gpt2_tokenizer(tmp_path, trained)
    ours = tokenizer_from_hf(tmp_path)
    theirs = transformers.GPT2TokenizerFast.from_pretrained(tmp_path)
    assert ours.kind == "hf" and ours.n_vocab == len(theirs) == 701 and ours.special_tokens == {"<|endoftext|>": 700}
    assert ours.encode("!") == [0] and ours.decode_bytes([0]) == b"!" and ours.decode_bytes([188]) == b"\x00"
    texts = varied_strings(3000, seed=2)
    assert_same_encoding(ours, theirs, texts)
    assert sum(len(ours.encode(t)) for t in texts) < 0.7 * sum(len(t.encode()) for t in texts)  # merges did merge
    assert ours.encode("a <|endoftext|>") != ours.encode("a <|endoftext|>", allowed_special="all")
    # the same text through our trained tokenizer: the same tokens, only their ids are GPT-2's
    text = texts[0] + texts[1]
    assert [vocab[i] for i in ours.encode(text)] == [trained.vocab[i] for i in trained.encode(text)]
    # a tokenizer.json, as transformers writes one, reads the same
    theirs.save_pretrained(tmp_path / "json")
    for name in ("vocab.json", "merges.txt"):  # transformers 4 writes them too
        if os.path.exists(tmp_path / "json" / name):
            os.remove(tmp_path / "json" / name)
    assert os.path.isfile(tmp_path / "json" / "tokenizer.json")
    assert_same_encoding(tokenizer_from_hf(tmp_path / "json"), theirs, texts[:300])


def test_hf_tokenizer_state_and_file_rebuild_it_without_the_folder(tmp_path, trained):
    write_gpt2_tokenizer(tmp_path, trained)
    tok = tokenizer_from_hf(tmp_path).with_special_tokens(bpe.SPECIAL_TOKENS)
    assert tok.special_tokens == {"<|endoftext|>": 700, "<|system|>": 701, "<|user|>": 702, "<|assistant|>": 703,
                                  "<|end|>": 704}
    assert tok.with_special_tokens(["<|end|>"]) is tok
    rebuilt = bpe.Tokenizer.from_state(json.loads(json.dumps(tok.state())))
    tok.save(str(tmp_path / "hf.tokenizer"))
    loaded = bpe.Tokenizer.load(str(tmp_path / "hf.tokenizer"))
    for text in varied_strings(200, seed=3):
        ids = tok.encode(text, allowed_special="all")
        assert rebuilt.encode(text, allowed_special="all") == ids == loaded.encode(text, allowed_special="all")


@pytest.mark.parametrize("kind", ["bpe_gpt4", "byte", "hf"])
def test_exported_tokenizer_loads_in_transformers_with_our_ids_and_chat_template(tmp_path, trained, kind):
    if kind == "bpe_gpt4":
        tok = bpe.train([TEXT[:3000], *varied_strings(300, seed=1)], 600, "gpt4", bpe.SPECIAL_TOKENS)
    elif kind == "byte":
        tok = bpe.byte_tokenizer(bpe.SPECIAL_TOKENS)
    else:
        write_gpt2_tokenizer(tmp_path / "gpt2", trained)
        tok = tokenizer_from_hf(tmp_path / "gpt2").with_special_tokens(bpe.SPECIAL_TOKENS)
    save_hf_tokenizer(tok, tmp_path / "out", model_max_length=64)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    texts = varied_strings(1000, seed=4)
    assert_same_encoding(tok, theirs, texts)
    assert_same_encoding(tokenizer_from_hf(tmp_path / "out"), theirs, texts[:200])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
                {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 4 + 4?"}]
    ids = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == tok.render_prompt(messages)


def test_folder_tokenizer_refusals(tmp_path, trained):
    write_gpt2_tokenizer(tmp_path, trained)
    transformers.GPT2TokenizerFast.from_pretrained(tmp_path).save_pretrained(tmp_path / "json")
    with open(tmp_path / "json" / "tokenizer.json") as f:
        spec = json.load(f)
    nfc_lower = {"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Lowercase"}]}
    for change, message in [({"normalizer": {"type": "NFKC"}}, "normalizer=NFKC: the text is encoded as it is, or in"),
                            ({"normalizer": nfc_lower}, r"normalizer=NFC\+Lowercase"),
                            ({"model": dict(spec["model"], byte_fallback=True)}, r"SentencePiece-style BPE \(model"),
                            ({"pre_tokenizer": {"type": "Metaspace"}}, r"SentencePiece-style BPE \(pre_tokenizer Meta"),
                            ({"pre_tokenizer": {"type": "Whitespace"}}, "pre_tokenizer=Whitespace: expected ByteLevel"),
                            ({"model": dict(spec["model"], merges=spec["model"]["merges"][::-1])}, "merge priority")]:
        with open(tmp_path / "json" / "tokenizer.json", "w") as f:
            json.dump({**spec, **change}, f)
        with pytest.raises(ValueError, match=message):
            tokenizer_from_hf(tmp_path / "json")


# -----------------------------------------------------------------------------
# the scripts: a folder wherever a checkpoint goes


def test_grown_vocab_keeps_old_ids_and_starts_new_rows_at_the_mean():
    for tie in (True, False):
        model = randomize(GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=16,
                                        tie_weights=tie)).eval(), 0.3)
        idx = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            before = model.logits(model(idx))
            resize_vocab(model, 64)
            after = model.logits(model(idx))
        assert model.config.vocab_size == 64 and after.shape == (2, 8, 64) and torch.equal(after[..., :40], before)
        assert torch.allclose(model.wte.weight[40:], model.wte.weight[:40].mean(0).expand(24, -1))
        assert (model.lm_head.weight is model.wte.weight) == tie


def gpt2_folder_with_tokenizer(folder, trained, **kw):
    """A GPT-2 folder as a user downloads one: weights, config, vocab.json and merges.txt."""
    theirs = hf_gpt2(folder, std=0.1, vocab_size=701, n_positions=64, **kw)
    write_gpt2_tokenizer(folder, trained)
    return theirs


def test_a_folder_is_a_checkpoint_for_every_script(tmp_path, trained):
    gpt2_folder_with_tokenizer(tmp_path, trained)
    ckpt = common.load_checkpoint(str(tmp_path))
    assert ckpt["stage"] == "hf" and ckpt["meta"]["n_vocab"] == 701
    model = common.model_from_checkpoint(ckpt, str(tmp_path), {"dropout": 0.1, "lora_rank": 2})  # train.py's call
    assert model.config.dropout == 0.1 and model.config.lora_rank == 2
    assert bpe.tokenizer_from_meta(ckpt["meta"]).encode("hello there") == tokenizer_from_hf(tmp_path).encode("hello there")


def test_sample_py_reads_a_folder_and_exports_one(tmp_path, trained):
    folder = tmp_path / "gpt2"
    theirs = gpt2_folder_with_tokenizer(folder, trained)
    tok = tokenizer_from_hf(folder)
    prompt = "First Citizen:"
    # float32, as transformers computes here (dtype=auto could time a bf16 copy faster)
    res = run_forked("sample.py", f"--init_from={folder}", f"--start={prompt}", "--num_samples=1",
                     "--max_new_tokens=12", "--temperature=0", "--device=cpu", "--dtype=float32")
    ids = torch.tensor([tok.encode(prompt)])
    expected = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    assert res.stdout.startswith(tok.decode(expected[0].tolist()))
    # ours (a byte tokenizer with the chat tokens) -> a folder transformers loads, with its tokenizer
    cfg = GPTConfig(vocab_size=320, block_size=64, n_layer=2, n_head=2, n_embd=32, n_kv_head=1)
    ours, byte_tok = save_byte_checkpoint(str(tmp_path / "ckpt.pt"), cfg)
    res = run_forked("sample.py", f"--out_dir={tmp_path}", f"--export_hf={tmp_path / 'hf'}", "--device=cpu")
    assert "LlamaForCausalLM" in res.stderr and "tokenizer.json" in res.stderr
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = torch.tensor([hf_tok.encode("héllo")])
    assert ids[0].tolist() == byte_tok.encode("héllo") and max_diff(ours, model, ids) < TOL
    assert model.generation_config.eos_token_id == [byte_tok.special_id(s) for s in ("<|end|>", "<|endoftext|>")]


def test_the_same_tokenizer_of_another_kind_passes_the_tokenizer_check(tmp_path, trained):
    # GPT-2 files written in byte order give an hf-kind tokenizer with exactly our bpe's ids: the
    # check that init_from and dataset (or teacher and student) agree must accept it, and refuse
    # the same tokens under GPT-2's id order
    folder = tmp_path / "byte_order"
    os.makedirs(folder)
    vocab = [bytes([b]) for b in range(256)] + trained.vocab[256: trained.n_vocab - len(trained.special_tokens)]
    spelled = {bpe.spell(t): i for i, t in enumerate(vocab)}
    for name, i in trained.special_tokens.items():
        spelled[name] = i
    with open(folder / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(spelled, f, ensure_ascii=False)
    with open(folder / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{bpe.spell(trained.vocab[a])} {bpe.spell(trained.vocab[b])}\n"
                                            for a, b in trained.merges))
    hf = tokenizer_from_hf(folder)
    assert hf.kind == "hf" and hf.state() != trained.state() and hf.same_ids_as(trained)
    meta = lambda tok: {"tokenizer": tok.kind, "n_vocab": tok.n_vocab, "tokenizer_state": tok.state()}  # noqa: E731
    bpe.check_same_tokenizer(meta(hf), "the folder", meta(trained), "the dataset")
    write_gpt2_tokenizer(tmp_path / "gpt2_order", trained)
    other = tokenizer_from_hf(tmp_path / "gpt2_order")
    assert not other.same_ids_as(trained)
    with pytest.raises(ValueError, match="the ids mean different things"):
        bpe.check_same_tokenizer(meta(other), "the folder", meta(trained), "the dataset")
