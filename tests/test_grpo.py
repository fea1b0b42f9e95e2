"""grpo.py end to end on tiny models: a toy task whose reward GRPO raises in seconds, the logs and
checkpoints, exact resume, two processes, the LoRA reference with adapters off, a reward model as
the reward. The objective's pieces are tested by hand in test_losses.py."""

import os
from dataclasses import asdict

import pytest
import torch

import common
import posttrain
from conftest import read_log, run_forked, run_script
from model import GPT, GPTConfig

# dtype=float32: dtype=auto times float32 against bf16 in every run, and runs compared bit for bit
# could then take different ones on a loaded CPU
TINY = ["--prompts_per_iter=4", "--samples_per_prompt=4", "--max_new_tokens=6", "--log_interval=1", "--warmup_iters=1",
        "--device=cpu", "--compile=false", "--eval_prompts=12", "--pass_k_prompts=4", "--pass_k_samples=4",
        "--eval_max_new_tokens=6", "--learning_rate=1e-3", "--rl_tasks=", "--dtype=float32"]


def grpo(base, data, out, *args, check=True, run=run_forked):
    return run("grpo.py", *TINY, f"--init_from={base}", f"--prompt_dataset={data}", f"--out_dir={out}", *args,
               check=check)


@pytest.fixture
def ab_setup(ab_policy):
    """The a/b policy of conftest and the settings that make its reward rise under GRPO."""
    base, data, tmp = ab_policy
    args = [f"--init_from={base}", f"--prompt_dataset={data}", "--rl_tasks=", "--prompts_per_iter=4", "--samples_per_prompt=8",
            "--max_new_tokens=8", "--mask_truncated=false", "--warmup_iters=1", "--eval_interval=100",
            "--eval_prompts=0", "--pass_k_prompts=0", "--device=cpu", "--compile=false"]
    return base, args, tmp


def test_a_toy_task_where_grpo_raises_the_reward(ab_setup):
    base, args, tmp = ab_setup
    out = str(tmp / "out")
    run_forked("grpo.py", *args, f"--out_dir={out}", "--kl_coef=0", "--learning_rate=1e-2", "--max_iters=12")
    rewards = [r["reward"] for r in read_log(out) if "reward" in r]
    assert len(rewards) == 12
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.15, rewards


def test_grpo_raises_the_share_of_a_rare_but_rewarded_first_token(rare_policy):
    # the policy opens with 'a' one time in ten, and only replies that do are exactly right: the
    # groups with one of them are what GRPO learns from, and the share of a-first replies climbs
    base, data, tmp = rare_policy
    out = str(tmp / "out")
    run_forked("grpo.py", f"--init_from={base}", f"--prompt_dataset={data}", "--rl_tasks=", "--prompts_per_iter=4",
               "--samples_per_prompt=8", "--max_new_tokens=6", "--reward=exact", "--kl_coef=0", "--learning_rate=1e-2",
               "--warmup_iters=1", "--max_iters=6", "--eval_interval=100", "--eval_prompts=0", "--pass_k_prompts=0",
               "--device=cpu", "--compile=false", f"--out_dir={out}")
    em = [r["em"] for r in read_log(out) if "reward" in r]
    assert em[0] < 0.3 and sum(em[-3:]) / 3 > 0.8, em  # the first rollout is the starting policy's


def test_lora_policy_uses_its_base_as_the_reference(ab_setup):
    base, args, tmp = ab_setup
    out = str(tmp / "lora")
    res = run_forked("grpo.py", *args, f"--out_dir={out}", "--max_iters=3", "--lora_rank=4", "--lora_targets=attn",
                     "--learning_rate=1e-2")
    assert "reference: the policy with adapters off" in res.stdout
    steps = [r for r in read_log(out) if "reward" in r]
    assert steps[0]["kl"] == 0.0  # B = 0: the adapted policy is exactly its base
    assert steps[-1]["kl"] > 0.0  # and it moves away from it as the adapters learn
    ckpt = common.load_checkpoint(os.path.join(out, "ckpt.pt"))
    plain = common.load_checkpoint(base)
    assert all(torch.equal(plain["model"][k], ckpt["model"][k]) for k in plain["model"])  # the base is frozen


def test_script_end_to_end(rl_setup):
    base, data, tmp = rl_setup
    out = str(tmp / "out")
    res = grpo(base, data, out, "--max_iters=4", "--eval_interval=2", "--warmup_iters=3", "--decay_lr=false",
               run=run_script)
    assert "prompts: add/1 10, add/2 10, copy/1 10, copy/2 10; dev 12, test 8" in res.stdout and "reference: " + base in res.stdout
    rows = read_log(out)
    steps = [r for r in rows if "reward" in r]
    evals = [r for r in rows if "err_rl" in r]
    assert [r["iter"] for r in steps] == [1, 2, 3, 4] and [r["iter"] for r in evals] == [0, 2, 4]
    assert {"loss", "reward", "reward_std", "reward_score", "em", "kl", "clip", "entropy", "len", "zero_std",
            "truncated", "grad_norm", "gen_s", "score_s", "update_s", "rollout_tok_s"} <= steps[0].keys()
    assert {"em", "score", "em/add/1", "em/copy/2", "pass@1", "pass@4", "err_rl"} <= evals[0].keys()
    assert 0 <= evals[0]["pass@1"] <= evals[0]["pass@4"] <= 1
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the first update starts at the reference
    # warmup happens though decay_lr is off: the rate rises linearly over 3 iterations, then holds
    assert [r["lr"] for r in steps] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3])
    ckpt = common.load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ckpt["stage"] == "grpo" and ckpt["reference"] == base and ckpt["iter_num"] == 4
    assert "=== iter 4" in open(os.path.join(out, "samples.txt")).read()
    # the test split, once, at the end: 2 prompts a cell, with standard errors
    test = [r for r in rows if "of" in r]
    assert len(test) == 1 and test[0]["iter"] == 4 and test[0]["n/add/1"] == 2 and "se/copy/2" in test[0]
    # answered by the weights the dev split chose: best.pt, the start when no eval beat iteration 0's
    best = min(evals, key=lambda r: (r["err_rl"], r["iter"]))["iter"]
    assert test[0]["of"] == f"best.pt of iter {best}"
    assert "test, 8 prompts, " in res.stdout
    res = run_forked("sample.py", f"--out_dir={out}", "--chat=True", "--start=What is 1 + 2?", "--temperature=0",
                     "--max_new_tokens=4", "--device=cpu")
    assert res.returncode == 0


def test_resume_is_bit_identical_with_several_passes_and_minibatches(rl_setup):
    # update_epochs 2 and 2 minibatches: old_logp is recorded at rollout, ratios move off 1
    base, data, tmp = rl_setup
    args = ["--update_epochs=2", "--num_minibatches=2", "--eval_interval=2", "--eval_prompts=0", "--pass_k_prompts=0"]
    straight, split = str(tmp / "straight"), str(tmp / "split")
    grpo(base, data, straight, *args, "--max_iters=4")
    grpo(base, data, split, *args, "--max_iters=2")
    grpo(base, data, split, *args, "--max_iters=4", "--init_from=resume")
    keys = ("iter", "loss", "reward", "kl", "clip")
    rows = lambda d: [tuple(r.get(k) for k in keys) for r in read_log(d) if "reward" in r]  # noqa: E731
    assert rows(straight) == rows(split) and len(rows(straight)) == 4
    a = torch.load(os.path.join(straight, "ckpt.pt"), weights_only=True)
    b = torch.load(os.path.join(split, "ckpt.pt"), weights_only=True)
    assert b["reference"] == base  # the reference stays the starting policy across resumes
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_two_processes_roll_out_their_own_groups_and_stay_in_sync(rl_setup):
    base, data, tmp = rl_setup
    res = run_script("torchrun", "--standalone", "--nproc_per_node=2", "grpo.py", *TINY, f"--init_from={base}",
                     f"--prompt_dataset={data}", f"--out_dir={tmp / 'ddp'}", "--max_iters=2", "--eval_interval=2",
                     "--scale_rewards=batch")  # its std gathers every process's rewards
    assert "parameters identical on all 2 processes" in res.stdout
    assert [r["iter"] for r in read_log(str(tmp / "ddp")) if "reward" in r] == [1, 2]


def test_a_reward_model_as_the_reward(rl_setup):
    base, data, tmp = rl_setup
    ckpt = common.load_checkpoint(base)
    rm_cfg = GPTConfig(**{**ckpt["model_args"], "scalar_head": True})
    torch.manual_seed(1)
    rm = GPT(rm_cfg)
    path = str(tmp / "rm.pt")
    common.save_checkpoint({"model": rm.state_dict(), "model_args": asdict(rm_cfg), "meta": ckpt["meta"],
                            "stage": "reward", "reward_mean": 0.5, "reward_std": 2.0}, path)
    out = str(tmp / "rm-out")
    # as an ensemble of two (the same checkpoint twice: they agree, spread 0)
    grpo(base, data, out, "--max_iters=2", "--eval_interval=2", "--reward=score,model=0.5",
         f"--reward_model={path},{path}", "--reward_ensemble=min")
    steps = [r for r in read_log(out) if "reward" in r]
    assert {"reward_score", "reward_model"} <= steps[0].keys() and steps[0]["reward_model_spread"] == 0
    res = grpo(base, data, str(tmp / "bad"), "--reward=model", f"--reward_model={base}", check=False)
    assert res.returncode != 0 and "is not a reward model" in res.stderr and "Traceback" not in res.stderr


def test_bad_settings_stop_with_a_message(rl_setup):
    base, data, tmp = rl_setup
    for args, message in ((["--loss_type=ppo"], "loss_type grpo | dapo | dr_grpo"),
                          (["--samples_per_prompt=1"], "samples_per_prompt >= 2"),
                          (["--reward=scores"], "unknown reward 'scores'"),
                          (["--rl_tasks=add/9"], "no prompts for the cells ['add/9']"),
                          (["--dropout=0.1"], "RL needs dropout = 0"),
                          (["--num_minibatches=100"], "need 1 <= num_minibatches <= prompts_per_iter x samples_per_prompt = 16"),
                          (["--clip_eps=0.3", "--clip_eps_high=0.25"], "clip_eps_high >= clip_eps")):
        res = grpo(base, data, str(tmp / "bad"), *args, check=False)
        assert res.returncode != 0 and message in res.stderr and "Traceback" not in res.stderr, (args, res.stderr)


def test_rl_prompts_give_each_prompt_the_room_it_has_and_name_a_cell_with_none(rl_setup, capsys):
    import bpe

    _, data, _ = rl_setup
    tok = bpe.byte_tokenizer(bpe.SPECIAL_TOKENS)
    cells = ("add/2", "copy/1")
    ddp = common.Distributed("cpu")

    def prompts(block_size):
        return posttrain.rl_prompts(data, cells, tok, ddp, 100, 100, 100, block_size, 16)

    lengths = {c: sorted(len(ex["prompt"]) for ex in prompts(128)["train"] if posttrain.cell_key(ex) == c) for c in cells}
    longest = max(lengths["add/2"] + lengths["copy/1"])
    out = prompts(longest + 4)  # every prompt keeps some room, less than 16
    assert len(out["train"]) == 20 and len(out["dev"]) == 12 and len(out["test"]) == 8 and len(out["pass_test"]) == 4
    assert "prompts: add/2 10 (10 with room for fewer than 16 new tokens), copy/1 10 (" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="the cells add/2 keep no training prompt"):
        prompts(min(lengths["add/2"]))
    no_train = posttrain.rl_prompts(data, cells, tok, ddp, 100, 100, 100)  # DPO's: no block_size, no train split
    assert no_train["train"] == [] and len(no_train["dev"]) == 12 and len(no_train["pass_dev"]) == 6
