"""sample.py: checkpoints of ours and of nanoGPT, streaming, and clear errors."""

import pickle

import torch

from conftest import run_forked, run_script, save_byte_checkpoint
from model import GPT, GPTConfig

# dtype=float32 where the text is compared: on a CPU with bf16 instructions dtype=auto times a bf16
# copy against float32 in every run, and a busy CPU could pick either


def test_samples_our_checkpoint_greedy(tmp_path):
    cfg = GPTConfig(vocab_size=320, block_size=64, n_layer=2, n_head=2, n_embd=32)
    model, tok = save_byte_checkpoint(str(tmp_path / "ckpt.pt"), cfg)
    prompt = "héllo ✓ "
    res = run_script("sample.py", f"--out_dir={tmp_path}", f"--start={prompt}", "--num_samples=1",
                     "--max_new_tokens=40", "--temperature=0", "--device=cpu", "--dtype=float32")
    ids = model.generate(torch.tensor([tok.encode(prompt)]), 40, temperature=0)[0].tolist()
    expected = tok.decode_bytes(ids).decode("utf-8", errors="replace")
    assert res.stdout.startswith(expected)
    assert "tokens/s" in res.stderr


def test_rolling_cache_samples_past_block_size(tmp_path):
    # past block_size the rolling cache must give exactly the text of the full recompute
    cfg = GPTConfig(vocab_size=320, block_size=16, n_layer=1, n_head=2, n_embd=16, sliding_window=8, n_sink=2)
    save_byte_checkpoint(str(tmp_path / "ckpt.pt"), cfg)
    args = ["sample.py", f"--out_dir={tmp_path}", "--num_samples=1", "--max_new_tokens=100", "--device=cpu",
            "--dtype=float32"]
    cached = run_forked(*args)
    full = run_forked(*args, "--use_cache=false")
    assert "100 tokens" in cached.stderr and cached.stdout == full.stdout
    assert len(cached.stdout) > 100


def test_nanogpt_checkpoint_matches_the_same_weights_in_our_model(tmp_path):
    cfg = GPTConfig(vocab_size=20, block_size=32, n_layer=2, n_head=2, n_embd=16, bias=True,
                    pos_emb="learned", norm="layernorm", mlp="gelu", tie_weights=True)
    torch.manual_seed(0)
    ours = GPT(cfg).eval()
    with torch.no_grad():
        ours.lm_head.weight.mul_(30)
    # the same weights in nanoGPT's layout: transformer.* keys, fused c_attn, a causal-mask buffer
    sd = {}
    for k, v in ours.state_dict().items():
        if ".c_k." in k or ".c_v." in k:
            continue
        if ".c_q." in k:
            parts = [ours.state_dict()[k.replace("c_q", n)] for n in ("c_q", "c_k", "c_v")]
            k, v = k.replace("c_q", "c_attn"), torch.cat(parts)
        sd[("" if k.startswith("lm_head") else "_orig_mod.transformer.") + k] = v
    sd["_orig_mod.transformer.h.0.attn.bias"] = torch.tril(torch.ones(32, 32)).view(1, 1, 32, 32)
    model_args = dict(n_layer=2, n_head=2, n_embd=16, block_size=32, bias=True, vocab_size=20, dropout=0.0)
    torch.save({"model": sd, "model_args": model_args, "iter_num": 5, "best_val_loss": torch.tensor(1.5),
                "config": {"dataset": "shakespeare_char"}}, tmp_path / "ckpt.pt")
    chars = sorted(set("abcdefghij klmnop\n:!"))
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 20, "stoi": {c: i for i, c in enumerate(chars)},
                     "itos": {i: c for i, c in enumerate(chars)}}, f)
    res = run_forked("sample.py", f"--init_from={tmp_path / 'ckpt.pt'}", f"--nanogpt_meta={tmp_path / 'meta.pkl'}",
                     "--start=abc", "--num_samples=1", "--max_new_tokens=30", "--temperature=0", "--device=cpu",
                     "--dtype=float32")
    ids = ours.generate(torch.tensor([[chars.index(c) for c in "abc"]]), 30, temperature=0)[0]
    assert res.stdout.startswith("".join(chars[i] for i in ids))
    res = run_forked("sample.py", f"--init_from={tmp_path / 'ckpt.pt'}", f"--nanogpt_meta={tmp_path / 'meta.pkl'}",
                     "--start=xyz", "--device=cpu", check=False)
    assert res.returncode == 1 and "characters the model's vocabulary lacks" in res.stderr


def test_clear_errors(tmp_path):
    res = run_forked("sample.py", f"--out_dir={tmp_path / 'nope'}", check=False)
    assert res.returncode == 1 and "does not exist" in res.stderr and "Traceback" not in res.stderr
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint at all")
    res = run_forked("sample.py", f"--out_dir={tmp_path}", check=False)
    assert res.returncode == 1 and "damaged or not a checkpoint" in res.stderr and "Traceback" not in res.stderr
    save_byte_checkpoint(str(tmp_path / "ckpt.pt"), GPTConfig(vocab_size=320, block_size=16, n_layer=1, n_head=2, n_embd=16))
    res = run_forked("sample.py", f"--out_dir={tmp_path}", "--top_p=2", check=False)
    assert res.returncode == 1 and "top_p" in res.stderr
    res = run_forked("sample.py", f"--out_dir={tmp_path}", "--start=<|endoftext|>", "--max_new_tokens=2",
                     "--num_samples=1", "--device=cpu")
    assert "encoding them as plain text" in res.stderr
    assert res.stdout.startswith("<|endoftext|>")
