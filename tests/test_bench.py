"""bench.py runs every section on a tiny model and writes the JSON the issue asks for."""

import json

from conftest import run_script


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
