"""report.py on hand-made logs: the table it writes, the stages it leaves out, the pictures."""

import importlib.util
import json
import os

import pytest

from conftest import run_forked, run_script


def write_log(folder, rows):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "log.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


@pytest.fixture
def logs(tmp_path):
    write_log(tmp_path / "pre", [{"iter": 10, "loss": 2.0}, {"iter": 20, "loss": 1.5}])
    write_log(tmp_path / "sft", [
        {"iter": 0, "em": 0.0, "score": 0.0, "em/add/1": 0.0, "em/add/3": 0.0, "em/sub/2": 0.0, "s": 12.0},
        {"iter": 10, "loss": 0.5},
        {"iter": 20, "val_loss": 0.4, "s": 3.5},
        {"iter": 20, "em": 0.5, "score": 0.7, "em/add/1": 1.0, "em/add/3": 0.25, "em/sub/2": 0.5}])
    write_log(tmp_path / "grpo", [
        {"iter": 0, "em": 0.5, "em/add/1": 1.0, "em/add/3": 0.25, "em/sub/2": 0.5, "err_rl": 0.625},
        {"iter": 1, "loss": 0.0, "reward": 0.4, "kl": 0.001},
        {"iter": 2, "loss": 0.0, "reward": 0.6, "kl": 0.003},
        {"iter": 2, "em": 0.75, "em/add/1": 1.0, "em/add/3": 0.75, "em/sub/2": 0.5, "err_rl": 0.375}])
    write_log(tmp_path / "rm", [{"iter": 0, "val_loss": 0.7, "acc": 0.5}, {"iter": 5, "val_loss": 0.2, "acc": 0.95,
                                                                           "spearman": 0.81}])
    os.makedirs(tmp_path / "pipe")
    with open(tmp_path / "pipe" / "times.json", "w") as f:
        json.dump({"pretrain": 300.0, "sft": 500.0, "grpo": 600.0}, f)
    return tmp_path


def test_the_table_and_the_times(logs):
    out = logs / "report.md"
    run_script("report.py", f"--out={out}", f"--times={logs / 'pipe' / 'times.json'}", f"--pretrain_dir={logs / 'pre'}",
               f"--reward_dir={logs / 'rm'}", "--rl_tasks=add/3,sub/2",
               f"--stages=base={logs / 'sft'}@first,sft={logs / 'sft'},grpo={logs / 'grpo'},ppo={logs / 'nope'}")
    text = out.read_text()
    assert "| task/difficulty | base | sft | grpo |" in text
    assert "| add/1 | 0.00 | 1.00 | 1.00 |" in text
    assert "| add/3 * | 0.00 | 0.25 | 0.75 |" in text  # base is SFT's first eval, the rest their last
    assert "| **RL cells (*)** | **0.00** | **0.38** | **0.62** |" in text  # (0.25 + 0.5) / 2, (0.75 + 0.5) / 2
    assert "Not in the table (no log with an eval): ppo" in text
    assert f"Columns measured where a later stage started: base is the first eval in {logs / 'sft'}." in text
    assert "Reward model (held-out pairs): acc 0.950, spearman 0.810" in text
    assert "grpo: KL to the reference per token at the end 0.0030 (max 0.0030)" in text
    # seconds in evals: the eval rows' s (sft 12 + 3.5; pretrain's log has none)
    assert "| sft | 500 | 16 |" in text and "| pretrain | 300 |  |" in text
    assert "| **total** | **1400** (23.3 min) | 16 |" in text


def test_pictures_when_matplotlib_is_there(logs):
    pytest.importorskip("matplotlib")
    write_log(logs / "pre", [{"iter": 10, "loss": 2.0, "load": [[0.6, 0.4], [0.5, 0.5]]},
                             {"iter": 20, "loss": 1.5, "load": [[0.55, 0.45], [0.5, 0.5]]}])
    out = logs / "report.md"
    run_forked("report.py", f"--out={out}", f"--figures={logs / 'fig'}", f"--pretrain_dir={logs / 'pre'}",
               f"--sft_dirs=sft={logs / 'sft'}", f"--stages=sft={logs / 'sft'},grpo={logs / 'grpo'}")
    assert (logs / "fig" / "loss.png").stat().st_size > 1000 and (logs / "fig" / "rl.png").stat().st_size > 1000
    assert "![loss.png](fig/loss.png)" in out.read_text()
    # a MoE pretraining run: the load of each expert over the iterations
    assert (logs / "fig" / "load_pretrain.png").stat().st_size > 1000 and "![load_pretrain.png]" in out.read_text()


def test_a_test_split_line_gives_standard_errors_and_the_worked_share_is_drawn(logs):
    # grpo's last line is its best checkpoint on the test split: each cell with its standard error, and
    # the RL cells' mean with sqrt(0.02^2 + 0.03^2) / 2 = 0.018
    write_log(logs / "mix", [
        {"iter": 0, "em": 0.5, "em/add/3": 0.25, "em/sub/2": 0.5, "work": 0.1},
        {"iter": 1, "loss": 0.0, "reward": 0.4, "kl": 0.001, "work": 0.2},
        {"iter": 2, "loss": 0.0, "reward": 0.6, "kl": 0.003, "work": 0.6},
        {"iter": 2, "em": 0.75, "em/add/3": 0.75, "em/sub/2": 0.5, "work": 0.9},
        {"iter": 2, "em": 0.7, "em/add/3": 0.75, "se/add/3": 0.02, "em/sub/2": 0.5, "se/sub/2": 0.03,
         "of": "best.pt of iter 2"}])
    out = logs / "report.md"
    run_forked("report.py", f"--out={out}", f"--figures={logs / 'fig'}", "--rl_tasks=add/3,sub/2",
               f"--stages=sft={logs / 'mix'}@first,grpo={logs / 'mix'}")
    text = out.read_text()
    assert "| add/3 * | 0.25 | 0.750 ± 0.020 |" in text
    assert "| **RL cells (*)** | **0.38** | **0.625 ± 0.018** |" in text
    if importlib.util.find_spec("matplotlib"):
        assert (logs / "fig" / "rl.png").stat().st_size > 1000


def test_without_matplotlib_it_says_how_to_get_the_pictures(logs):
    fake = logs / "site"
    fake.mkdir()
    (fake / "matplotlib.py").write_text("raise ImportError('hidden for the test')\n")
    out = logs / "report.md"
    run_script("report.py", f"--out={out}", f"--stages=sft={logs / 'sft'}", env={"PYTHONPATH": str(fake)})
    assert "pip install matplotlib" in out.read_text()


def test_pretraining_runs_compared_at_equal_iterations_and_equal_wall_clock(tmp_path):
    # dense: 100 ms an iteration, so iterations 10 and 20 end at 1 s and 2 s; moe: 150 ms, at 1.5 s
    # and 3 s. At 2 s, when dense ended, moe is a third of the way from its eval at 10 (1.8) to the
    # one at 20 (1.2): 1.6, at iteration 13.3
    from dataclasses import asdict

    import common
    from model import GPT, GPTConfig

    load = [[0.5, 0.25, 0.25, 0.0]]
    write_log(tmp_path / "dense", [{"iter": 0, "val_loss": 3.0}, {"iter": 10, "loss": 2.5, "ms": 100.0, "tok_s": 900},
                                   {"iter": 10, "val_loss": 2.0}, {"iter": 20, "loss": 2.0, "ms": 100.0, "tok_s": 1000},
                                   {"iter": 20, "val_loss": 1.5}])
    write_log(tmp_path / "moe", [{"iter": 0, "val_loss": 3.0},
                                 {"iter": 10, "loss": 2.4, "ms": 150.0, "tok_s": 600, "load_cv": 0.5, "load": load},
                                 {"iter": 10, "val_loss": 1.8},
                                 {"iter": 20, "loss": 1.9, "ms": 150.0, "tok_s": 700, "load_cv": 0.1, "load": load},
                                 {"iter": 20, "val_loss": 1.2}])
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, n_expert=4, moe_every=2)
    common.save_checkpoint({"model": {}, "model_args": asdict(cfg)}, str(tmp_path / "moe" / "ckpt.pt"))
    model = GPT(cfg)
    out = tmp_path / "moe.md"
    run_script("report.py", "--stages=", f"--compare=dense={tmp_path / 'dense'},moe={tmp_path / 'moe'}", f"--out={out}",
               f"--figures={tmp_path / 'fig'}")
    text = out.read_text()
    assert "# Report" in text and "Held-out" not in text  # no pipeline part
    assert "| dense | ? | ? | 20 | 2 | 100 | 1,000 | 1.5000 | - |" in text  # no checkpoint: sizes unknown
    assert (f"| moe | {model.num_params() / 1e6:.2f}M | {model.num_params(active=True) / 1e6:.2f}M | 20 | 3 | 150 | "
            "700 | 1.2000 | 0.500 / 0.100 |") in text
    assert "| 10 | 2.0000 | 1.8000 |" in text and "| 20 | 1.5000 | 1.2000 |" in text
    assert "equal wall-clock, 2 s (when the first run ended; linear between evals): dense 1.5000 at iteration 20, " \
           "moe 1.6000 at iteration 13." in text
    if importlib.util.find_spec("matplotlib"):  # the load per expert; a dense run has none to draw
        assert (tmp_path / "fig" / "load_moe.png").stat().st_size > 1000 and "![load_moe.png]" in text
        assert not os.path.isfile(tmp_path / "fig" / "load_dense.png")
