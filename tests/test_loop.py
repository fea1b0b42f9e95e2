"""common.Loop, the frame every stage's training loop runs in: rates over all processes, when it
evaluates and saves, what it keeps for an exact resume, when it polls for Ctrl-C; and checkpoints
that survive a power loss."""

import json
import os

import pytest
import torch

import autotune
import common
import posttrain


class FakeDDP:
    """world_size processes that all hold the same numbers (so a mean over them is the number)."""

    def __init__(self, world_size=1):
        self.enabled, self.world_size, self.rank, self.master = world_size > 1, world_size, 0, True
        self.device, self.device_type = "cpu", "cpu"
        self.polls = 0

    def all_reduce_mean(self, x):
        return x

    def any(self, flag):
        self.polls += 1
        return flag

    def check_in_sync(self, model):
        pass

    def close(self):
        pass


def loop_config(tmp_path, **settings):
    return dict(dict(out_dir=str(tmp_path), max_iters=10, eval_interval=5, log_interval=2, eval_only=False,
                     always_save_checkpoint=True, learning_rate=1e-3, warmup_iters=0, lr_decay_iters=10, min_lr=1e-4,
                     decay_lr=True, wandb_log=False, wandb_project="", wandb_run_name=""), **settings)


def make_loop(tmp_path, ddp, state=None, **settings):
    config = loop_config(tmp_path, **settings)
    saved = []
    loop = common.Loop(config, ddp, state, lambda: saved.append(("ckpt", loop.iter_num)),
                       lambda: saved.append(("best", loop.iter_num)))
    return loop, saved


def log_rows(tmp_path):
    with open(tmp_path / "log.jsonl") as f:
        return [json.loads(line) for line in f]


def test_rates_count_every_process_and_every_device(tmp_path, monkeypatch):
    # 2 processes, each doing 100 tokens and 1e9 FLOPs per iteration at 1 s per iteration, on
    # devices of 1e9 FLOP/s: 200 tokens/s in all and an MFU of exactly 1 (it used to read 2)
    monkeypatch.setattr(common, "peak_flops", lambda device_type: 1e9)
    now = [0.0]
    monkeypatch.setattr(common.time, "time", lambda: now[0])
    loop, _ = make_loop(tmp_path, FakeDDP(world_size=2))
    for _ in range(2):
        now[0] += 1.0
        loop.step_done(torch.tensor(3.0), tokens=100, flops=1e9)
    row = log_rows(tmp_path)[-1]
    assert row["iter"] == 2 and row["loss"] == 3.0
    assert row["tok_s"] == 200 and row["mfu"] == pytest.approx(1.0)
    assert common.step_rates(100, 1e9, 1.0, 1, 1e9) == {"tok_s": 100, "mfu": 1.0}


def test_ctrl_c_is_polled_every_iteration_alone_and_every_log_interval_under_ddp(tmp_path):
    alone, ddp = FakeDDP(1), FakeDDP(2)
    for d in (alone, ddp):
        loop, _ = make_loop(tmp_path, d, log_interval=4)
        for _ in range(8):
            loop.step_done(torch.tensor(1.0))
    assert alone.polls == 8 and ddp.polls == 2  # polling under DDP is an all-reduce and a host sync


def run_to_the_end(loop, metric):
    """Drive loop as a stage does, evaluating metric(iter_num) whenever an eval is due. -> the
    iterations evaluated."""
    evals = []
    while True:
        if loop.eval_due():
            evals.append(loop.iter_num)
            loop.evaluated(metric(loop.iter_num))
        if loop.done():
            return evals
        loop.step_done(torch.tensor(1.0))


def test_eval_cadence_and_saves(tmp_path):
    loop, saved = make_loop(tmp_path, FakeDDP())
    assert run_to_the_end(loop, lambda it: 10.0 - it) == [0, 5, 10]  # improves every time
    # at iteration 0 only best.pt (the start, the best so far), no ckpt.pt
    assert saved == [("best", 0), ("ckpt", 5), ("best", 5), ("ckpt", 10), ("best", 10)]


def test_the_early_stop_holds_the_dev_peak_of_a_hand_made_over_optimised_run(tmp_path):
    # dev error of an RL run against a learned reward: better until iteration 50, then hacked
    # (README, "Reward modelling"): best.pt is written at 0, 25 and 50 only and holds 50
    loop, saved = make_loop(tmp_path, FakeDDP(), max_iters=100, eval_interval=25, always_save_checkpoint=False)
    err = {0: 0.50, 25: 0.34, 50: 0.285, 75: 0.55, 100: 0.795}
    assert run_to_the_end(loop, err.get) == [0, 25, 50, 75, 100]
    assert [s for s in saved if s[0] == "best"] == [("best", 0), ("best", 25), ("best", 50)]
    assert loop.best_iter == 50 and loop.best_metric == 0.285
    # a run that only got worse keeps its start as best.pt: what the test split and sample.py read
    worse, saved = make_loop(tmp_path / "w", FakeDDP(), max_iters=100, eval_interval=25, always_save_checkpoint=False)
    run_to_the_end(worse, lambda it: 0.5 + it / 100)
    assert worse.best_iter == 0 and saved == [("best", 0), ("ckpt", 100)]


def test_a_checkpoint_off_an_eval_resumes_with_that_eval(tmp_path):
    # Ctrl-C after iteration 5 saves with iter_num 5 but the eval of 5 not done: the resumed run
    # must do it (it used to skip it, so the best metric, best.pt and the log diverged)
    loop, _ = make_loop(tmp_path, FakeDDP())
    loop.evaluated(3.0)  # at 0
    for _ in range(5):
        loop.step_done(torch.tensor(2.0))
    state = loop.state()
    assert state["iter_num"] == 5 and state["last_eval_iter"] == 0
    resumed, _ = make_loop(tmp_path, FakeDDP(), state=state)
    assert resumed.eval_due() and resumed.best_metric == 3.0
    # a checkpoint written at an eval resumes without repeating it
    resumed.evaluated(2.5)
    again, _ = make_loop(tmp_path, FakeDDP(), state=resumed.state())
    assert not again.eval_due()
    # checkpoints written before best_metric held err_rl too called it best_val_loss
    old, _ = make_loop(tmp_path, FakeDDP(), state={"iter_num": 5, "best_val_loss": 1.0, "last_eval_iter": 5})
    assert not old.eval_due() and old.best_metric == 1.0


def test_the_loss_since_the_last_line_survives_a_resume(tmp_path):
    straight, _ = make_loop(tmp_path / "a", FakeDDP(), log_interval=4)
    for loss in (1.0, 2.0, 3.0, 6.0):
        straight.step_done(torch.tensor(loss))
    split, _ = make_loop(tmp_path / "b", FakeDDP(), log_interval=4)
    for loss in (1.0, 2.0, 3.0):
        split.step_done(torch.tensor(loss))
    resumed, _ = make_loop(tmp_path / "b", FakeDDP(), state=split.state(), log_interval=4)
    resumed.step_done(torch.tensor(6.0))
    assert log_rows(tmp_path / "a")[-1]["loss"] == log_rows(tmp_path / "b")[-1]["loss"] == 3.0


def test_a_nonfinite_loss_stops(tmp_path):
    loop, saved = make_loop(tmp_path, FakeDDP(), log_interval=1)
    assert loop.step_done(torch.tensor(float("nan"))) and loop.nonfinite and saved == []
    with pytest.raises(SystemExit):
        loop.close(None)


def test_checkpoints_are_flushed_to_disk_before_and_after_the_rename(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append(("replace", b)), real_replace(a, b)))
    path = str(tmp_path / "ckpt.pt")
    common.save_checkpoint({"model": {}, "model_args": {}}, path)
    assert calls == [("fsync", path + ".tmp"), ("replace", path), ("fsync", str(tmp_path))]
    assert common.load_checkpoint(path) == {"model": {}, "model_args": {}}


def test_dtype_auto_on_a_cpu_is_float32_without_bf16_instructions(monkeypatch):
    monkeypatch.setattr(common, "cpu_has_bf16", lambda: False)
    assert common.pick_dtype("auto", "cpu") == "float32"
    monkeypatch.setattr(common, "cpu_has_bf16", lambda: True)
    assert common.pick_dtype("auto", "cpu") == "auto"  # settled by measuring the model
    assert common.pick_dtype("bfloat16", "cpu") == "bfloat16"
    with pytest.raises(ValueError, match="float16 needs CUDA"):
        common.pick_dtype("float16", "cpu")


@pytest.mark.parametrize("bf16_seconds, finite, expected", [(0.001, True, "bfloat16"), (0.02, True, "float32"),
                                                            (0.001, False, "float32"), (0.009, True, "float32")])
def test_the_measured_dtype_choice(monkeypatch, bf16_seconds, finite, expected):
    # bf16 is taken only when at least 1.2x faster and its output finite (float32 takes 0.01 s here)
    now = [0.0]
    monkeypatch.setattr(autotune.time, "perf_counter", lambda: now[0])

    def step(dtype):
        now[0] += 0.01 if dtype == "float32" else bf16_seconds
        return torch.tensor(1.0 if finite or dtype == "float32" else float("nan"))

    dtype, times = autotune.choose_cpu_dtype(step)
    assert dtype == expected and times["float32"] == pytest.approx(0.01)


def test_autocast_context_follows_its_dtype_once_settled():
    ctx = common.Autocast("cpu", "auto")
    x = torch.ones(2, 2)
    with ctx:
        assert (x @ x).dtype == torch.float32  # unsettled: no autocast
    ctx.dtype = "bfloat16"
    with ctx:
        with ctx:  # nested uses stack
            assert (x @ x).dtype == torch.bfloat16
        assert (x @ x).dtype == torch.bfloat16
    assert (x @ x).dtype == torch.float32


def test_a_scalar_head_may_learn_at_its_own_rate():
    from model import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=40, block_size=8, n_layer=1, n_head=2, n_embd=16, scalar_head=True))
    opt = model.configure_optimizers(0.1, 1e-4, (0.9, 0.99), "cpu", head_lr_scale=30.0)
    head = {id(p) for p in model.score_head.parameters()}
    common.set_lr(opt, 2e-5)  # the schedule's rate: the head's group gets 30 times it
    for group in opt.param_groups:
        ids = {id(p) for p in group["params"]}
        assert group["lr"] == pytest.approx(6e-4 if ids == head else 2e-5) and (not ids & head or ids == head)
    assert sum(len(g["params"]) for g in opt.param_groups) == len([p for p in model.parameters() if p.requires_grad])
    plain = model.configure_optimizers(0.1, 1e-4, (0.9, 0.99), "cpu")
    assert len(plain.param_groups) == 2  # no scale: the head is with the rest


def test_cell_stream_visits_the_cells_evenly_and_resumes_exactly():
    # 12 rows of one cell, 3 of another, 1 of a third: uniform draws each cell as often, and within a
    # cell its rows a fresh shuffle per epoch of that cell; a batch depends only on (seed, iteration)
    cells = ["a"] * 12 + ["b"] * 3 + ["c"]
    stream = posttrain.EpochStream(len(cells), 0, 6, 1, FakeDDP(), cells=cells)
    seen = [i for it in range(12) for i in stream.indices(it, 0)]  # 72 draws
    assert [sum(cells[i] == c for i in seen) for c in "abc"] == [24, 24, 24]
    assert sorted(seen[0:36:3]) == list(range(12))  # cell a: its first epoch is a permutation of its rows
    again = posttrain.EpochStream(len(cells), 0, 6, 1, FakeDDP(), cells=cells)
    assert again.indices(7, 0) == stream.indices(7, 0)  # no state: a resumed run draws the same batch
    rows = posttrain.EpochStream(len(cells), 0, 6, 1, FakeDDP())  # rows: in proportion to the rows
    assert sum(cells[i] == "a" for it in range(12) for i in rows.indices(it, 0)) == 54


def test_length_pieces_cut_a_batch_sorted_by_length():
    lengths = {10: 9, 11: 3, 12: 7, 13: 1, 14: 5, 15: 3, 16: 8}
    pieces = posttrain.length_pieces(list(lengths), lengths.get, 3)
    assert pieces == [[13, 11, 15], [14, 12], [16, 10]]  # 7 rows in 3 pieces of 3, 2, 2; ties keep their order
    assert posttrain.length_pieces([11, 13], lengths.get, 4) == [[13], [11]]  # fewer rows than pieces
    assert posttrain.length_pieces([11, 13, 10], lengths.get, 1) == [[13, 11, 10]]
    # padded positions: one batch padded to its longest (9) against each piece to its own
    padded = lambda ps: sum(len(p) * max(lengths[i] for i in p) for p in ps)  # noqa: E731
    assert padded([list(lengths)]) == 63 and padded(pieces) == 9 + 14 + 18


def test_minibatches_are_a_fresh_partition_on_every_pass():
    steps = posttrain.minibatches(12, 3, 2, 1337, 0, 5, "cpu")  # 2 passes of 3 minibatches
    a, b = steps[:3], steps[3:]
    assert len(steps) == 6
    assert sorted(torch.cat(a).tolist()) == list(range(12)) == sorted(torch.cat(b).tolist())
    assert [len(m) for m in a] == [4, 4, 4] and [set(m.tolist()) for m in a] != [set(m.tolist()) for m in b]
    assert all(torch.equal(x, y) for x, y in zip(steps, posttrain.minibatches(12, 3, 2, 1337, 0, 5, "cpu")))
    one = posttrain.minibatches(12, 1, 2, 1337, 0, 5, "cpu")  # one minibatch: every row in order, each pass
    assert len(one) == 2 and all(torch.equal(m, torch.arange(12)) for m in one)


def test_the_mean_over_cells_and_its_standard_error_by_hand():
    stats = {"em/add/3": 0.9, "n/add/3": 400, "em/sub/3": 0.5, "n/sub/3": 100, "em/copy/1": 1.0, "n/copy/1": 50}
    mean, se = posttrain.cells_mean(stats, ("add/3", "sub/3"))
    # sqrt(0.9 * 0.1 / 400 + 0.5 * 0.5 / 100) / 2 = sqrt(0.000225 + 0.0025) / 2
    assert mean == pytest.approx(0.7) and se == pytest.approx(0.0261008, abs=1e-6)
    assert posttrain.cells_mean(stats)[0] == pytest.approx(0.8)  # no cells named: every cell measured


def test_a_stage_without_a_setting_its_loop_needs_is_refused_at_the_start(tmp_path):
    config = {k: v for k, v in loop_config(tmp_path).items() if k not in ("decay_lr", "wandb_log")}
    with pytest.raises(ValueError, match="no setting decay_lr, wandb_log"):
        common.Loop(config, FakeDDP(), None, None, None)


def test_a_list_goes_to_the_log_file_and_wandb_not_to_the_printed_line(tmp_path, capsys):
    # a MoE model's load per layer and expert: 32 numbers for 4 layers of 8 experts, too many for a line
    loop, _ = make_loop(tmp_path, FakeDDP(), log_interval=1)
    loop.step_done(torch.tensor(2.0), load_cv=torch.tensor(0.25), load=[[0.75, 0.25], [0.5, 0.5]])
    row = log_rows(tmp_path)[-1]
    assert row["load_cv"] == 0.25 and row["load"] == [[0.75, 0.25], [0.5, 0.5]]
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("iter=1 loss=2.0000 load_cv=0.2500 ms=") and "load=" not in line.replace("load_cv=", "")
    assert common._spread("load", row["load"]) == [("load/0/0", 0.75), ("load/0/1", 0.25), ("load/1/0", 0.5),
                                                   ("load/1/1", 0.5)]
    assert common._spread("loss", 2.0) == [("loss", 2.0)]
