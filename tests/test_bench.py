"""bench.py runs every section on a tiny model and writes the JSON the issue asks for."""

import json

import pytest

from conftest import run_forked, run_script


def test_bench_smoke(tmp_path):
    # on a MoE model (4 experts, top-2): decode with and without the cache, and train beside dense
    out = tmp_path / "bench.json"
    res = run_script("bench.py", "--decode_lengths=8,24", "--rolling_multiples=1,4", "--rolling_window=8",
                     "--batch_sizes=1,3", "--batch_new_tokens=4", "--train_batch=2", "--train_block=16",
                     "--prefill_len=32", "--repeats=1", "--n_layer=1", "--n_embd=32", "--n_head=2",
                     "--block_size=64", "--n_expert=4", f"--json={out}", "--device=cpu")
    assert "(4 experts, top-2:" in res.stdout
    res = json.loads(out.read_text())
    assert [r["n"] for r in res["decode"]] == [8, 24]
    assert all(r["same_tokens"] is True and r["speedup"] > 0 for r in res["decode"])
    assert len({r["kv_bytes"] for r in res["rolling"]}) == 1  # flat however long it generates
    assert [r["batch"] for r in res["batch"]] == [1, 3]
    train = {r["variant"]: r for r in res["train"]}
    assert set(train) == {"dense", "moe 4x top-2", "lora r8 q,v"} and all(r["tok_s"] > 0 for r in train.values())
    assert train["moe 4x top-2"]["params"] > train["moe 4x top-2"]["active"] == train["dense"]["active"] + 4 * 32
    assert res["prefill"][0]["n"] == 32
    assert set(res["machine"]) == {"cpu", "torch", "threads", "load"}


def test_bench_hf_and_grpo_sections(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "bench.json"
    res = run_forked("bench.py", "--sections=hf,grpo,ppo", "--hf_lengths=8", "--repeats=1", "--n_layer=1", "--n_embd=32",
                     "--n_head=2", "--block_size=64", "--grpo_prompts=2", "--grpo_group=2", "--grpo_iters=2",
                     f"--json={out}", "--device=cpu", "--threads=1")
    data = json.loads(out.read_text())
    assert data["hf"][0]["n"] == 8 and data["hf"][0]["ratio"] > 0 and data["hf"][0]["hf_tok_s"] > 0
    g = data["grpo"][0]
    assert g["rows"] == 4 and g["gen_s"] > 0 and g["update_s"] > 0 and g["batched_decode_tok_s"] > 0
    assert "grpo     rows=4" in res.stdout and "ppo      rows=4" in res.stdout and data["ppo"][0]["update_s"] > 0


def test_bench_hf_is_skipped_without_transformers(tmp_path):
    # a site directory that hides transformers: the section says why and the rest still runs
    fake = tmp_path / "site"
    fake.mkdir()
    (fake / "transformers.py").write_text("raise ImportError('hidden for the test')\n")
    res = run_script("bench.py", "--sections=hf", "--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=64",
                     "--device=cpu", env={"PYTHONPATH": str(fake)})
    assert "hf       skipped: transformers is not installed" in res.stdout


def test_bench_rl_vs_trl_times_both_sides_by_phase(tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "bench.json"
    res = run_script("bench.py", "--sections=rl_vs_trl", "--n_layer=1", "--n_embd=32", "--n_head=2", "--pos_emb=rope",
                     "--norm=rmsnorm", "--mlp=swiglu", "--grpo_prompts=2", "--grpo_group=2", "--grpo_iters=2",
                     "--rl_rounds=1", f"--json={out}", "--device=cpu", "--threads=1")
    rows = {r["phase"]: r for r in json.loads(out.read_text())["rl_vs_trl"]}
    assert set(rows) == {"generation", "reward", "reference", "optimizer", "rest", "iteration"}
    assert all(rows[p]["ours_s"] > 0 and rows[p]["trl_s"] > 0 for p in ("generation", "reference", "iteration"))
    assert "with TRL's tokenizer: the same" in res.stdout  # both sides score the same prompt tokens
    assert "1 iterations of ours, 1 of TRL's" in res.stdout


def test_bench_rl_vs_trl_is_skipped_without_trl(tmp_path):
    fake = tmp_path / "site"
    fake.mkdir()
    (fake / "trl.py").write_text("raise ImportError('hidden for the test')\n")
    res = run_script("bench.py", "--sections=rl_vs_trl", "--n_layer=1", "--n_embd=32", "--n_head=2",
                     "--block_size=64", "--device=cpu", env={"PYTHONPATH": str(fake)})
    assert "rl_vs_trl skipped: trl is not installed" in res.stdout
