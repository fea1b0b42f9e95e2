"""LoRA in model.py: at init it is the base model; merged equals unmerged; only adapters train;
adapters save and load on their own; the KV cache still matches the full recompute."""

import dataclasses
from dataclasses import asdict

import pytest
import torch

from convert import load_base_weights, load_lora_state_dict, lora_state_dict, merged_state_dict
from model import GPT, GPTConfig, LoRALinear, lora_layers, merge_lora, unmerge_lora


def tiny(**kw):
    args = dict(vocab_size=37, block_size=32, n_layer=2, n_head=4, n_embd=32, dropout=0.0)
    args.update(kw)
    return GPTConfig(**args)


def base_of(config):
    return dataclasses.replace(config, lora_rank=0)


def lora_on(base, dtype=torch.float32, seed=1, **kw):
    """A LoRA model of base's config plus kw, carrying base's weights."""
    torch.manual_seed(seed)
    model = GPT(dataclasses.replace(base.config, lora_rank=4, lora_alpha=8.0, **kw)).to(dtype)
    load_base_weights(model, base.state_dict())
    return model


def train(model, steps=5, lr=1e-2, seed=2):
    """A few AdamW steps on random tokens, so the adapters move away from B = 0."""
    g = torch.Generator().manual_seed(seed)
    opt = model.configure_optimizers(0.1, lr, (0.9, 0.95), "cpu")
    model.train()
    for _ in range(steps):
        x = torch.randint(0, model.config.vocab_size, (4, 16), generator=g)
        loss = model.loss(model(x), torch.roll(x, -1, dims=1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


TARGETS = [
    (dict(), ("c_q", "c_v")),
    (dict(mlp="gelu", pos_emb="learned", n_kv_head=2), ("attn", "mlp")),
    (dict(n_kv_head=1, tie_weights=False, bias=True), ("attn", "mlp", "lm_head")),
    (dict(sliding_window=5, n_sink=1), ("c_k", "mlp.c_proj", "c_gate")),
]


def ids(v):
    return "-".join(map(str, v.values() if isinstance(v, dict) else v))


@pytest.mark.parametrize("kw, targets", TARGETS, ids=ids)
def test_init_equals_base(kw, targets):
    torch.manual_seed(0)
    base = GPT(tiny(**kw)).eval()
    model = lora_on(base, lora_targets=targets).eval()
    idx = torch.randint(0, 37, (2, 16))
    assert torch.equal(model.logits(model(idx)), base.logits(base(idx)))
    layers = lora_layers(model)
    assert layers and all(layer.lora_A.abs().sum() > 0 for layer in layers)  # only B starts at 0
    # lora_dropout touches the adapter branch only, which is still zero
    for layer in layers:
        layer.lora_dropout.p = 0.5
    model.train()
    assert torch.equal(model.logits(model(idx)), base.logits(base(idx)))


def test_targets_pick_the_named_layers():
    def adapted(**kw):
        model = GPT(tiny(lora_rank=2, **kw))
        return sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))

    assert adapted(lora_targets=("c_q", "c_v")) == ["h.0.attn.c_q", "h.0.attn.c_v",
                                                    "h.1.attn.c_q", "h.1.attn.c_v"]
    assert adapted(lora_targets=("attn.c_proj",)) == ["h.0.attn.c_proj", "h.1.attn.c_proj"]
    assert adapted(lora_targets=("mlp",)) == [f"h.{i}.mlp.{n}" for i in (0, 1)
                                              for n in ("c_fc", "c_gate", "c_proj")]
    assert adapted(lora_targets=("lm_head",), tie_weights=False) == ["lm_head"]


def test_same_seed_same_base_weights():
    # the adapters are added after the base init, so they do not shift the random stream
    torch.manual_seed(0)
    base = GPT(tiny()).state_dict()
    torch.manual_seed(0)
    lora = GPT(tiny(lora_rank=4, lora_targets=("attn", "mlp"))).state_dict()
    assert all(torch.equal(v, lora[k]) for k, v in base.items())


def test_only_adapters_train_and_base_weights_stay_bit_identical():
    torch.manual_seed(0)
    base = GPT(tiny(tie_weights=False, bias=True, norm="layernorm"))
    model = lora_on(base, lora_targets=("attn", "mlp", "lm_head"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    opt = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["params"] == []  # adapters take no weight decay
    assert {id(p) for p in no_decay["params"]} == {id(p) for n, p in model.named_parameters()
                                                    if n in trainable}

    idx = torch.randint(0, 37, (2, 16))
    loss = model.loss(model(idx), idx)
    loss.backward()
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None
        else:
            assert p.grad is None, name
    # B starts at 0, so A's first gradient is 0 too; B's is not
    assert all(layer.lora_B.grad.abs().sum() > 0 for layer in lora_layers(model))

    train(model, steps=3)
    after = model.state_dict()
    for k, v in before.items():
        if k.endswith((".lora_A", ".lora_B")):
            assert not torch.equal(after[k], v), k  # every adapter moved, A included
        else:
            assert torch.equal(after[k], v), k


@pytest.mark.parametrize("kw, targets", TARGETS[:3], ids=ids)
def test_merged_equals_unmerged_and_unmerge_restores(kw, targets):
    torch.manual_seed(0)
    base = GPT(tiny(**kw))
    model = train(lora_on(base, lora_targets=targets))
    idx = torch.randint(0, 37, (2, 16))
    unmerged = model.logits(model(idx))
    assert (unmerged - base.eval().logits(base(idx))).abs().max() > 1e-3  # the adapters do something
    weights = {k: v.clone() for k, v in model.state_dict().items()}

    merge_lora(model)
    torch.testing.assert_close(model.logits(model(idx)), unmerged, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="already merged"):
        merge_lora(model)
    with pytest.raises(RuntimeError, match="unmerge_lora"):
        load_lora_state_dict(model, lora_state_dict(model))

    # the merged weights make a plain GPT of the same config
    plain = GPT(base_of(model.config)).eval()
    plain.load_state_dict(merged_state_dict(model))  # strict
    torch.testing.assert_close(plain.logits(plain(idx)), unmerged, atol=1e-5, rtol=0)

    # a state dict taken while merged holds the original weights: it loads back to the same model
    # (it used to hold W + BA beside the adapters, which then applied twice)
    again = GPT(model.config).eval()
    again.load_state_dict(model.state_dict())
    torch.testing.assert_close(again.logits(again(idx)), unmerged, atol=1e-5, rtol=0)

    unmerge_lora(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k  # exactly: the original weights were kept
    torch.testing.assert_close(model.logits(model(idx)), unmerged, atol=1e-6, rtol=0)
    with pytest.raises(RuntimeError, match="not merged"):
        unmerge_lora(model)
    # merged_state_dict of the unmerged model folds the adapters in the same way
    plain.load_state_dict(merged_state_dict(model))
    torch.testing.assert_close(plain.logits(plain(idx)), unmerged, atol=1e-5, rtol=0)


def test_adapter_only_checkpoint_round_trips(tmp_path):
    torch.manual_seed(0)
    base = GPT(tiny(n_kv_head=2))
    torch.save(base.state_dict(), tmp_path / "base.pt")
    model = train(lora_on(base, lora_targets=("attn", "mlp")))
    sd = lora_state_dict(model)
    assert sd and all(k.endswith((".lora_A", ".lora_B")) for k in sd)
    # rank 4 x (in + out) per linear: q, k, v (16 wide with 2 kv heads), proj, then swiglu's fc,
    # gate, proj at hidden 128; two layers
    assert sum(v.numel() for v in sd.values()) == 2 * 4 * (64 + 48 + 48 + 64 + 160 + 160 + 160)
    torch.save(sd, tmp_path / "lora.pt")

    fresh = GPT(model.config).eval()  # another seed's base weights and adapters, all overwritten
    load_base_weights(fresh, torch.load(tmp_path / "base.pt"))
    load_lora_state_dict(fresh, torch.load(tmp_path / "lora.pt"))
    idx = torch.randint(0, 37, (2, 16))
    assert torch.equal(fresh.logits(fresh(idx)), model.logits(model(idx)))


def test_base_checkpoint_loads_non_strict_missing_only_adapters():
    torch.manual_seed(0)
    base = GPT(tiny())
    model = GPT(tiny(lora_rank=4, lora_targets=("c_q", "mlp")))
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert unexpected == []
    assert set(missing) == set(lora_state_dict(model))


def test_bad_checkpoints_are_refused():
    torch.manual_seed(0)
    base = GPT(tiny())
    model = lora_on(base)
    sd = lora_state_dict(model)
    with pytest.raises(ValueError, match="missing keys"):
        load_lora_state_dict(model, {k: v for k, v in list(sd.items())[1:]})
    with pytest.raises(ValueError, match="unexpected keys"):
        load_lora_state_dict(model, {**sd, "h.0.attn.c_k.lora_A": torch.zeros(4, 32)})
    rank8 = lora_state_dict(GPT(dataclasses.replace(model.config, lora_rank=8)))
    with pytest.raises(ValueError, match="shape"):
        load_lora_state_dict(model, rank8)
    with pytest.raises(ValueError, match="unexpected keys"):
        load_base_weights(model, model.state_dict())  # adapters are not base weights
    with pytest.raises(ValueError, match="missing keys"):
        load_base_weights(model, {k: v for k, v in base.state_dict().items() if "ln_f" not in k})


def randomise_adapters(model, std):
    with torch.no_grad():
        for layer in lora_layers(model):
            layer.lora_B.normal_(0.0, std)


@pytest.mark.parametrize("kw, targets", [
    (dict(pos_emb="rope", n_kv_head=2), ("attn", "mlp")),
    (dict(pos_emb="learned", mlp="gelu", n_kv_head=1, tie_weights=False), ("c_q", "c_v", "lm_head")),
    (dict(pos_emb="rope", sliding_window=5, n_sink=2, n_kv_head=2), ("c_k", "c_v", "mlp.c_proj")),
])
def test_cached_greedy_equals_reference_with_lora(kw, targets):
    torch.manual_seed(0)
    base = GPT(tiny(**kw)).double()
    with torch.no_grad():
        base.lm_head.weight.mul_(20.0)  # as in test_model.py: sharp logits, no greedy ties
    model = lora_on(base, dtype=torch.float64, lora_targets=targets).eval()
    randomise_adapters(model, std=0.5)
    idx = torch.randint(0, 37, (2, 7), generator=torch.Generator().manual_seed(1))
    assert (model.logits(model(idx)) - base.eval().logits(base(idx))).abs().max() > 1e-2  # the adapters matter
    a = model.generate(idx, 20, temperature=0, use_cache=True)
    b = model.generate(idx, 20, temperature=0, use_cache=False)
    assert torch.equal(a, b)
    merge_lora(model)
    assert torch.equal(model.generate(idx, 20, temperature=0, use_cache=True), a)


def test_bf16_autocast():
    model = GPT(tiny(lora_rank=4, lora_targets=("attn", "mlp")))
    randomise_adapters(model, std=0.1)
    idx = torch.randint(0, 37, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss(model(idx), idx)
    loss.backward()
    assert torch.isfinite(loss) and all(layer.lora_A.grad is not None for layer in lora_layers(model))


def test_targets_normalised_to_tuple():
    assert tiny(lora_targets=["c_q", "mlp"]).lora_targets == ("c_q", "mlp")
    assert tiny(lora_targets="c_q,c_v").lora_targets == ("c_q", "c_v")
    config = tiny(lora_rank=4, lora_alpha=16)
    assert GPTConfig(**asdict(config)) == config


@pytest.mark.parametrize("kw, msg", [
    (dict(lora_targets=("c_z",)), "unknown target 'c_z'"),
    (dict(lora_targets=("c_proj",)), "ambiguous"),
    (dict(lora_rank=-1), "lora_rank must be >= 0"),
    (dict(lora_rank=4, lora_alpha=0.0), "lora_alpha"),
    (dict(lora_rank=4, lora_dropout=1.0), "lora_dropout"),
    (dict(lora_rank=4, lora_dropout=-0.1), "lora_dropout"),
    (dict(lora_rank=4, lora_targets=()), "at least one"),
    (dict(lora_rank=4, lora_targets=("c_gate",), mlp="gelu"), "swiglu"),
    (dict(lora_rank=4, lora_targets=("lm_head",)), "tie_weights=False"),
])
def test_invalid_lora_configs_raise(kw, msg):
    with pytest.raises(ValueError, match=msg):
        tiny(**kw)


def test_flops_count_frozen_weights_at_four_per_weight():
    base = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32))
    lora = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, lora_rank=4))
    n_frozen = sum(p.numel() for p in lora.parameters() if not p.requires_grad)
    n_adapter = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert lora.flops_per_token() == base.flops_per_token() + 6 * n_adapter - 2 * n_frozen


def test_merge_and_unmerge_in_bf16_restore_the_base_bit_for_bit():
    # W + BA - BA rounds in bf16 (about 13% of the adapted weights moved by an ulp before): a
    # "frozen reference" taken after an unmerge would not have been the reference
    torch.manual_seed(0)
    base = GPT(tiny()).to(torch.bfloat16)
    model = train(lora_on(base, dtype=torch.bfloat16, lora_targets=("attn", "mlp")), lr=3e-2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merge_lora(model)
    assert any(not torch.equal(layer.weight, before[name + ".weight"])
               for name, layer in model.named_modules() if isinstance(layer, LoRALinear))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # merged or not
    unmerge_lora(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for name, layer in model.named_modules():
        if isinstance(layer, LoRALinear):
            assert torch.equal(layer.weight, before[name + ".weight"]), name


@pytest.mark.parametrize("moe_every", [1, 2])
def test_moe_targets_by_role(moe_every):
    # "mlp" adapts every feed-forward linear, dense or expert or shared, and never the router
    cfg = tiny(n_layer=2, n_expert=4, n_expert_active=2, n_shared_expert=1, moe_every=moe_every,
               lora_rank=4, lora_targets=("mlp",))
    model = GPT(cfg)
    adapted = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    expected = {n for n in linears if ".mlp." in f".{n}" and not n.endswith("router")}
    assert adapted == expected
    assert any(".experts.3.c_fc" in n for n in adapted) and any(".shared.c_proj" in n for n in adapted)
    if moe_every == 2:
        assert "h.0.mlp.c_fc" in adapted  # the dense layer of a hybrid stack
    assert not any(n.endswith("router") for n in adapted)
    # mlp.c_fc names the role in experts too; the router only when named
    model = GPT(dataclasses.replace(cfg, lora_targets=("mlp.c_fc", "router")))
    adapted = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert adapted == {n for n in linears if n.endswith(".c_fc") or n.endswith("router")}


def test_lora_on_moe_trains_only_adapters_and_matches_when_merged():
    torch.manual_seed(0)
    base = GPT(tiny(n_expert=4, n_expert_active=2, moe_every=1))
    model = train(lora_on(base, lora_targets=("attn", "mlp")))
    idx = torch.randint(0, 37, (2, 12))
    for k, v in base.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    unmerged = model.logits(model(idx))
    assert (unmerged - base.eval().logits(base(idx))).abs().max() > 1e-3
    merge_lora(model)
    torch.testing.assert_close(model.logits(model(idx)), unmerged, atol=1e-5, rtol=0)
    unmerge_lora(model)
    a = model.generate(idx[:, :4], 10, temperature=0, use_cache=True)
    b = model.generate(idx[:, :4], 10, temperature=0, use_cache=False)
    assert torch.equal(a, b)
