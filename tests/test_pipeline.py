"""pipeline.sh with tiny settings: every stage and the report in a temporary folder; a second run
skips what is done; a stage that fails stops the pipeline with its name, and the rest is kept."""

import os
import subprocess

import pytest

from conftest import ROOT

STAGES = "data pretrain sft pairs reward grpo ppo dpo sft_cot grpo_cot report"


def pipeline(out, byte_dataset, stages=STAGES, **env):
    full_env = dict(os.environ, OUT=str(out), TINY="1", DATASET=byte_dataset, STAGES=stages, OMP_NUM_THREADS="1",
                    PYTHONUNBUFFERED="1", **env)
    return subprocess.run(["bash", "pipeline.sh"], cwd=ROOT, capture_output=True, text=True, env=full_env, timeout=900)


@pytest.mark.slow  # ten stages, each a fresh interpreter: about 35 s of one core alone
def test_every_stage_runs_and_a_second_run_skips_them(byte_dataset, tmp_path):
    out = tmp_path / "run"
    res = pipeline(out, byte_dataset, DTYPE="float32")  # every stage takes the dtype
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "dtype float32" in (out / "out-pipeline" / "sft.log").read_text()
    n = len(STAGES.split())
    for k, stage in enumerate(STAGES.split(), 1):
        assert f"[{k}/{n}] {stage}: done in" in res.stdout, stage
        assert (out / "out-pipeline" / f"{stage}.done").is_file()
    report = (out / "report.md").read_text()
    assert "| task/difficulty |" in report and "| **total** |" in report
    for folder in ("out-shakespeare", "out-sft", "out-reward", "out-grpo", "out-ppo", "out-dpo", "out-sft-cot",
                   "out-grpo-cot"):
        assert (out / folder / "ckpt.pt").is_file(), folder
    again = pipeline(out, byte_dataset, stages="pretrain sft")
    assert again.returncode == 0 and "[1/2] pretrain: done already" in again.stdout and "[2/2] sft: done already" in again.stdout


def test_a_failing_stage_stops_the_pipeline_with_its_name(byte_dataset, tmp_path):
    out = tmp_path / "run"
    res = pipeline(out, byte_dataset, stages="data sft report")  # sft without a pretrained model
    assert res.returncode == 1 and "stage 'sft' failed" in res.stderr and "out-pipeline/sft.log" in res.stderr
    assert "[1/3] data: done in" in res.stdout and "report" not in res.stdout.split("sft")[-1]
    # after each stage, the time so far and the rest projected from this machine's pace
    assert "s to go (projected total" in res.stdout.split("[1/3] data: done in")[1].splitlines()[0]
    assert (out / "tasks" / "train.jsonl").is_file()  # what the data stage made is kept
    res = pipeline(out, byte_dataset, stages="nonsense")
    assert res.returncode == 2 and "unknown stage 'nonsense'" in res.stderr
