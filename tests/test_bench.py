"""bench.py runs every section on a tiny model and writes the JSON the issue asks for."""

import json

import pytest

from conftest import run_forked, run_script


def test_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    run_script("bench.py", "--decode_lengths=8,24", "--rolling_multiples=1,4", "--rolling_window=8",
               "--batch_sizes=1,3", "--batch_new_tokens=4", "--train_batch=2", "--train_block=16",
               "--prefill_len=32", "--repeats=1", "--n_layer=1", "--n_embd=32", "--n_head=2",
               "--block_size=64", f"--json={out}", "--device=cpu")
    res = json.loads(out.read_text())
    assert [r["n"] for r in res["decode"]] == [8, 24]
    assert all(r["same_tokens"] is True and r["speedup"] > 0 for r in res["decode"])
    assert len({r["kv_bytes"] for r in res["rolling"]}) == 1  # flat however long it generates
    assert [r["batch"] for r in res["batch"]] == [1, 3]
    assert res["train"][0]["variant"] == "dense" and res["train"][0]["tok_s"] > 0
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
