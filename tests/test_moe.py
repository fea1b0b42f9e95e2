"""Mixture-of-Experts. model.py: the batched dispatch against naive per-token loops, one expert
against the dense MLP, the aux losses against a hand-computed routing, cached decoding, counts.
End to end: every stage trains from a MoE checkpoint (a smoke run each, its routing logged, its
experts and router trained, or under LoRA the router left alone), and sample.py decodes one with
its KV cache. train.py's MoE settings, exact resume and DDP are in test_train.py, the Mixtral
export in test_hf.py."""

import math
import os
import random

import pytest
import torch
import torch.nn.functional as F

import common
from conftest import build as build_model
from conftest import read_log, run_script, save_byte_checkpoint, tiny, write_jsonl
from model import GPT, GPTConfig, MoE


def build(config, **kw):
    model = build_model(config, **kw)
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.router.weight.mul_(10.0)  # routing that differs from token to token
    return model


def naive_moe(moe, x):
    """The MoE layer one token at a time, straight from its definition: (B, T, C) -> (B, T, C)."""
    B, T, C = x.shape
    rows = []
    for xt in x.reshape(B * T, C):
        probs = F.softmax(moe.router(xt), dim=-1)
        gates, chosen = torch.topk(probs, moe.k)
        if moe.k > 1:
            gates = gates / gates.sum()
        y = sum(g * moe.experts[e](xt) for g, e in zip(gates, chosen.tolist()))
        if moe.shared is not None:
            y = y + moe.shared(xt)
        rows.append(y)
    return torch.stack(rows).view(B, T, C)


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_one_expert_equals_dense_mlp(mlp):
    torch.manual_seed(0)
    dense = GPT(tiny(mlp=mlp)).double()
    cfg = tiny(mlp=mlp, n_expert=1, n_expert_active=1)
    assert cfg.expert_hidden == cfg.mlp_hidden
    moe = GPT(cfg).double()
    state = {k.replace(".mlp.", ".mlp.experts.0."): v for k, v in dense.state_dict().items()}
    missing, unexpected = moe.load_state_dict(state, strict=False)
    assert missing == ["h.0.mlp.router.weight", "h.1.mlp.router.weight"] and unexpected == []
    idx = torch.randint(0, 37, (2, 16))
    assert torch.equal(moe.logits(moe(idx)), dense.logits(dense(idx)))


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_all_experts_active_is_the_probability_weighted_sum(mlp):
    torch.manual_seed(0)
    moe = MoE(tiny(mlp=mlp, n_expert=4, n_expert_active=4)).double()
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    probs = F.softmax(moe.router(x), dim=-1)  # (B, T, n_expert)
    expected = sum(probs[..., e:e + 1] * expert(x) for e, expert in enumerate(moe.experts))
    torch.testing.assert_close(moe(x), expected)


@pytest.mark.parametrize("n_expert, k, n_shared, mlp", [(4, 1, 0, "swiglu"), (4, 2, 0, "gelu"),
                                                        (8, 2, 1, "swiglu"), (5, 3, 2, "gelu")])
def test_batched_dispatch_equals_per_token_loop(n_expert, k, n_shared, mlp):
    torch.manual_seed(0)
    moe = MoE(tiny(n_expert=n_expert, n_expert_active=k, n_shared_expert=n_shared, mlp=mlp)).double()
    x = torch.randn(3, 7, 32, dtype=torch.float64)
    y = moe(x)
    assert moe.load.min() > 0  # every expert got tokens: the test covers all of them
    torch.testing.assert_close(y, naive_moe(moe, x))


def test_aux_losses_on_a_hand_computed_routing():
    # 4 experts, top-2, 4 tokens. With an identity router the logits are the input, so each row
    # below is a token's router probabilities, shifted by c (which changes logsumexp, not probs).
    moe = MoE(tiny(n_embd=4, n_head=1, n_expert=4, n_expert_active=2)).double()
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(4))
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1],   # top-2: experts 0, 1
                          [0.1, 0.2, 0.3, 0.4],   # 3, 2
                          [0.5, 0.1, 0.3, 0.1],   # 0, 2
                          [0.6, 0.2, 0.1, 0.1]],  # 0, 1
                         dtype=torch.float64)
    c = torch.tensor([1.0, -2.0, 0.0, 3.0], dtype=torch.float64)
    x = (probs.log() + c[:, None])[None].requires_grad_()  # (1, 4, 4)
    y = moe(x)
    # f = pairs per expert / 8 = [3, 2, 2, 1] / 8; P = mean prob = [1.6, 0.8, 0.9, 0.7] / 4
    # aux = 4 * (3/8 * 0.4 + 2/8 * 0.2 + 2/8 * 0.225 + 1/8 * 0.175) = 4 * 0.278125
    torch.testing.assert_close(moe.load, torch.tensor([0.375, 0.25, 0.25, 0.125]))
    torch.testing.assert_close(moe.aux_loss.item(), 1.1125)
    torch.testing.assert_close(moe.z_loss.item(), (1 + 4 + 0 + 9) / 4)  # logsumexp = c
    # the LM loss alone reaches the router (through the renormalised gates) and every expert
    y.square().sum().backward()
    assert moe.router.weight.grad.abs().sum() > 0
    for expert in moe.experts:
        assert all(p.grad.abs().sum() > 0 for p in expert.parameters())
    # and so does the aux loss on its own, to the router only
    moe.zero_grad()
    moe(x.detach())
    moe.aux_loss.backward()
    assert moe.router.weight.grad.abs().sum() > 0
    assert all(p.grad is None or not p.grad.any() for p in moe.experts.parameters())


def test_unselected_expert_gets_zero_gradient_not_none():
    # dropless dispatch calls every expert, an empty chunk included: no unused parameters in DDP
    moe = MoE(tiny(n_embd=4, n_head=1, n_expert=4, n_expert_active=1)).double()
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(4))
    x = torch.tensor([[[3.0, 0, 0, 0], [0, 3.0, 0, 0]]], dtype=torch.float64)  # experts 0 and 1
    moe(x).sum().backward()
    assert moe.load.tolist() == [0.5, 0.5, 0.0, 0.0]
    assert moe.experts[1].c_fc.weight.grad.any() and not moe.experts[2].c_fc.weight.grad.any()


def test_loss_is_the_cross_entropy_and_aux_loss_holds_the_rest():
    # the loss forward returns (and every stage logs) is the plain cross-entropy, so MoE and dense
    # runs compare; the load-balancing and z terms come from aux_loss(), which training adds
    model = build(tiny(n_expert=4, n_expert_active=2, moe_every=1, moe_aux_coef=0.3, moe_z_coef=0.05))
    idx, targets = torch.randint(0, 37, (2, 9)), torch.randint(0, 37, (2, 9))
    x = model(idx)
    logits, loss = model.logits(x), model.loss(x, targets)
    stats = model.moe_stats()
    ce = F.cross_entropy(logits.view(-1, 37), targets.view(-1))
    per_layer = [(m.aux_loss.item(), m.z_loss.item()) for m in model.moe_layers()]
    assert stats["aux_loss"] == pytest.approx(sum(a for a, _ in per_layer) / 2)
    assert stats["z_loss"] == pytest.approx(sum(z for _, z in per_layer) / 2)
    assert loss.item() == ce.item()
    torch.testing.assert_close(model.aux_loss().item(), 0.3 * stats["aux_loss"] + 0.05 * stats["z_loss"])
    assert model.aux_loss().requires_grad and build(tiny()).aux_loss() == 0.0
    torch.testing.assert_close(-model.logprobs(model(idx), targets)[0].mean(), ce)
    load = torch.tensor(stats["load"])  # a list per MoE layer, ready for log.jsonl
    assert load.shape == (2, 4)
    torch.testing.assert_close(load.sum(-1), torch.ones(2))
    cv = load.std(-1, correction=0) / load.mean(-1)
    assert stats["load_cv"] == pytest.approx(cv.mean().item())


def test_moe_every_picks_the_layers():
    model = GPT(tiny(n_layer=4, n_expert=4, moe_every=2))
    assert [isinstance(b.mlp, MoE) for b in model.h] == [False, True, False, True]
    assert model.moe_stats() is None  # no forward yet
    model(torch.zeros(1, 3, dtype=torch.long))
    assert torch.tensor(model.moe_stats()["load"]).shape == (2, 4)
    assert GPT(tiny()).moe_stats() is None


CACHE_CONFIGS = [
    dict(n_expert=4, n_expert_active=2),
    dict(n_expert=4, n_expert_active=2, moe_every=2, mlp="gelu"),
    dict(n_expert=4, n_expert_active=1, n_shared_expert=1, pos_emb="learned", n_kv_head=2),
    dict(n_expert=3, n_expert_active=2, n_shared_expert=2, sliding_window=5, n_sink=1, mlp="gelu"),
]


@pytest.mark.parametrize("kw", CACHE_CONFIGS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_cached_greedy_equals_reference(kw):
    model = build(tiny(**kw))
    idx = torch.randint(0, 37, (2, 7), generator=torch.Generator().manual_seed(1))
    a = model.generate(idx, 20, temperature=0, use_cache=True)
    b = model.generate(idx, 20, temperature=0, use_cache=False)
    assert torch.equal(a, b)
    # padded, mixed-length prompts: dropless routing keeps each row independent of the others
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 37, (n,), generator=g) for n in (1, 6, 3)]
    batched = model.generate(prompts, 10, temperature=0)
    for prompt, out in zip(prompts, batched):
        assert torch.equal(out, model.generate(prompt[None], 10, temperature=0, use_cache=False)[0])


def test_param_and_flop_counts():
    dense = GPT(tiny(n_layer=4))
    cfg = tiny(n_layer=4, n_expert=8, n_expert_active=2, moe_every=2)
    moe = GPT(cfg)
    assert 2 * cfg.expert_hidden == cfg.mlp_hidden  # split so a token uses as much as dense
    per_expert = 3 * 32 * cfg.expert_hidden  # swiglu: c_fc, c_gate, c_proj
    router = 32 * 8
    assert moe.num_params() == dense.num_params() + 2 * ((8 - 2) * per_expert + router)
    assert moe.num_params(active=True) == dense.num_params() + 2 * router
    assert dense.num_params(active=True) == dense.num_params()
    assert moe.flops_per_token() - dense.flops_per_token() == 6 * 2 * router


def test_init_and_optimizer_groups():
    model = GPT(tiny(n_expert=8, n_expert_active=2, n_shared_expert=1, bias=True))
    experts = [(n, p) for n, p in model.named_parameters() if ".experts." in n]
    fc = torch.cat([p.flatten() for n, p in experts if n.endswith("c_fc.weight")])
    proj = torch.cat([p.flatten() for n, p in experts if n.endswith("c_proj.weight")])
    assert fc.std().item() == pytest.approx(0.02, rel=0.05)
    assert proj.std().item() == pytest.approx(0.02 / math.sqrt(2 * 2), rel=0.05)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each exactly once
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert id(model.h[0].mlp.router.weight) in decayed and id(model.h[0].mlp.experts[3].c_proj.weight) in decayed


def test_bf16_autocast():
    model = GPT(tiny(n_expert=4, n_expert_active=2, n_shared_expert=1))
    idx = torch.randint(0, 37, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss(model(idx), idx)
        out = model.generate(idx, 4, temperature=0)
    loss.backward()
    assert torch.isfinite(loss) and out.shape == (2, 12)
    assert model.h[0].mlp.router.weight.grad.any()


def train_load_cv(moe_aux_coef, steps=60, seed=0):
    """Train a small MoE on pairs (a, perm[a]) with a drawn from a skewed (Zipf) distribution, so
    the hidden states depend on the token and some tokens are far more common than others; then
    return the expert load's coefficient of variation on a fresh batch."""
    V = 32
    torch.manual_seed(seed)
    cfg = tiny(vocab_size=V, block_size=17, n_head=2, n_expert=8, n_expert_active=2, moe_aux_coef=moe_aux_coef)
    model = GPT(cfg)
    g = torch.Generator().manual_seed(seed + 100)
    zipf = 1.0 / torch.arange(1, V + 1).float()
    perm = torch.randperm(V, generator=g)

    def batch(B):
        a = torch.multinomial(zipf, B * 9, replacement=True, generator=g).view(B, 9)
        return torch.stack((a, perm[a]), dim=-1).view(B, 18)

    opt = model.configure_optimizers(0.0, 3e-3, (0.9, 0.95), "cpu")
    for _ in range(steps):
        x = batch(16)
        loss = model.loss(model(x[:, :-1]), x[:, 1:])
        loss = loss + model.aux_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        model(batch(64)[:, :-1])
    return model.moe_stats()["load_cv"]


def test_aux_loss_evens_out_the_load():
    # over seeds 0-9 the ratio on/off was 0.31-0.67 (seed 0: 0.40); a balanced load would be 0
    off, on = train_load_cv(0.0), train_load_cv(0.1)
    assert on < 0.8 * off, (on, off)


@pytest.mark.parametrize("kw, msg", [
    (dict(n_expert=-1), "n_expert must be >= 0"),
    (dict(n_expert=4, n_expert_active=5), "n_expert_active must be in 1..n_expert=4"),
    (dict(n_expert=4, n_expert_active=0), "n_expert_active must be in 1..n_expert=4"),
    (dict(moe_every=0), "moe_every must be >= 1"),
    (dict(n_expert=4, moe_every=3), "leaves no layer MoE"),
    (dict(n_expert=4, n_shared_expert=-1), "n_shared_expert must be >= 0"),
    (dict(n_shared_expert=1), "n_shared_expert needs routed experts"),
    (dict(n_expert=4, expert_hidden=0), "expert_hidden must be None or >= 1"),
    (dict(n_expert=4, moe_aux_coef=-0.1), "moe_aux_coef must be >= 0"),
    (dict(n_expert=4, moe_z_coef=-1e-3), "moe_z_coef must be >= 0"),
])
def test_invalid_moe_configs_raise(kw, msg):
    with pytest.raises(ValueError, match=msg):
        tiny(**kw)


# -----------------------------------------------------------------------------
# every stage from a MoE checkpoint: a smoke run each, and what MoE changes in it


@pytest.fixture(scope="module")
def moe_setup(tmp_path_factory):
    """A tiny MoE checkpoint (2 layers of 4 experts, top-2, byte tokenizer), task prompts with
    answers, and preference pairs (the answer against a near miss). -> (checkpoint, tasks, pairs)"""
    from data.tasks.tasks import generate

    tmp = tmp_path_factory.mktemp("moe")
    ckpt = str(tmp / "moe.pt")
    save_byte_checkpoint(ckpt, GPTConfig(vocab_size=320, block_size=48, n_layer=2, n_head=2, n_embd=32, n_expert=4,
                                         n_expert_active=2))
    rng = random.Random(0)
    tasks, pairs = tmp / "tasks", tmp / "pairs"
    tasks.mkdir(), pairs.mkdir()
    for split, n in (("train", 6), ("val", 2)):
        examples = [generate(t, d, rng) for t in ("add", "copy") for d in (1, 2) for _ in range(n)]
        write_jsonl(tasks / f"{split}.jsonl", examples)
        write_jsonl(pairs / f"{split}.jsonl", [{"prompt": ex["messages"][:1], "chosen": ex["answer"],
                                                "rejected": ex["answer"][::-1] + "x", "task": ex["task"],
                                                "difficulty": ex["difficulty"], "answer": ex["answer"]}
                                               for ex in examples])
    return ckpt, str(tasks), str(pairs)


SMOKE = ["--max_iters=2", "--eval_interval=2", "--log_interval=1", "--warmup_iters=1", "--learning_rate=1e-2",
         "--device=cpu", "--compile=false", "--dtype=float32"]
EVALS = ["--eval_prompts=2", "--eval_max_new_tokens=4", "--test_prompts=0"]
RL = ["--prompt_dataset={tasks}", "--rl_tasks=", "--max_new_tokens=4", "--pass_k_prompts=0", *EVALS]
STAGES = {
    "sft": ["sft.py", "--sft_dataset={tasks}", "--batch_size=4", "--eval_iters=1", *EVALS],
    "reward": ["reward.py", "--preference_dataset={pairs}", "--batch_size=4", "--eval_pairs=4"],
    # LoRA on every expert (and dense MLP): the router keeps its weights, as lora_targets=mlp says
    "grpo-lora": ["grpo.py", *RL, "--prompts_per_iter=2", "--samples_per_prompt=2", "--mask_truncated=false", "--lora_rank=4",
                  "--lora_targets=mlp"],
    "ppo": ["ppo.py", *RL, "--prompts_per_iter=4"],
    "dpo": ["dpo.py", "--prompt_dataset={tasks}", "--preference_dataset={pairs}", "--rl_tasks=", "--batch_size=4",
            "--eval_pairs=4", "--pass_k_prompts=0", *EVALS],
}


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_trains_a_moe_checkpoint(moe_setup, tmp_path, stage):
    ckpt, tasks, pairs = moe_setup
    out = str(tmp_path / "out")
    script, *args = STAGES[stage]
    run_script(script, *SMOKE, f"--init_from={ckpt}", f"--out_dir={out}", "--moe_aux_coef=0.02",
               *(a.format(tasks=tasks, pairs=pairs) for a in args))
    steps = [r for r in read_log(out) if "loss" in r and "ms" in r]
    assert [r["iter"] for r in steps] == [1, 2]
    for r in steps:  # the routing of each step, per layer and expert
        assert r["aux_loss"] > 0 and r["z_loss"] > 0 and r["load_cv"] >= 0
        assert torch.tensor(r["load"]).shape == (2, 4) and torch.tensor(r["load"]).sum(-1).tolist() == pytest.approx([1, 1])
    base = common.load_checkpoint(ckpt)["model"]
    after = common.load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert after["model_args"]["n_expert"] == 4 and after["model_args"]["moe_aux_coef"] == 0.02
    state = after["model"]
    router, expert = "h.0.mlp.router.weight", "h.1.mlp.experts.3.c_fc.weight"
    if stage.endswith("lora"):  # the base frozen, the router too; the experts' adapters trained
        assert torch.equal(state[router], base[router]) and torch.equal(state[expert], base[expert])
        assert "h.0.mlp.router.lora_A" not in state and state["h.1.mlp.experts.3.c_fc.lora_B"].any()
    else:  # full fine-tuning: experts and routers both learn
        assert not torch.equal(state[router], base[router]) and not torch.equal(state[expert], base[expert])


def test_sample_py_decodes_a_moe_checkpoint_with_its_kv_cache(tmp_path):
    cfg = GPTConfig(vocab_size=320, block_size=64, n_layer=2, n_head=2, n_embd=32, n_expert=4, n_expert_active=2,
                    n_shared_expert=1)
    model, tok = save_byte_checkpoint(str(tmp_path / "ckpt.pt"), cfg)
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.router.weight.mul_(10.0)  # routing that differs from token to token
    common.save_checkpoint(dict(common.load_checkpoint(str(tmp_path / "ckpt.pt")), model=model.state_dict()),
                           str(tmp_path / "ckpt.pt"))
    res = run_script("sample.py", f"--out_dir={tmp_path}", "--start=ROMEO:", "--num_samples=1",
                     "--max_new_tokens=40", "--temperature=0", "--device=cpu")
    # the reference recomputes the whole context at every token: the cached decode must match it
    ids = model.generate(torch.tensor([tok.encode("ROMEO:")]), 40, temperature=0, use_cache=False)[0].tolist()
    assert res.stdout.startswith(tok.decode_bytes(ids).decode("utf-8", errors="replace"))
    model(torch.tensor([ids]))
    assert (torch.tensor(model.moe_stats()["load"]) > 0).sum() >= 6  # the 40 tokens went to most of the 8 experts
