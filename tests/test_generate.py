"""What the RL stages read from model.py: log-probs of the distribution that was sampled, completions
with their masks, groups of samples sharing one prefill, and the reference with adapters off."""


from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

import autotune
import model as model_module
from conftest import build, tiny
from convert import load_base_weights
from model import GPT, adapters_off, lora_layers, merge_lora, unmerge_lora
from sampling import left_pad, sample_next


def test_logprobs_are_those_of_the_tempered_truncated_distribution():
    model = build(tiny(), sharpen=3.0)
    idx = torch.randint(0, 37, (2, 6), generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 30, (2, 6), generator=torch.Generator().manual_seed(1))
    targets[0, 2] = -1
    logits = model.logits(model(idx))
    for temperature, vocab_limit in ((1.0, None), (0.7, None), (1.3, 30)):
        want = F.log_softmax(logits[..., :vocab_limit] / temperature, dim=-1)
        want = want.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1).masked_fill(targets < 0, 0.0)
        got, _ = model.logprobs(model(idx), targets, temperature=temperature, vocab_limit=vocab_limit)
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="temperature"):
        model.logprobs(model(idx), targets, temperature=0.0)


def test_entropy_and_chunked_head_agree_with_one_chunk(monkeypatch):
    model = build(tiny(), dtype=torch.float32, sharpen=3.0)
    idx = torch.randint(0, 37, (3, 8), generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 37, (3, 8), generator=torch.Generator().manual_seed(1))
    x = model(idx)
    logp, ent = model.logprobs(x, targets, temperature=0.9, entropy=True)
    p = F.softmax(model.lm_head(x) / 0.9, dim=-1)
    torch.testing.assert_close(ent, -(p * p.log()).sum(-1))
    # chunks of 5 rows (24 rows in all), with gradients: checkpointed chunks, same values and grads
    monkeypatch.setattr(model_module, "LOGPROB_CHUNK", 5 * 37)
    x1 = x.detach().requires_grad_()
    logp1, _ = model.logprobs(x1, targets, temperature=0.9)
    logp1.sum().backward()
    monkeypatch.setattr(model_module, "LOGPROB_CHUNK", 2**24)
    x2 = x.detach().requires_grad_()
    logp2, _ = model.logprobs(x2, targets, temperature=0.9)
    logp2.sum().backward()
    torch.testing.assert_close(logp1, logp2)
    torch.testing.assert_close(logp1, logp.detach())
    torch.testing.assert_close(x1.grad, x2.grad)


def test_completion_mask_stops_at_and_includes_the_stop_token():
    model = build(tiny(tie_weights=False), sharpen=3.0)  # a tied head just repeats the last token
    prompts = [torch.tensor([1, 2, 3]), torch.tensor([4, 5]), torch.tensor([6, 7, 8, 9])]
    # the free continuations (no stop), to know where each row's stop falls; a row's draws depend
    # only on its own history, so the same generator gives the same tokens up to each stop
    sample = dict(temperature=1.0, top_k=8)
    free = model.complete(prompts, 12, generator=torch.Generator().manual_seed(0), **sample)
    free = [row[free.prompt_len:] for row in free.idx]
    row0 = free[0].tolist()
    first = next(i for i in range(2, 12) if row0[i] not in row0[:i])  # a token new at position i
    stop = row0[first]  # becomes a stop token: row 0 must stop right after it
    out = model.complete(prompts, 12, stop_tokens=(stop, 36), generator=torch.Generator().manual_seed(0), **sample)
    L = out.prompt_len
    assert L == 4 and out.idx.shape[0] == 3
    for b, p in enumerate(prompts):
        gen = free[b].tolist()
        hits = [i for i, t in enumerate(gen) if t in (stop, 36)]
        n = hits[0] + 1 if hits else len(gen)
        assert out.mask[b].tolist() == [False] * L + [True] * n + [False] * (out.idx.size(1) - L - n)
        assert out.idx[b, L : L + n].tolist() == gen[:n]
        assert out.idx[b, L - len(p) : L].tolist() == p.tolist()  # left-padded prompt
        assert bool(out.truncated[b]) == (not hits)
    assert out.mask[0, L : L + first + 1].all() and not out.mask[0, L + first + 1 :].any()  # at and including
    # positions: negative on the padding, then counting on from each prompt's end
    assert out.pos[1].tolist()[:4] == [-2, -1, 0, 1] and out.pos[1, 4].item() == 2
    # targets are the completion tokens only, and their log-probs are the greedy path's
    t = out.targets()
    assert ((t >= 0) == out.mask[:, 1:]).all()


def test_truncated_rows_are_flagged_and_mask_truncated_drops_exactly_them():
    model = build(tiny(tie_weights=False), sharpen=3.0)
    out = model.complete([torch.tensor([1, 2])], 5, temperature=0, stop_tokens=())
    assert out.truncated.tolist() == [True] and out.mask[0, 2:].all() and out.idx.shape == (1, 7)
    # four samples, some stopping within 6 tokens, some not
    prompts = [torch.tensor([1, 2, 3])] * 4
    out = model.complete(prompts, 6, temperature=1.0, top_k=4, stop_tokens=(5, 9, 11),
                         generator=torch.Generator().manual_seed(4))
    kept = out.loss_mask(drop_truncated=True)
    assert torch.equal(out.loss_mask(), out.mask[:, 1:])
    assert 0 < int(out.truncated.sum()) < 4, out.truncated
    for b in range(4):
        if out.truncated[b]:
            assert not kept[b].any()
        else:
            assert torch.equal(kept[b], out.mask[b, 1:]) and kept[b].any()


@pytest.mark.parametrize("use_cache", [True, False])
def test_group_samples_share_one_prefill_and_equal_repeated_prompts(use_cache):
    model = build(tiny(pos_emb="rope", n_kv_head=2), sharpen=2.0)
    prompts = [torch.tensor([3, 4, 5]), torch.tensor([6, 7])]
    G = 4
    a = model.complete(prompts, 10, num_samples=G, temperature=1.0, stop_tokens=5,
                       generator=torch.Generator().manual_seed(0), use_cache=use_cache)
    repeated = [p for p in prompts for _ in range(G)]
    b = model.complete(repeated, 10, temperature=1.0, stop_tokens=5, generator=torch.Generator().manual_seed(0),
                       use_cache=use_cache)
    assert torch.equal(a.idx, b.idx) and torch.equal(a.mask, b.mask) and torch.equal(a.pos, b.pos)
    assert len({tuple(r) for r in a.idx[:G].tolist()}) > 1  # the samples of a group differ


@pytest.mark.parametrize("variant", [dict(pos_emb="rope", n_kv_head=2), dict(pos_emb="learned", block_size=12)])
def test_a_prompt_held_once_for_its_group_decodes_as_copies_of_it_do(variant, monkeypatch):
    # KVCache.share keeps each prompt's keys and values once for its rows; copying them per row
    # (repeat_interleave, what a rolling or static cache does) must give the same logits, step by
    # step, with padding, GQA, and rows whose budget in block_size runs out before others'
    model = build(tiny(**variant), sharpen=2.0)
    prompts = [torch.tensor([3, 4, 5, 6, 7, 8]), torch.tensor([6, 7]), torch.tensor([1, 2, 9])]

    idx, pos = left_pad(prompts)

    def run():
        steps = model.generate_tokens(idx, 7, 1.0, pos=pos, num_samples=3, generator=torch.Generator().manual_seed(0),
                                      last_pos=torch.tensor([11] * 3 + [8] * 6) if "block_size" in variant else None)
        return [(token, logits) for token, logits in steps]

    shared = run()
    monkeypatch.setattr(model_module.KVCache, "share", lambda cache, n, new_tokens: cache.repeat_interleave(n))
    copied = run()
    for (t1, l1), (t2, l2) in zip(shared, copied, strict=True):
        assert torch.equal(t1, t2)
        torch.testing.assert_close(l1, l2)


def test_shared_prefill_runs_the_prompts_once():
    model = build(tiny())
    seen = []
    prefill = model.prefill
    model.prefill = lambda idx, pos, cache: (seen.append(idx.shape), prefill(idx, pos, cache))[1]
    model.complete([torch.tensor([1, 2, 3]), torch.tensor([4])], 4, num_samples=8, temperature=1.0)
    assert seen == [(2, 3)]


@pytest.mark.parametrize("variant", [dict(pos_emb="rope", n_kv_head=2), dict(pos_emb="learned", tie_weights=False),
                                     dict(pos_emb="rope", sliding_window=4, n_sink=1),
                                     dict(n_expert=4, n_expert_active=2, lora_rank=2)])
def test_a_shared_prompt_run_once_gives_the_update_what_whole_rows_do(variant):
    # the update's forward runs each group's prompt once (Completions.prefix) and the rest of the
    # rows against it: the same log-probs and the same gradients as a forward of the whole rows,
    # for every row and for a shuffled minibatch of them (prompts of different lengths: padding)
    model = build(tiny(**variant), sharpen=2.0)
    prompts = [torch.tensor([3, 4, 5, 6, 7]), torch.tensor([6, 7]), torch.tensor([1, 2, 9])]
    out = model.complete(prompts, 8, num_samples=4, temperature=1.0, stop_tokens=5,
                         generator=torch.Generator().manual_seed(0))
    assert out.num_samples == 4 and not out.mask.all()  # some rows stop early: filler after them
    S = out.prompt_len - 1
    for rows in (None, torch.tensor([7, 0, 11, 5, 6])):  # all rows in order (groups by copies), or some, by index
        rows_of = torch.arange(12) if rows is None else rows
        whole, grads = [], []
        for shared in (False, True):
            model.zero_grad()
            if shared:
                x = model(out.idx[rows_of, S:-1], out.pos[rows_of, S:-1], prefix=out.prefix(rows))
                logp, ent = model.logprobs(x, out.targets()[rows_of, S:], 0.9, entropy=True)
            else:
                x = model(out.idx[rows_of, :-1], out.pos[rows_of, :-1])
                logp, ent = model.logprobs(x, out.targets()[rows_of], 0.9, entropy=True)
                assert not logp[:, :S].any()  # nothing of the prompt is a target
                logp, ent = logp[:, S:], ent[:, S:]
            (logp.sum() + ent.sum()).backward()
            whole.append((logp, ent))
            grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
        torch.testing.assert_close(whole[0], whole[1])
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="positions"):
        model(out.idx[:, S:-1], prefix=out.prefix())


def test_generate_takes_several_stop_tokens_and_num_samples():
    model = build(tiny())
    idx = torch.tensor([[1, 2, 3]])
    free = model.generate(idx, 10, temperature=0)[0, 3:].tolist()
    stops = (free[2], 36)
    out = model.generate(idx, 10, temperature=0, eos_token=stops)
    first = next(i for i, t in enumerate(free) if t in stops)
    assert out[0, 3 : 3 + first + 1].tolist() == free[: first + 1]
    assert (out[0, 3 + first :] == free[first]).all()  # filled with the stop token after it
    lists = model.generate([idx[0], idx[0, 1:]], 10, temperature=0, eos_token=stops, num_samples=2)
    assert len(lists) == 4 and torch.equal(lists[0], lists[1]) and lists[0].tolist() == idx[0].tolist() + free[: first + 1]


def test_sample_next_refuses_impossible_settings():
    logits = torch.zeros(1, 5)
    for kw, msg in ((dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=0), "top_k"),
                    (dict(temperature=-1.0), "temperature")):
        with pytest.raises(ValueError, match=msg):
            sample_next(logits, **{"temperature": 1.0, **kw})


def test_adapters_off_is_the_base_model():
    torch.manual_seed(0)
    base = GPT(tiny()).double().eval()
    lora = GPT(tiny(lora_rank=4, lora_targets=("attn", "mlp"))).double().eval()
    load_base_weights(lora, base.state_dict())
    with torch.no_grad():
        for layer in lora_layers(lora):
            layer.lora_B.normal_()
    idx = torch.randint(0, 37, (2, 9))
    assert not torch.allclose(lora.logits(lora(idx)), base.logits(base(idx)))
    with adapters_off(lora):
        torch.testing.assert_close(lora.logits(lora(idx)), base.logits(base(idx)), rtol=0, atol=0)
    merge_lora(lora)
    with adapters_off(lora):  # merged too: the kept original weights
        torch.testing.assert_close(lora.logits(lora(idx)), base.logits(base(idx)), rtol=0, atol=0)
    unmerge_lora(lora)
    assert not torch.allclose(lora.logits(lora(idx)), base.logits(base(idx)))


def test_rolling_cache_at_sixteen_times_block_size_follows_the_stated_rule():
    # the rule (model.py's docstring): query i sees key j when 0 <= j <= i and (i - j < W or
    # j < n_sink), at absolute positions, rope included. The uncached path recomputes the whole
    # sequence under that mask at every step, so the rolling cache must give the same tokens
    # however far past block_size it runs.
    cfg = tiny(pos_emb="rope", sliding_window=6, n_sink=2, block_size=8, tie_weights=False)
    model = build(cfg, sharpen=3.0)  # float64: sampling the same logits draws the same tokens
    idx = torch.randint(0, 37, (1, 3), generator=torch.Generator().manual_seed(3))
    n = 16 * cfg.block_size
    cached = model.generate(idx, n, generator=torch.Generator().manual_seed(0), use_cache=True)
    reference = model.generate(idx, n, generator=torch.Generator().manual_seed(0), use_cache=False)
    assert torch.equal(cached, reference) and cached.size(1) == 3 + n
    assert len(set(cached[0, -64:].tolist())) > 1  # not stuck on one token


def test_scalar_head_reads_the_last_real_token_with_either_padding():
    from sampling import last_index, left_pad

    model = build(tiny(scalar_head=True, pos_emb="rope"))
    seqs = [torch.tensor([3, 1, 4, 1, 5]), torch.tensor([9, 2]), torch.tensor([6, 5, 3, 5])]
    alone = torch.stack([model.scores(model(s[None]), torch.tensor([len(s) - 1]))[0] for s in seqs])
    # right padding: last = length - 1
    right = torch.zeros(3, 5, dtype=torch.long)
    for b, s in enumerate(seqs):
        right[b, : len(s)] = s
    got = model.scores(model(right), torch.tensor([len(s) - 1 for s in seqs]))
    torch.testing.assert_close(got, alone, rtol=0, atol=1e-12)
    # left padding with positions: the last column, found from the mask of real tokens
    idx, pos = left_pad(seqs)
    got = model.scores(model(idx, pos), last_index(pos >= 0))
    torch.testing.assert_close(got, alone, rtol=0, atol=1e-12)
    # values at every position equal each prefix scored alone
    values = model.scores(model(seqs[0][None]))[0]
    for t in range(5):
        torch.testing.assert_close(values[t], model.scores(model(seqs[0][None, : t + 1]), torch.tensor([t]))[0])


def test_scalar_head_trains_under_lora_and_a_plain_checkpoint_gains_one():
    import common

    cfg = tiny(lora_rank=4, scalar_head=True)
    model = GPT(cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"score_head.weight", "score_head.bias"} <= trainable
    assert all("lora_" in n or n.startswith("score_head.") for n in trainable)
    plain = GPT(tiny())
    ckpt = {"model": plain.state_dict(), "model_args": asdict(plain.config)}
    rm = common.model_from_checkpoint(ckpt, "plain.pt", {"scalar_head": True})
    assert rm.score_head is not None and torch.equal(rm.wte.weight, plain.wte.weight)
    back = common.model_from_checkpoint({"model": rm.state_dict(), "model_args": asdict(plain.config)}, "rm.pt")
    assert back.score_head is None  # a reward checkpoint read as a policy drops the head
    with pytest.raises(RuntimeError, match="no scalar head"):
        back.scores(back(torch.zeros(1, 3, dtype=torch.long)))


def test_compiled_decode_step_gives_the_eager_tokens():
    # the compiled step reads a static cache (every slot, unwritten ones masked); with CUDA graphs
    # its output buffer is reused, which generate guards against by copying the logits. Here CPU
    # inductor, where a C++ compiler is there
    import common

    if not common.compile_works("cpu"):
        pytest.skip("torch.compile does not work on this machine")
    model = build(tiny(pos_emb="rope", n_kv_head=2), dtype=torch.float32, sharpen=2.0)
    idx = torch.randint(0, 37, (2, 5), generator=torch.Generator().manual_seed(0))
    eager = model.generate(idx, 12, generator=torch.Generator().manual_seed(1))
    autotune.compile_decode(model, measure=False)
    assert model.compiled_decode_step is not None
    compiled = model.generate(idx, 12, generator=torch.Generator().manual_seed(1))
    assert torch.equal(compiled, eager)


def test_a_lora_checkpoint_starting_a_new_stage_is_its_own_reference():
    # GRPO (or PPO, DPO) from a LoRA SFT checkpoint with LoRA again: the policy starts as the
    # checkpoint computes, and adapters off (the reference) is that same model, not the pre-SFT base
    import common

    torch.manual_seed(0)
    cfg = tiny(lora_rank=4, lora_targets=("attn",))
    sft = GPT(cfg).double().eval()
    with torch.no_grad():
        for layer in lora_layers(sft):
            layer.lora_B.normal_()
    ckpt = {"model": sft.state_dict(), "model_args": asdict(cfg)}
    idx = torch.randint(0, 37, (2, 9))
    policy = common.model_from_checkpoint(ckpt, "sft.pt", {"lora_rank": 4, "lora_targets": ("attn",)}).double().eval()
    torch.testing.assert_close(policy.logits(policy(idx)), sft.logits(sft(idx)), atol=1e-5, rtol=1e-5)  # stored in float32
    with adapters_off(policy):
        torch.testing.assert_close(policy.logits(policy(idx)), sft.logits(sft(idx)), atol=1e-5, rtol=1e-5)  # the reference is the start
    assert all(not layer.lora_B.any() for layer in lora_layers(policy))  # fresh adapters
    resumed = common.model_from_checkpoint(ckpt, "sft.pt").double().eval()  # a resume keeps them as they are
    assert any(layer.lora_B.any() for layer in lora_layers(resumed))


def test_group_samples_of_a_prompt_longer_than_block_size():
    # no cache to share past block_size: the samples start as copies and every step recomputes
    model = build(tiny(block_size=16, tie_weights=False), sharpen=2.0)
    prompt = torch.randint(0, 37, (20,), generator=torch.Generator().manual_seed(0))
    a = model.complete([prompt], 4, num_samples=3, temperature=1.0, generator=torch.Generator().manual_seed(1),
                       within_block=False)
    b = model.complete([prompt] * 3, 4, temperature=1.0, generator=torch.Generator().manual_seed(1), within_block=False)
    assert a.idx.shape == (3, 24) and torch.equal(a.idx, b.idx)


def test_each_row_gets_the_room_its_prompt_leaves_in_block_size():
    # block_size 16: a prompt of 12 tokens has room for 4, one of 3 for 10 (capped at max_new_tokens),
    # in one batch 22 columns wide; no row's position ever reaches 16
    model = build(tiny(block_size=16, tie_weights=False), sharpen=2.0)
    prompts = [torch.arange(12) % 37, torch.tensor([5, 6, 7])]
    out, ref = (model.complete(prompts, 10, temperature=1.0, generator=torch.Generator().manual_seed(0),
                               use_cache=use_cache) for use_cache in (True, False))
    L = out.prompt_len
    assert out.mask[:, L:].sum(1).tolist() == [4, 10] and out.truncated.tolist() == [True, True]
    assert out.idx.shape == (2, 22) and int(out.pos.max()) == 15
    assert (out.pos[~out.mask & (torch.arange(22) >= L)] == -1).all()  # filler counts as padding
    # the cache past 16 columns computes what the full recompute does
    assert torch.equal(out.idx, ref.idx) and torch.equal(out.mask, ref.mask) and torch.equal(out.pos, ref.pos)
    # the forward over the whole batch, wider than block_size, scores the completions as sampled
    logp, _ = model.logprobs(model(out.idx[:, :-1], out.pos[:, :-1]), out.targets())
    assert torch.isfinite(logp).all() and (logp[~out.loss_mask()] == 0).all() and (logp[out.loss_mask()] < 0).all()
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(out.idx[:, :-1])  # without positions the 21 columns are 21 positions
    with pytest.raises(ValueError, match="no room in block_size 16"):
        model.complete([torch.arange(16)], 4)
