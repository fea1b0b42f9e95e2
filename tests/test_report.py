"""report.py on hand-made logs: the table it writes, the stages it leaves out, the pictures."""

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
        {"iter": 0, "em": 0.0, "score": 0.0, "em/add/1": 0.0, "em/add/3": 0.0, "em/sub/2": 0.0},
        {"iter": 10, "loss": 0.5},
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
    assert "| **total** | **1400** (23.3 min) |" in text


def test_pictures_when_matplotlib_is_there(logs):
    pytest.importorskip("matplotlib")
    out = logs / "report.md"
    run_forked("report.py", f"--out={out}", f"--figures={logs / 'fig'}", f"--pretrain_dir={logs / 'pre'}",
               f"--sft_dirs=sft={logs / 'sft'}", f"--stages=sft={logs / 'sft'},grpo={logs / 'grpo'}")
    assert (logs / "fig" / "loss.png").stat().st_size > 1000 and (logs / "fig" / "rl.png").stat().st_size > 1000
    assert "![loss.png](fig/loss.png)" in out.read_text()


def test_without_matplotlib_it_says_how_to_get_the_pictures(logs):
    fake = logs / "site"
    fake.mkdir()
    (fake / "matplotlib.py").write_text("raise ImportError('hidden for the test')\n")
    out = logs / "report.md"
    run_script("report.py", f"--out={out}", f"--stages=sft={logs / 'sft'}", env={"PYTHONPATH": str(fake)})
    assert "pip install matplotlib" in out.read_text()
