"""Weight-only quantization (quantize.py): the rounding stays within what the scale allows, the
int4 packing round-trips, a quantized Linear computes its dequantized twin on either path, cached
decoding matches the full recompute, a quantized checkpoint saves and loads to the same outputs,
LoRA on a quantized base (QLoRA) trains only its adapters and keeps the integers bit-identical,
refused settings say why, and the scripts and bench sections take quantize."""

import dataclasses
import json
import os
import types
from dataclasses import asdict

import pytest
import torch

import common
import model as model_module
import quantize
from conftest import build, run_forked, save_byte_checkpoint, tiny
from convert import load_base_weights, merged_state_dict, resize_vocab, to_hf
from model import GPT, adapters_off, is_lora_key, lora_layers, merge_lora, unmerge_lora
from quantize import (QuantizedWeight, dequantize_int4, dequantize_int8, pack_int4, quantize_int4, quantize_int8,
                      unpack_int4)
from test_lora import train
from test_sft import sft, sft_setup  # noqa: F401  (sft_setup: a fixture, found here by pytest)
from test_train import TINY, read_log

MASTER = types.SimpleNamespace(master=True)  # save_weights writes on the master process only
SETTINGS = [(8, None), (4, 32)]


def ids(v):
    return "-".join(map(str, v.values() if isinstance(v, dict) else v)) or "default"


@pytest.fixture(autouse=True)
def fresh_paths(monkeypatch):
    """Each test measures its own paths: a choice recorded by another test must not leak in."""
    monkeypatch.setattr(quantize, "QUANT_PATHS", {})
    monkeypatch.setattr(quantize, "QUANT_FORCE", None)


def weights(out, n_in, seed=0, dtype=torch.float32):
    """Rows of very different sizes (a scale per row must follow them), one row all zeros."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n_in, generator=g) * torch.logspace(-3, 1, out)[:, None]
    w[3] = 0.0
    return w.to(dtype)


# -----------------------------------------------------------------------------
# the math


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_rounding_is_within_half_a_scale_per_row(dtype):
    w = weights(48, 64, dtype=dtype)
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (48,) and scale.dtype == dtype
    err = (w.float() - dequantize_int8(q, scale, torch.float32)).abs()
    assert (err <= scale.float()[:, None] / 2 * (1 + 1e-6)).all()
    # the scale is the tightest one: each nonzero row reaches +-127, so no code is wasted
    peak = q.abs().amax(dim=1)
    assert peak[3] == 0 and (torch.cat((peak[:3], peak[4:])) == 127).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_rounding_is_within_half_a_scale_per_group(dtype, group_size):
    w = weights(16, 128, dtype=dtype)
    packed, scale = quantize_int4(w, group_size)
    assert packed.shape == (16, 64) and packed.dtype == torch.uint8 and scale.shape == (16, 128 // group_size)
    q = unpack_int4(packed)
    assert q.min() >= -7 and q.max() <= 7  # symmetric: -8 is never used
    per_weight_scale = scale.float().repeat_interleave(group_size, dim=1)
    err = (w.float() - dequantize_int4(packed, scale, torch.float32)).abs()
    assert (err <= per_weight_scale / 2 * (1 + 1e-6)).all()
    peak = q.view(16, -1, group_size).abs().amax(dim=-1)
    assert ((peak == 7) | (scale == 0)).all()  # every nonzero group uses its full range


def test_int4_packing_round_trips_and_matches_the_documented_layout():
    q = torch.tensor([[-8, 7, 0, 1], [3, -3, -1, -7]], dtype=torch.int8)
    # byte j = (q[2j] + 8) << 4 | (q[2j+1] + 8): 0 << 4 | 15, 8 << 4 | 9, ...
    assert pack_int4(q).tolist() == [[15, 137], [11 << 4 | 5, 7 << 4 | 1]]
    every = torch.randint(-8, 8, (64, 96), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(every)), every)


def test_every_layer_of_a_quantized_model_is_within_its_bound():
    torch.manual_seed(0)
    for bits, group in SETTINGS:
        ref = GPT(tiny(n_embd=64, n_kv_head=2))
        model = GPT(ref.config)
        model.load_state_dict(ref.state_dict())
        quantize.quantize(model, bits, group)
        quantized = dict(model.named_modules())
        n = 0
        for name, m in ref.named_modules():
            if isinstance(m, model_module.Linear) and name != "lm_head":
                qw = quantized[name].weight
                assert isinstance(qw, QuantizedWeight) and qw.bits == bits
                scale = qw.scale[:, None] if bits == 8 else qw.scale.repeat_interleave(group, dim=1)
                # |w - q scale| <= scale / 2, up to float32 rounding of w / scale and q * scale
                assert ((m.weight - qw.dequantize()).abs() <= scale / 2 * (1 + 1e-6) + 1e-6 * m.weight.abs()).all(), name
                n += 1
        assert n == 2 * 7  # q k v proj, fc gate proj, in each of two layers


# -----------------------------------------------------------------------------
# the matmul: either path gives the dequantized twin's product


def quantized_linear_and_twin(bits, group, out=64, n_in=96, bias=True):
    """A Linear with a quantized weight, and a float32 Linear holding that weight dequantized."""
    torch.manual_seed(0)
    layer, twin = model_module.Linear(n_in, out, bias=bias), model_module.Linear(n_in, out, bias=bias)
    weight = layer.weight.detach()
    del layer.weight
    layer.weight = QuantizedWeight(weight, bits, group)
    with torch.no_grad():
        twin.weight.copy_(layer.weight.dequantize())
        if bias:
            twin.bias.copy_(layer.bias)
    return layer, twin


@pytest.mark.parametrize("path", ["kernel", "dequantize", None])
@pytest.mark.parametrize("bits, group", SETTINGS)
def test_quantized_linear_equals_its_dequantized_twin(bits, group, path, monkeypatch):
    monkeypatch.setattr(quantize, "QUANT_FORCE", path)
    layer, twin = quantized_linear_and_twin(bits, group)
    kernel = quantize.QUANT_KERNELS[("cpu", bits)]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for shape in [(1, 96), (3, 1, 96), (2, 4, 96), (4, 20, 96)]:  # decode-sized, and a prefill (80 rows)
            x = torch.randn(*shape, generator=g)
            # float32 throughout: only the order of the sums differs between the paths
            torch.testing.assert_close(layer(x), twin(x), rtol=1e-5, atol=1e-5)
            ran = layer.weight.last_path
            if x.numel() // 96 > quantize.QUANT_MAX_ROWS:  # a long prefill: always the dequantized weight
                assert ran == "dequantize"
            else:
                assert ran == {"kernel": kernel, "dequantize": "dequantize"}.get(path, ran) and ran in (kernel, "dequantize")


@pytest.mark.parametrize("bits, group", SETTINGS)
def test_bf16_activations_and_autocast(bits, group):
    """With bf16 activations the kernel reads bf16 inputs (its fast path on CPUs with AVX512-BF16):
    within bf16's rounding of the float32 twin. Under autocast an fp32 model computes in bf16."""
    layer, twin = quantized_linear_and_twin(bits, group)
    x = torch.randn(2, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = twin(x)
        for out in (layer.to(torch.bfloat16)(x.bfloat16()),):
            assert out.dtype == torch.bfloat16
            torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
        layer.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_the_measured_choice_is_recorded_once_and_an_entry_overrides_it(monkeypatch):
    layer, _ = quantized_linear_and_twin(8, None, bias=False)
    calls = []
    real = quantize.faster
    monkeypatch.setattr(quantize, "faster", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    x = torch.randn(1, 96)
    with torch.no_grad():
        for _ in range(3):
            layer(x)
        assert calls == [1]  # measured once for this (bits, shape, rows, dtype, device, threads)
        (key, path), = quantize.QUANT_PATHS.items()
        assert key == (8, None, 64, 96, 1, torch.float32, "cpu", torch.get_num_threads()) and path in ("kernel", "dequantize")
        quantize.QUANT_PATHS[key] = "kernel"
        layer(x)
        assert layer.weight.last_path == "torch._weight_int8pack_mm"
        quantize.QUANT_PATHS[key] = "dequantize"
        layer(x)
        assert layer.weight.last_path == "dequantize"
        # a dtype the kernel refuses (float64) is no candidate: the dequantize path, nothing timed
        layer.double()(x.double())
        assert calls == [1] and quantize.QUANT_PATHS[key[:5] + (torch.float64,) + key[6:]] == "dequantize"


def test_gradients_reach_the_input_and_only_the_integers_are_saved():
    """Under autograd the backward dequantizes again: what is saved for it is the int8/uint8
    weight, never a float copy of it (that would be a full-precision base kept through the step)."""
    for bits, group in SETTINGS:
        layer, twin = quantized_linear_and_twin(bits, group, out=32, n_in=64, bias=False)
        x = torch.randn(2, 5, 64, requires_grad=True)
        saved = []

        def pack(t):
            saved.append((tuple(t.shape), t.dtype))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = layer(x)
        (dx,) = torch.autograd.grad(y.square().sum(), x)
        x_twin = x.detach().requires_grad_(True)
        (dx_twin,) = torch.autograd.grad(twin(x_twin).square().sum(), x_twin)
        torch.testing.assert_close(dx, dx_twin, rtol=1e-5, atol=1e-5)
        assert not [s for s in saved if s[0] == (32, 64) and s[1].is_floating_point]
        assert ((32, 64) if bits == 8 else (32, 32)) in [s[0] for s in saved]


# -----------------------------------------------------------------------------
# a quantized model


MODELS = [
    dict(pos_emb="rope", n_kv_head=2),
    dict(pos_emb="learned", norm="layernorm", mlp="gelu", bias=True),
    dict(sliding_window=5, n_sink=1),
    dict(n_expert=4, n_expert_active=2, expert_hidden=32, moe_every=2),
]


@pytest.mark.parametrize("force", [None, "kernel"])
@pytest.mark.parametrize("bits, group", SETTINGS)
@pytest.mark.parametrize("kw", MODELS, ids=ids)
def test_cached_decode_equals_the_full_recompute(kw, bits, group, force, monkeypatch):
    """float32 activations, greedy; a mixed-length batch (left padding, per-row positions) and
    one prompt. Decode steps take the measured (or the kernel) path, the recompute dequantizes."""
    monkeypatch.setattr(quantize, "QUANT_FORCE", force)
    model = quantize.quantize(build(tiny(**kw), dtype=torch.float32), bits, group)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 37, (n,), generator=g) for n in (3, 9, 6)]
    cached = model.generate(prompts, 24, temperature=0)
    full = model.generate(prompts, 24, temperature=0, use_cache=False)
    assert all(torch.equal(a, b) for a, b in zip(cached, full))
    one = prompts[1][None]
    assert torch.equal(model.generate(one, 24, temperature=0), model.generate(one, 24, temperature=0, use_cache=False))
    if kw.get("n_expert"):  # experts quantized, the router left in floating point
        moe = model.moe_layers()[0]
        assert isinstance(moe.experts[0].c_fc.weight, QuantizedWeight)
        assert isinstance(moe.router.weight, torch.nn.Parameter)


def test_quantized_model_stays_close_to_the_original():
    """int8 and int4 (g32) of a random model: logits within a few percent of their range."""
    ref = build(tiny(n_embd=64), dtype=torch.float32)
    idx = torch.randint(0, 37, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = ref.logits(ref(idx))
    for (bits, group), tol in zip(SETTINGS, (0.01, 0.05)):
        model = quantize.quantize(build(ref.config, dtype=torch.float32), bits, group)
        err = (model.logits(model(idx)) - logits).abs().max() / logits.abs().max()
        assert 0 < err < tol, (bits, err)
        assert model.num_params() == ref.num_params() and model.wte.weight.dtype == torch.float32


def test_quantize_head():
    """quantize_head: a tied head gets a quantized copy of the table (the lookup keeps the table);
    the plain export gives the table back exactly; an untied head is quantized in place."""
    ref = build(tiny(), dtype=torch.float32)
    model = quantize.quantize(build(ref.config, dtype=torch.float32), 8, quantize_head=True)
    assert isinstance(model.lm_head.weight, QuantizedWeight) and isinstance(model.wte.weight, torch.nn.Parameter)
    assert model.num_params() == ref.num_params()
    idx = torch.randint(0, 37, (1, 12))
    logits, reference = model.logits(model(idx)), ref.logits(ref(idx))
    assert 0 < (logits - reference).abs().max() < 0.02 * reference.abs().max()
    sd = merged_state_dict(model)
    assert torch.equal(sd["lm_head.weight"], ref.wte.weight) and torch.equal(sd["wte.weight"], ref.wte.weight)
    plain = GPT(ref.config)
    plain.load_state_dict(sd)
    # an export for transformers goes out dequantized: what the plain twin exports
    hf, tensors = to_hf(model)
    assert all(torch.equal(t, to_hf(plain)[1][k]) for k, t in tensors.items())
    untied = quantize.quantize(build(tiny(tie_weights=False), dtype=torch.float32), 4, 32, quantize_head=True)
    assert isinstance(untied.lm_head.weight, QuantizedWeight)
    with pytest.raises(ValueError, match="the head is quantized"):
        resize_vocab(untied, 64)


# -----------------------------------------------------------------------------
# checkpoints


def sizes_and_outputs(tmp_path, config):
    ref = build(config, dtype=torch.float32)
    idx = torch.randint(0, config.vocab_size, (2, 10))
    common.save_weights(str(tmp_path / "fp32.pt"), MASTER, ref)
    out = {"fp32": os.path.getsize(tmp_path / "fp32.pt")}
    for bits, group in SETTINGS:
        model = quantize.quantize(build(config, dtype=torch.float32), bits, group)
        path = str(tmp_path / f"int{bits}.pt")
        common.save_weights(path, MASTER, model, meta={"tokenizer": "byte"})
        ckpt = common.load_checkpoint(path)
        assert ckpt["quantization"] == model.quantization and ckpt["quantization"]["format"].startswith(f"int{bits}:")
        loaded = common.model_from_checkpoint(ckpt, path).eval()
        assert loaded.quantization == model.quantization
        assert torch.equal(loaded.logits(loaded(idx)), model.logits(model(idx)))
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
        out[bits] = os.path.getsize(path)
    return out


def test_a_quantized_checkpoint_saves_and_loads_to_identical_outputs(tmp_path):
    size = sizes_and_outputs(tmp_path, tiny(n_embd=128, n_head=4, vocab_size=37))
    # the blocks are nearly all of this model: a byte and a half byte per weight, plus the scales
    assert size[8] < 0.32 * size["fp32"] and size[4] < 0.2 * size["fp32"], size


def test_a_stored_format_is_kept_and_another_refused(tmp_path):
    model = quantize.quantize(build(tiny(), dtype=torch.float32), 4, 32)
    path = str(tmp_path / "int4.pt")
    common.save_weights(path, MASTER, model)
    ckpt = common.load_checkpoint(path)
    for same in ("none", "int4"):
        assert common.model_from_checkpoint(ckpt, path, quantize=same, quant_group_size=32).quantization["bits"] == 4
    with pytest.raises(ValueError, match="stored as int4 in groups of 32"):
        common.model_from_checkpoint(ckpt, path, quantize="int8")
    with pytest.raises(ValueError, match="stored as int4 in groups of 32"):
        common.model_from_checkpoint(ckpt, path, quantize="int4", quant_group_size=64)
    with pytest.raises(ValueError, match="trains only with adapters"):
        common.model_from_checkpoint(ckpt, path, trains=True)


# -----------------------------------------------------------------------------
# QLoRA


def qlora(bits, group, **kw):
    """A base model and a LoRA model on it whose base is then quantized."""
    torch.manual_seed(0)
    base = GPT(tiny(**kw)).eval()
    torch.manual_seed(1)
    model = GPT(dataclasses.replace(base.config, lora_rank=4, lora_alpha=8.0, lora_targets=("attn", "mlp")))
    load_base_weights(model, base.state_dict())
    return base, quantize.quantize(model, bits, group)


@pytest.mark.parametrize("bits, group", SETTINGS)
def test_qlora_trains_only_adapters_and_leaves_the_integers_bit_identical(bits, group, tmp_path):
    _, model = qlora(bits, group)
    before = {k: v.clone() for k, v in model.state_dict().items() if not is_lora_key(k)}
    assert not [k for k in before if k.endswith(".weight") and ".attn." in k]  # no float copy of the base
    train(model)
    for name, p in model.named_parameters():  # the last step's gradients are still there
        assert (p.grad is not None) == ("lora_" in name), name  # adapters alone get them
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert all(layer.lora_B.abs().sum() > 0 for layer in lora_layers(model))
    # the merged export dequantizes once: a plain float model computing what the adapted one does
    idx = torch.randint(0, 37, (2, 12))
    sd = merged_state_dict(model)
    plain = GPT(dataclasses.replace(model.config, lora_rank=0)).eval()
    plain.load_state_dict(sd)
    torch.testing.assert_close(plain.logits(plain(idx)), model.logits(model(idx)), rtol=1e-4, atol=1e-4)
    common.save_weights(str(tmp_path / "merged.pt"), MASTER, model)
    merged = common.load_checkpoint(str(tmp_path / "merged.pt"))
    assert merged["quantization"] is None and merged["model_args"]["lora_rank"] == 0
    # a resume checkpoint keeps the quantized base and the adapters: the same model back
    ckpt = {"model": model.state_dict(), "model_args": asdict(model.config), "quantization": model.quantization}
    again = common.model_from_checkpoint(ckpt, "ckpt.pt").eval()
    assert torch.equal(again.logits(again(idx)), model.logits(model(idx)))
    # the reference policy of the RL stages: adapters off is the quantized base alone
    with adapters_off(model):
        off = model.logits(model(idx))
    _, fresh = qlora(bits, group)
    assert torch.equal(off, fresh.eval().logits(fresh(idx)))


# -----------------------------------------------------------------------------
# refusals


def test_refused_settings_say_why():
    model = GPT(tiny())
    with pytest.raises(ValueError, match="bits=3"):
        quantize.quantize(model, 3)
    with pytest.raises(ValueError, match="group_size=48"):
        quantize.quantize(model, 4, 48)
    with pytest.raises(ValueError, match="group_size=64 does not divide the input width 32 of h.0.attn.c_q"):
        quantize.quantize(model, 4, 64)
    with pytest.raises(ValueError, match="group_size=32: int8 has one scale per output row"):
        quantize.quantize(model, 8, 32)
    with pytest.raises(ValueError, match="quantize must be none | int8 | int4, got 'int3'"):
        quantize.quantize_model(model, "int3")
    with pytest.raises(ValueError, match="quantize=int4 .quant_group_size=64.: quantize: group_size=64 does not divide"):
        quantize.quantize_model(model, "int4", 64)
    with pytest.raises(ValueError, match="trains only with adapters"):
        quantize.quantize_model(GPT(tiny()), "int8", trains=True)
    quantize.quantize(model, 8)
    with pytest.raises(ValueError, match="already int8"):
        quantize.quantize(model, 4, 32)
    lora = GPT(tiny(lora_rank=2))
    merge_lora(lora)
    with pytest.raises(ValueError, match="merged into the weights"):
        quantize.quantize(lora, 8)
    unmerge_lora(lora)
    quantize.quantize(lora, 8)
    with pytest.raises(ValueError, match="merge_lora: the base weights are int8"):
        merge_lora(lora)


# -----------------------------------------------------------------------------
# scripts and bench sections


def test_sample_quantizes_at_load_and_exports_a_quantized_checkpoint(tmp_path, one_quant_path):
    cfg = tiny(vocab_size=320, block_size=64, n_embd=64, n_head=2)
    model, tok = save_byte_checkpoint(str(tmp_path / "ckpt.pt"), cfg)
    prompt = "hello "
    ids = torch.tensor([tok.encode(prompt)])
    args = ["sample.py", f"--out_dir={tmp_path}", f"--start={prompt}", "--num_samples=1", "--max_new_tokens=30",
            "--temperature=0", "--device=cpu", "--dtype=float32", "--quantize=int4", "--quant_group_size=32"]
    res = run_forked(*args)
    quantized = GPT(cfg)
    quantized.load_state_dict(model.state_dict())
    quantize.quantize(quantized, 4, 32)
    expected = tok.decode_bytes(quantized.generate(ids, 30, temperature=0)[0].tolist()).decode("utf-8", errors="replace")
    assert res.stdout.startswith(expected) and "int4 weights in groups of 32" in res.stderr
    out = str(tmp_path / "int4.pt")
    run_forked(*args, f"--export_quantized={out}")
    assert os.path.getsize(out) < 0.5 * os.path.getsize(tmp_path / "ckpt.pt")
    again = run_forked("sample.py", f"--init_from={out}", f"--start={prompt}", "--num_samples=1", "--max_new_tokens=30",
                       "--temperature=0", "--device=cpu", "--dtype=float32")
    assert again.stdout == res.stdout
    res = run_forked("sample.py", f"--init_from={out}", "--quantize=int8", "--device=cpu", check=False)
    assert res.returncode == 1 and "stored as int4" in res.stderr and "Traceback" not in res.stderr


def test_train_eval_only_and_qlora_fine_tune(byte_dataset, tmp_path):
    base = str(tmp_path / "base")
    run_forked("train.py", *TINY, f"--dataset={byte_dataset}", "--max_iters=4", f"--out_dir={base}")
    losses = {}
    for q in ("none", "int8", "int4"):
        out = str(tmp_path / f"eval-{q}")
        run_forked("train.py", *TINY, f"--dataset={byte_dataset}", f"--init_from={base}/ckpt.pt", "--eval_only=True",
                   f"--quantize={q}", "--quant_group_size=32", f"--out_dir={out}")
        losses[q] = read_log(out)[-1]["val_loss"]
    assert losses["none"] != losses["int8"] and abs(losses["int8"] - losses["none"]) < 0.01
    assert abs(losses["int4"] - losses["none"]) < 0.1
    res = run_forked("train.py", *TINY, f"--dataset={byte_dataset}", f"--init_from={base}/ckpt.pt",
                     "--quantize=int8", "--max_iters=1", f"--out_dir={tmp_path / 'no'}", check=False)
    assert res.returncode == 1 and "trains only with adapters" in res.stderr
    qlora_dir = str(tmp_path / "qlora")
    run_forked("train.py", *TINY, f"--dataset={byte_dataset}", f"--init_from={base}/ckpt.pt", "--quantize=int4",
               "--quant_group_size=32", "--lora_rank=4", "--lora_targets=attn", "--learning_rate=1e-2",
               "--max_iters=4", "--eval_interval=2", "--grad_checkpointing=True", f"--out_dir={qlora_dir}")
    ckpt = common.load_checkpoint(os.path.join(qlora_dir, "ckpt.pt"))
    assert ckpt["quantization"]["bits"] == 4 and ckpt["quantization"]["group_size"] == 32
    best = common.load_checkpoint(os.path.join(qlora_dir, "best.pt"))
    assert best["quantization"] is None and best["model_args"]["lora_rank"] == 0  # merged, dequantized
    run_forked("train.py", *TINY, f"--dataset={byte_dataset}", "--init_from=resume", "--max_iters=6",
               "--eval_interval=2", f"--out_dir={qlora_dir}")
    resumed = common.load_checkpoint(os.path.join(qlora_dir, "ckpt.pt"))
    assert resumed["iter_num"] == 6
    for k, v in ckpt["model"].items():
        if not is_lora_key(k):
            assert torch.equal(v, resumed["model"][k]), k


def test_sft_qlora_and_a_quantized_eval(sft_setup):  # noqa: F811  (the fixture imported above)
    base, data, tmp = sft_setup
    out = str(tmp / "qlora")
    res = sft(base, data, out, "--max_iters=4", "--eval_interval=2", "--lora_rank=4", "--lora_targets=attn,mlp",
              "--quantize=int8", "--grad_checkpointing=True")
    assert "saved" in res.stdout and "merged.pt" in res.stdout
    merged = common.load_checkpoint(os.path.join(out, "merged.pt"))
    assert merged["quantization"] is None and not any(k.endswith(".q") for k in merged["model"])
    lora = torch.load(os.path.join(out, "lora.pt"), weights_only=True)  # adapters, no model
    assert lora["quantization"]["bits"] == 8
    res = sft(os.path.join(out, "merged.pt"), data, str(tmp / "eval-int8"), "--eval_only=True", "--quantize=int8")
    assert "answers iter=0" in res.stdout


def test_bench_quant_and_qlora_memory_sections(tmp_path):
    out = tmp_path / "bench.json"
    run_forked("bench.py", "--sections=quant,qlora_memory", "--quant_shapes=1x2x32:65,2x2x64:65",
               "--quant_new_tokens=6", "--quant_group_size=32", "--memory_shape=1x2x32:65", "--memory_batch=2",
               "--memory_block=16", "--memory_steps=1", "--repeats=1", "--block_size=64", "--device=cpu",
               f"--json={out}")
    res = json.loads(out.read_text())
    rows = res["quant"]
    assert [(r["shape"], r["precision"]) for r in rows] == [
        (s, p) for s in ("1x2x32:65", "2x2x64:65") for p in ("fp32", "bf16", "int8", "int4", "int8+head", "int4+head")]
    assert all(r["tok_s"] > 0 for r in rows)
    by = {(r["shape"], r["precision"]): sum(r["kernels"].values()) for r in rows}
    for s in ("1x2x32:65", "2x2x64:65"):  # +head: the LM head's matmul is quantized too
        assert by[s, "int8+head"] == by[s, "int8"] + 1 and by[s, "int4+head"] == by[s, "int4"] + 1
    int4 = [r for r in rows if r["precision"] == "int4"]
    assert all(set(r["kernels"]) <= {"torch._weight_int4pack_mm_for_cpu", "dequantize"} for r in int4)
    assert all(r["kernels"] for r in int4) and all(not r["kernels"] for r in rows if r["precision"] == "fp32")
    mem = res["qlora_memory"]
    assert [r["variant"] for r in mem] == ["full", "lora", "lora-int8", "lora-int4"]
    assert all(r["peak_mb"] > 0 and r["trainable"] > 0 for r in mem)
    assert mem[0]["trainable"] > mem[1]["trainable"] == mem[2]["trainable"] == mem[3]["trainable"]
