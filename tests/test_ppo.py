"""ppo.py on tiny models: where the rewards and values sit on a real rollout, a toy task whose reward
PPO raises in seconds, the first update on-policy, the logs and a checkpoint sample.py loads, exact
resume (shared and separate value), two processes, bad settings. GAE, whitening, the value loss,
the KL controller and the per-token rewards are tested by hand in test_losses.py."""

import os
from dataclasses import asdict

import pytest
import torch

import common
import losses
from conftest import build, read_log, run_forked, run_script, tiny
from model import GPT, GPTConfig

# dtype=float32: dtype=auto times float32 against bf16 in every run, and runs compared bit for bit
# could then take different ones on a loaded CPU
TINY = ["--prompts_per_iter=8", "--max_new_tokens=6", "--log_interval=1", "--warmup_iters=1", "--device=cpu",
        "--compile=false", "--eval_prompts=12", "--pass_k_prompts=4", "--pass_k_samples=4", "--eval_max_new_tokens=6",
        "--learning_rate=1e-3", "--rl_tasks=", "--dtype=float32"]


def ppo(base, data, out, *args, check=True, run=run_forked):
    return run("ppo.py", *TINY, f"--init_from={base}", f"--prompt_dataset={data}", f"--out_dir={out}", *args,
               check=check)


def steps_of(out):
    return [r for r in read_log(out) if "reward" in r]


def fake_reward_model(base, path, seed=1):
    """A reward.py-like checkpoint (stage reward, a scalar head) of base's architecture."""
    ckpt = common.load_checkpoint(base)
    cfg = GPTConfig(**{**ckpt["model_args"], "scalar_head": True})
    torch.manual_seed(seed)
    common.save_checkpoint({"model": GPT(cfg).state_dict(), "model_args": asdict(cfg), "meta": ckpt["meta"],
                            "stage": "reward", "reward_mean": 0.5, "reward_std": 2.0}, path)
    return path


def rollout(model, stops, seed):
    """Completions of three prompts of different lengths, some rows stopping, some running out."""
    prompts = [torch.tensor(p) for p in ([1, 2, 3, 4, 5], [6, 7], [8, 9, 10])]
    g = torch.Generator().manual_seed(seed)
    return model.complete(prompts, 6, 2, temperature=1.0, stop_tokens=stops, generator=g)


def test_the_score_lands_on_the_end_token_or_a_truncated_completions_last():
    model = build(tiny(), sharpen=1.0)
    out = rollout(model, stops=list(range(8)), seed=3)
    assert out.truncated.any() and not out.truncated.all()  # both kinds in the batch, of mixed lengths
    targets, mask = out.targets(), out.loss_mask()
    scores = torch.arange(1.0, out.idx.size(0) + 1)
    logp = torch.zeros(mask.shape)
    rewards, _ = losses.kl_penalized_rewards(scores, logp, logp, mask, kl_coef=0.1)
    for i in range(out.idx.size(0)):
        hits = rewards[i].nonzero().flatten().tolist()
        assert len(hits) == 1 and rewards[i, hits[0]] == scores[i]
        j = hits[0]
        if out.truncated[i]:  # the last column: the completion's last sampled token is its target
            assert j == targets.size(1) - 1 and out.mask[i, -1]
        else:  # the position whose target is the stop token, not the one after it (TRL's issue 3750)
            assert targets[i, j] < 8 and mask[i, j] and (j == targets.size(1) - 1 or not mask[i, j + 1])
    # the KL penalty: on every completion token and nowhere else
    rewards, kl = losses.kl_penalized_rewards(torch.zeros(len(scores)), logp + 1.0, logp, mask, kl_coef=0.1)
    assert torch.equal(kl != 0, mask) and torch.allclose(rewards[mask], torch.full((int(mask.sum()),), -0.1))


def test_the_value_head_reads_every_completion_position_as_each_row_alone():
    model = build(tiny(scalar_head=True, pos_emb="rope"), sharpen=1.0)
    out = rollout(model, stops=list(range(8)), seed=3)
    inputs, pos, mask = out.idx[:, :-1], out.pos[:, :-1], out.loss_mask()
    values = model.scores(model(inputs, pos))  # (N, L + T - 1): the batch, left-padded, then filler after each stop
    in_prompt = torch.arange(out.idx.size(1)) < out.prompt_len
    for i in range(out.idx.size(0)):
        own = (in_prompt & (out.pos[i] >= 0)) | out.mask[i]  # the row's prompt and completion, no padding
        alone = model.scores(model(out.idx[i][own][None]))[0]
        cols = mask[i].nonzero().flatten()  # the completion positions: the values GAE reads
        torch.testing.assert_close(values[i, cols], alone[pos[i, cols]])


def test_a_toy_task_where_ppo_raises_the_reward(ab_policy):
    base, data, tmp = ab_policy
    out = str(tmp / "out")
    run_forked("ppo.py", f"--init_from={base}", f"--prompt_dataset={data}", "--rl_tasks=", "--prompts_per_iter=16",
               "--max_new_tokens=8", "--warmup_iters=1", "--eval_interval=100", "--eval_prompts=0",
               "--pass_k_prompts=0", "--device=cpu", "--compile=false", f"--out_dir={out}", "--kl_coef=0.01",
               "--learning_rate=1e-2", "--max_iters=10", "--update_epochs=2", "--num_minibatches=2")
    rewards = [r["reward"] for r in steps_of(out)]
    assert len(rewards) == 10
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.2, rewards
    assert steps_of(out)[0]["kl"] == pytest.approx(0.0, abs=1e-6) and steps_of(out)[-1]["kl"] > 0.01  # away from the reference


def test_script_end_to_end_first_update_on_policy_and_a_plain_checkpoint(rl_setup):
    base, data, tmp = rl_setup
    out = str(tmp / "out")
    res = ppo(base, data, out, "--max_iters=4", "--eval_interval=2", "--update_epochs=1", "--num_minibatches=1",
              run=run_script)
    assert "prompts: add/1 10, add/2 10, copy/1 10, copy/2 10; dev 12, test 8" in res.stdout and f"reference: {base}; value: a head on the policy" in res.stdout
    rows = read_log(out)
    steps, evals = steps_of(out), [r for r in rows if "err_rl" in r]
    assert [r["iter"] for r in steps] == [1, 2, 3, 4] and [r["iter"] for r in evals] == [0, 2, 4]
    assert {"loss", "reward", "reward_score", "true_score", "em", "kl", "kl_k3", "kl_seq", "kl_coef", "entropy",
            "clip", "approx_kl", "vf_loss", "vf_clip", "explained_var", "steps", "len", "truncated", "grad_norm",
            "value_grad_norm", "gen_s", "score_s", "update_s", "rollout_tok_s"} <= steps[0].keys()
    assert {"em", "score", "em/add/1", "pass@1", "pass@4", "err_rl"} <= evals[0].keys()
    # one pass, one minibatch: the first update starts at the reference and on the sampling policy
    first = steps[0]
    assert first["kl"] == pytest.approx(0.0, abs=1e-6) and first["kl_k3"] == pytest.approx(0.0, abs=1e-6)
    assert first["clip"] == 0.0 and first["vf_clip"] == 0.0 and first["approx_kl"] == pytest.approx(0.0, abs=1e-9)
    assert first["kl_coef"] == 0.05 and first["true_score"] == pytest.approx(first["reward"], rel=1e-6)
    # the policy is saved as a plain GPT, its value head beside it
    ckpt = common.load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ckpt["stage"] == "ppo" and ckpt["reference"] == base and ckpt["iter_num"] == 4
    assert ckpt["model_args"]["scalar_head"] is False and not any(k.startswith("score_head.") for k in ckpt["model"])
    assert set(ckpt["value_head"]) == {"weight", "bias"} and ckpt["kl_coef"] == 0.05
    GPT(GPTConfig(**ckpt["model_args"])).load_state_dict(ckpt["model"])  # strict
    assert "=== iter 4" in open(os.path.join(out, "samples.txt")).read()
    run_forked("sample.py", f"--init_from={os.path.join(out, 'ckpt.pt')}", "--chat=True", "--start=What is 1 + 2?",
               "--temperature=0", "--max_new_tokens=4", "--device=cpu")


def test_a_policy_with_a_value_head_saves_as_a_plain_gpt(tmp_path):
    # what ckpt.pt and best.pt hold of a shared-value policy, here with LoRA adapters too
    model = build(tiny(scalar_head=True, lora_rank=2), dtype=torch.float32)
    ddp = common.Distributed("cpu")
    optimizer = model.configure_optimizers(0.0, 1e-3, (0.9, 0.99), "cpu")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    common.save_training_checkpoint(str(tmp_path / "ckpt.pt"), ddp, model, optimizer, scaler, drop_scalar_head=True)
    common.save_weights(str(tmp_path / "best.pt"), ddp, model, drop_scalar_head=True)
    x = torch.randint(0, 37, (2, 5))
    for name in ("ckpt.pt", "best.pt"):
        ckpt = common.load_checkpoint(str(tmp_path / name))
        assert ckpt["model_args"]["scalar_head"] is False
        plain = GPT(GPTConfig(**ckpt["model_args"]))
        plain.load_state_dict(ckpt["model"])  # strict: no score_head keys left over
        torch.testing.assert_close(plain.eval().logits(plain(x)), model.logits(model(x)))
    assert common.load_checkpoint(str(tmp_path / "best.pt"))["model_args"]["lora_rank"] == 0  # merged


def rows_of(out, keys=("iter", "loss", "reward", "kl", "kl_coef", "clip", "vf_loss", "explained_var")):
    return [tuple(r.get(k) for k in keys) for r in steps_of(out)]


def test_resume_is_bit_identical_with_several_passes_and_minibatches(rl_setup):
    # 2 passes of 2 minibatches: ratios and values move off their rollout values; the adaptive
    # kl_coef and the reward statistics are state the checkpoint must carry
    base, data, tmp = rl_setup
    args = ["--update_epochs=2", "--num_minibatches=2", "--eval_interval=2", "--eval_prompts=0", "--pass_k_prompts=0",
            "--target_kl=0.001", "--kl_horizon=50", "--reward_scaling=true", "--whiten_rewards=true"]
    straight, split = str(tmp / "straight"), str(tmp / "split")
    ppo(base, data, straight, *args, "--max_iters=4")
    ppo(base, data, split, *args, "--max_iters=2")
    ppo(base, data, split, *args, "--max_iters=4", "--init_from=resume")
    assert rows_of(straight) == rows_of(split) and len(rows_of(straight)) == 4
    assert len({r[4] for r in rows_of(straight)}) > 1  # kl_coef moved
    a = torch.load(os.path.join(straight, "ckpt.pt"), weights_only=True)
    b = torch.load(os.path.join(split, "ckpt.pt"), weights_only=True)
    assert b["reference"] == base and a["kl_coef"] == b["kl_coef"] and a["reward_moments"] == b["reward_moments"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["value_head"][k], b["value_head"][k]) for k in a["value_head"])


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_a_lora_policy_resumes_exactly_with_its_adapters_unmerged(rl_setup, quantize, one_quant_path):
    # a resume must keep the adapters as adapters (the optimizer state is theirs), quantized or not
    base, data, tmp = rl_setup
    args = ["--lora_rank=2", f"--quantize={quantize}", "--eval_interval=2", "--eval_prompts=0", "--pass_k_prompts=0"]
    straight, split = str(tmp / f"straight-{quantize}"), str(tmp / f"split-{quantize}")
    ppo(base, data, straight, *args, "--max_iters=3")
    ppo(base, data, split, *args, "--max_iters=2")
    ppo(base, data, split, *args, "--max_iters=3", "--init_from=resume")
    assert rows_of(straight) == rows_of(split) and len(rows_of(straight)) == 3
    a = torch.load(os.path.join(straight, "ckpt.pt"), weights_only=True)
    b = torch.load(os.path.join(split, "ckpt.pt"), weights_only=True)
    assert a["model_args"]["lora_rank"] == b["model_args"]["lora_rank"] == 2
    assert any("lora_" in k for k in b["model"]) and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_separate_value_network_from_the_reward_model_resumes_exactly(rl_setup):
    base, data, tmp = rl_setup
    rm = fake_reward_model(base, str(tmp / "rm.pt"))
    args = ["--value_model=separate", "--value_init=reward", f"--reward_model={rm}", "--value_learning_rate=3e-3",
            "--update_epochs=2", "--num_minibatches=2", "--eval_interval=2", "--eval_prompts=0", "--pass_k_prompts=0"]
    straight, split = str(tmp / "straight"), str(tmp / "split")
    res = ppo(base, data, straight, *args, "--max_iters=4")
    assert f"value: a separate network from {rm}" in res.stdout
    ppo(base, data, split, *args, "--max_iters=2")
    ppo(base, data, split, *args, "--max_iters=4", "--init_from=resume")
    assert rows_of(straight) == rows_of(split) and len(rows_of(straight)) == 4
    a = torch.load(os.path.join(straight, "ckpt.pt"), weights_only=True)
    b = torch.load(os.path.join(split, "ckpt.pt"), weights_only=True)
    assert all(torch.equal(a["value_model"][k], b["value_model"][k]) for k in a["value_model"])
    start = common.load_checkpoint(rm)["model"]
    assert not torch.equal(a["value_model"]["score_head.weight"], start["score_head.weight"])  # it trained
    assert not any(k.startswith("score_head.") for k in a["model"])  # the policy has no head at all


def test_two_processes_stay_in_sync_with_either_value_model(rl_setup):
    # shared, here with LoRA: the reference is the policy with its adapters off, the head trains in
    # full beside the adapters; separate: two DDP wrappers, two optimizers
    base, data, tmp = rl_setup
    for value_model, extra in (("shared", ["--lora_rank=4", "--lora_targets=attn"]), ("separate", [])):
        out = str(tmp / f"ddp-{value_model}")
        res = run_script("torchrun", "--standalone", "--nproc_per_node=2", "ppo.py", *TINY, f"--init_from={base}",
                         f"--prompt_dataset={data}", f"--out_dir={out}", "--max_iters=2", "--eval_interval=2",
                         "--eval_prompts=4", "--pass_k_prompts=0", "--update_epochs=2", "--num_minibatches=2",
                         "--target_kl_stop=1.0", "--reward_scaling=true", f"--value_model={value_model}", *extra)
        assert res.stdout.count("parameters identical on all 2 processes") == (1 if value_model == "shared" else 2)
        assert [r["iter"] for r in steps_of(out)] == [1, 2]
        ckpt = common.load_checkpoint(os.path.join(out, "ckpt.pt"))
        assert not any(k.startswith("score_head.") for k in ckpt["model"])
        if value_model == "shared":
            assert "reference: the policy with adapters off" in res.stdout and steps_of(out)[0]["kl"] == 0.0
            plain = common.load_checkpoint(base)["model"]
            assert all(torch.equal(plain[k], ckpt["model"][k]) for k in plain)  # the base is frozen
            assert ckpt["model_args"]["lora_rank"] == 4 and any("lora_B" in k for k in ckpt["model"])
            assert ckpt["value_head"]["bias"].abs().item() > 0  # the head (bias 0 at the start) trained


def test_bad_settings_stop_with_a_message(rl_setup):
    base, data, tmp = rl_setup
    # every broken rule named in one line
    res = ppo(base, data, str(tmp / "bad"), "--value_model=both", "--value_init=reward", "--num_minibatches=9",
              "--target_kl=6", "--kl_coef=0", check=False)
    assert res.returncode != 0 and "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    for message in ("value_model must be shared | separate", "value_init=reward starts a separate value network",
                    "num_minibatches <= prompts_per_iter x samples_per_prompt = 8", "need kl_coef > 0"):
        assert message in res.stderr, (message, res.stderr)
    assert "clip_eps" not in res.stderr  # and only those
    res = ppo(base, data, str(tmp / "bad"), "--value_model=separate", "--value_init=reward", f"--reward_model={base}",
              check=False)
    assert res.returncode != 0 and "is not a reward model" in res.stderr and "Traceback" not in res.stderr
    res = ppo(base, data, str(tmp / "bad"), "--value_model=separate", "--value_init=reward",
              f"--reward_model={base},{base}", check=False)
    assert res.returncode != 0 and "from one reward model" in res.stderr and "Traceback" not in res.stderr
