"""model.py: cached decoding equals the full recompute, for every switch; batching, windows, sinks."""

import itertools

import pytest
import torch

from conftest import build, tiny
from model import GPT, KVCache, attention_mask
from sampling import left_pad, sample_next


CONFIGS = [
    dict(pos_emb=pos_emb, norm=norm, mlp=mlp, n_kv_head=n_kv, sliding_window=win, n_sink=sink)
    for pos_emb, norm, mlp, n_kv, (win, sink) in itertools.product(
        ["learned", "sinusoidal", "rope", "none"],
        ["layernorm", "rmsnorm"],
        ["gelu", "swiglu"],
        [4, 2, 1],
        [(None, 0), (5, 0), (5, 2)],
    )
]


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_cached_greedy_equals_reference(kw):
    model = build(tiny(**kw))
    idx = torch.randint(0, 37, (2, 7), generator=torch.Generator().manual_seed(1))
    a = model.generate(idx, 20, temperature=0, use_cache=True)
    b = model.generate(idx, 20, temperature=0, use_cache=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("kw", [dict(pos_emb="rope"), dict(pos_emb="learned", n_kv_head=2),
                                dict(pos_emb="rope", sliding_window=6, n_sink=2, n_kv_head=1),
                                dict(pos_emb="sinusoidal", sliding_window=4)])
def test_cached_step_logits_match_float32(kw):
    model = build(tiny(**kw), dtype=torch.float32, sharpen=2.0)  # logits of order 1
    idx = torch.randint(0, 37, (3, 9), generator=torch.Generator().manual_seed(2))
    cached = list(model.generate_tokens(idx, 20, temperature=0, use_cache=True))
    ref = list(model.generate_tokens(idx, 20, temperature=0, use_cache=False))
    for (ta, la), (tb, lb) in zip(cached, ref):
        assert torch.equal(ta, tb)
        torch.testing.assert_close(la, lb, atol=1e-6, rtol=0)


def test_rolling_cache_runs_past_block_size_with_constant_memory():
    cfg = tiny(pos_emb="rope", sliding_window=8, n_sink=2, n_kv_head=2, block_size=16)
    model = build(cfg)
    idx = torch.randint(0, 37, (1, 5))
    n_new = 4 * cfg.block_size
    # drive the cached path by hand to watch the cache
    cache = KVCache(cfg, 1, 5 + n_new)
    assert cache.n_slots == 10  # n_sink + window, whatever the length
    x = model.logits(model(idx, pos=torch.arange(5)[None], cache=cache))
    sizes = {cache.nbytes()}
    tokens = [x[:, -1].argmax(-1)]
    for t in range(n_new - 1):
        x = model.logits(model(tokens[-1][:, None], pos=torch.tensor([[5 + t]]), cache=cache))
        tokens.append(x[:, -1].argmax(-1))
        sizes.add(cache.nbytes())
    assert len(sizes) == 1
    ours = torch.cat((idx, torch.stack(tokens, 1)), 1)
    ref = model.generate(idx, n_new, temperature=0, use_cache=False)
    assert torch.equal(ours, ref)
    assert torch.equal(model.generate(idx, n_new, temperature=0, use_cache=True), ref)


def test_window_longer_than_prompt_prefill_keeps_only_the_window():
    # a prompt longer than the window: the prefill must keep the sinks and the last W keys only
    cfg = tiny(pos_emb="rope", sliding_window=4, n_sink=1, block_size=64)
    model = build(cfg)
    idx = torch.randint(0, 37, (2, 30))
    a = model.generate(idx, 40, temperature=0, use_cache=True)
    b = model.generate(idx, 40, temperature=0, use_cache=False)
    assert torch.equal(a, b)


def test_crop_past_block_size_without_window_matches_reference():
    model = build(tiny(pos_emb="learned", block_size=12))
    idx = torch.randint(0, 37, (2, 5))
    a = model.generate(idx, 20, temperature=0, use_cache=True)
    b = model.generate(idx, 20, temperature=0, use_cache=False)
    assert a.shape == (2, 25) and torch.equal(a, b)


@pytest.mark.parametrize("kw", [dict(pos_emb="rope"), dict(pos_emb="learned", n_kv_head=1),
                                dict(pos_emb="rope", sliding_window=4, n_sink=2),
                                dict(pos_emb="none", sliding_window=3)])
@pytest.mark.parametrize("use_cache", [True, False])
def test_mixed_length_batch_equals_each_prompt_alone(kw, use_cache):
    model = build(tiny(**kw))
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 37, (n,), generator=g) for n in (1, 6, 3, 9)]
    batched = model.generate(prompts, 15, temperature=0, use_cache=use_cache)
    for prompt, out in zip(prompts, batched):
        alone = model.generate(prompt[None], 15, temperature=0, use_cache=use_cache)[0]
        assert torch.equal(out, alone)


def test_eos_stops_each_row():
    model = build(tiny())
    prompts = [torch.tensor([1, 2, 3]), torch.tensor([4])]
    full = model.generate(prompts, 12, temperature=0)
    eos = int(full[0][5])  # some token row 0 generates
    outs = model.generate(prompts, 12, temperature=0, eos_token=eos)
    for prompt, f, o in zip(prompts, full, outs):
        completion = f[len(prompt):]
        hits = (completion == eos).nonzero()
        n = len(completion) if len(hits) == 0 else int(hits[0, 0]) + 1
        assert torch.equal(o, f[: len(prompt) + n])
    assert len(outs[0]) <= 6 and outs[0][-1] == eos
    # tensor input: finished rows are filled with eos afterwards
    idx = torch.tensor([[1, 2, 3], [4, 4, 4]])
    out = model.generate(idx, 12, temperature=0, eos_token=eos)
    for row in out:
        hits = (row[3:] == eos).nonzero()
        if len(hits):
            assert torch.all(row[3 + int(hits[0, 0]):] == eos)


def test_window_at_least_sequence_length_equals_full_attention():
    torch.manual_seed(0)
    full = build(tiny(pos_emb="rope"))
    windowed = GPT(tiny(pos_emb="rope", sliding_window=32)).double().eval()
    windowed.load_state_dict(full.state_dict())
    idx = torch.randint(0, 37, (2, 32))
    torch.testing.assert_close(full.logits(full(idx)), windowed.logits(windowed(idx)))


def test_sliding_window_mask_against_hand_written_rule():
    mask = attention_mask(None, 6, 3, 1, "cpu")[0, 0]  # a window of 3 positions, 1 sink
    expected = torch.tensor([[1, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [1, 1, 1, 0, 0, 0],
                             [1, 1, 1, 1, 0, 0],
                             [1, 0, 1, 1, 1, 0],
                             [1, 0, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_top_k_1_is_greedy_and_generator_reproduces():
    model = build(tiny(), dtype=torch.float32)
    idx = torch.randint(0, 37, (2, 4))
    greedy = model.generate(idx, 10, temperature=0)
    assert torch.equal(model.generate(idx, 10, temperature=1.0, top_k=1), greedy)
    a = model.generate(idx, 10, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(5))
    b = model.generate(idx, 10, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    seen = {int(sample_next(logits, 1.0, top_p=0.75, generator=g)) for _ in range(300)}
    assert seen == {0, 1}  # 0.5 < 0.75 <= 0.5 + 0.3
    seen = {int(sample_next(logits, 1.0, top_k=3, generator=g)) for _ in range(300)}
    assert seen == {0, 1, 2}


def test_vocab_limit_never_draws_padding_ids():
    logits = torch.zeros(2, 10)
    logits[:, 8:] = 100.0  # the padding ids would win every draw
    g = torch.Generator().manual_seed(0)
    for temperature in (0, 1.0):
        drawn = torch.stack([sample_next(logits, temperature, generator=g, vocab_limit=8) for _ in range(50)])
        assert drawn.max() < 8


def test_loss_ignores_minus_one_and_logprobs_agree():
    model = build(tiny(), dtype=torch.float64)
    idx = torch.randint(0, 37, (2, 8))
    targets = torch.randint(0, 37, (2, 8))
    targets[0, :3] = -1
    x = model(idx)
    logits, loss = model.logits(x), model.loss(x, targets)
    logp = torch.log_softmax(logits, -1)
    keep = targets != -1
    by_hand = -logp[keep].gather(-1, targets[keep][:, None]).mean()
    torch.testing.assert_close(loss, by_hand)
    lp, _ = model.logprobs(model(idx), targets)
    assert torch.all(lp[~keep] == 0)
    torch.testing.assert_close(-lp[keep].mean(), by_hand)


def test_hidden_states_feed_the_head():
    model = build(tiny())
    idx = torch.randint(0, 37, (2, 8))
    h = model(idx)
    assert h.shape == (2, 8, 32)
    torch.testing.assert_close(model.lm_head(h), model.logits(model(idx)))


def test_left_pad_positions():
    idx, pos = left_pad([torch.tensor([5, 6, 7]), torch.tensor([9])])
    assert idx.tolist() == [[5, 6, 7], [0, 0, 9]]
    assert pos.tolist() == [[0, 1, 2], [-2, -1, 0]]


def test_param_count_and_tying():
    tied = GPT(tiny(pos_emb="learned"))
    untied = GPT(tiny(pos_emb="learned", tie_weights=False))
    assert tied.lm_head.weight is tied.wte.weight
    assert untied.num_params() - tied.num_params() == 37 * 32
    assert tied.num_params(non_embedding=False) - tied.num_params() == 32 * 32  # wpe


def test_optimizer_groups():
    model = GPT(tiny(pos_emb="learned", tie_weights=False, bias=True, norm="layernorm"))
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert all(p.dim() == 2 for p in decay["params"])
    assert any(p is model.wte.weight for p in no_decay["params"])
    n_all = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == n_all


def test_bf16_autocast_and_double():
    model = GPT(tiny(sliding_window=4, n_sink=1))
    idx = torch.randint(0, 37, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss(model(idx), idx)
        out = model.generate(idx, 5, temperature=0)
    assert torch.isfinite(loss) and out.shape == (2, 13)
    model.double()
    assert model.logits(model(idx)).dtype == torch.float64


@pytest.mark.parametrize("kw, msg", [
    (dict(n_embd=30, n_head=4), "divisible by n_head"),
    (dict(n_kv_head=3), "divisible by n_kv_head"),
    (dict(pos_emb="alibi"), "pos_emb"),
    (dict(norm="batchnorm"), "norm"),
    (dict(mlp="relu"), "mlp"),
    (dict(n_embd=24, n_head=8, pos_emb="rope"), "even head size"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(n_sink=2), "n_sink"),
    (dict(n_sink=-1, sliding_window=3), "n_sink"),
    (dict(dropout=1.5), "dropout"),
    (dict(n_layer=0), "n_layer"),
])
def test_invalid_configs_raise(kw, msg):
    with pytest.raises(ValueError, match=msg):
        tiny(**kw)


def test_too_long_input_raises():
    model = GPT(tiny(block_size=8))
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_cached_equals_reference():
    model = build(tiny(sliding_window=5, n_sink=1), dtype=torch.float32).cuda()
    idx = torch.randint(0, 37, (2, 6), device="cuda")
    assert torch.equal(model.generate(idx, 20, temperature=0), model.generate(idx, 20, temperature=0, use_cache=False))


@pytest.mark.parametrize("kw", [dict(pos_emb="rope"), dict(pos_emb="learned", n_kv_head=2),
                                dict(pos_emb="rope", sliding_window=5, n_sink=2, n_kv_head=1)])
def test_static_cache_for_compiled_decoding_equals_reference(kw):
    # compile_decode swaps in a compiled decode_step and a static cache; here the static cache
    # runs uncompiled, which checks its masking (every slot, the unwritten ones masked)
    model = build(tiny(**kw))
    model.compiled_decode_step = model.decode_step
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 37, (n,), generator=g) for n in (2, 7, 4)]
    static = model.generate(prompts, 25, temperature=0)
    model.compiled_decode_step = None
    assert all(torch.equal(a, b) for a, b in zip(static, model.generate(prompts, 25, temperature=0, use_cache=False)))


def test_the_split_matmul_gives_f_linear():
    from autotune import SplitLinear, split_matmul

    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(64, 24, generator=g, dtype=torch.float64), torch.randn(64, generator=g, dtype=torch.float64)
    for shape in [(1, 1, 24), (3, 1, 24), (2, 4, 24), (24,)]:
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        for bias in (None, b):
            torch.testing.assert_close(split_matmul(x, w, bias, 2), torch.nn.functional.linear(x, w, bias))
    layer = torch.nn.Linear(24, 64).double()
    split = SplitLinear(layer, 4)
    assert split.weight is layer.weight and split.state_dict().keys() == layer.state_dict().keys()
    x = torch.randn(2, 24, generator=g, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(split(x), layer(x))


def test_split_linear_swaps_where_it_measured_faster_or_everywhere(monkeypatch):
    import autotune
    from autotune import SplitLinear

    torch.set_num_threads(2)  # the conftest fixture restores the count
    model = build(tiny(pos_emb="rope", n_kv_head=2), dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    monkeypatch.setattr(autotune, "faster", lambda *a, **k: calls.append(1) or False)  # plain measures faster
    assert autotune.split_linear(model) == "plain" and len(calls) == 1  # one measurement, of decoding
    assert not any(isinstance(m, SplitLinear) for m in model.modules())
    monkeypatch.setattr(autotune, "faster", lambda plain, trick, *a, **k: plain() or trick() or True)  # split faster
    assert autotune.split_linear(model) == "split"
    split = [m for m in model.modules() if isinstance(m, SplitLinear)]
    assert split and all(m.n == 2 for m in split)
    assert model.lm_head.weight is model.wte.weight  # still tied
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("kw", [dict(pos_emb="rope", n_kv_head=2), dict(pos_emb="learned", sliding_window=4, n_sink=1)])
def test_cached_equals_reference_with_the_split_matmul(kw):
    import autotune

    torch.set_num_threads(2)  # decode steps take the split-weight matmul, one block per thread
    model = build(tiny(**kw))
    autotune.split_linear(model, everywhere=True)
    prompts = [torch.randint(0, 37, (n,), generator=torch.Generator().manual_seed(n)) for n in (3, 8)]
    a = model.generate(prompts, 20, temperature=0)
    b = model.generate(prompts, 20, temperature=0, use_cache=False)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("kw", [dict(dropout=0.1), dict(n_expert=4, n_expert_active=2, dropout=0.1),
                                dict(lora_rank=4, pos_emb="rope", sliding_window=5)])
def test_grad_checkpointing_gives_the_same_loss_and_gradients(kw, monkeypatch):
    # the blocks are recomputed in the backward pass with the forward's random state (dropout), and
    # the loss is taken over chunks of 5 rows' logits (of 36), none of them kept
    import model as model_module

    monkeypatch.setattr(model_module, "LOGPROB_CHUNK", 5 * 37)
    grads = []
    for ckpt in (False, True):
        model = build(tiny(**kw), sharpen=1.0).train()  # float64
        model.grad_checkpointing = ckpt
        idx = torch.randint(0, 37, (3, 12), generator=torch.Generator().manual_seed(3))
        torch.manual_seed(7)
        targets = idx.roll(-1, 1).masked_fill(idx % 3 == 0, -1)  # some positions without a loss
        heads = []  # with checkpointing the loss never asks for the batch's logits at once
        monkeypatch.setattr(model, "logits", lambda x, full=model.logits: (heads.append(1), full(x))[1])
        loss = model.loss(model(idx), targets)
        assert (not heads) == ckpt
        (loss + model.aux_loss()).backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, a), (loss_b, b) = grads
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-12, atol=0)
    assert a.keys() == b.keys() and len(a) > 0
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-9, atol=1e-12, msg=n)
