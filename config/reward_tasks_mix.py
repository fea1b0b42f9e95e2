# A reward model for the SFT model of the mixed dataset (python sft.py config/sft_tasks_mix.py), on
# its own answers to the four arithmetic cells, labelled right over wrong by the checker (the
# stand-in for a human), read at every line end of a reply as well as at its end, so each step of a
# worked solution is judged where it is written, and trained on the chosen replies' next tokens too.
# About 18-20 minutes at one thread beside another run.
# Make the pairs first (8,000 train prompts, about 5 minutes at 2 threads):
#   python data/preferences/prepare.py --source=policy --label=exact --init_from=out-sft-mix/ckpt.pt \
#       --tasks_dir=tasks_mix --cells=add/2,add/3,sub/2,sub/3 --max_new_tokens=64 --pairs_per_prompt=4 \
#       --train_prompts_per_cell=2000 --out_dir=data/preferences/policy_mix
# Then: python grpo.py config/grpo_tasks_rm.py, python ppo.py config/ppo_tasks_rm.py
exec(open("config/reward_tasks.py").read())
out_dir = "out-reward-mix"
init_from = "out-sft-mix/ckpt.pt"
preference_dataset = ("preferences/policy_mix",)
reward_read = "lines"  # held-out accuracy 0.889 / 0.828 (two seeds) against 0.804 / 0.807 read at <|end|> only
lm_coef = 0.5  # plus the chosen replies' next-token loss: 0.948 (README, "RLHF that helps")
eval_pairs = 0  # every held-out pair (about 600)
eval_interval = 200
max_iters = 1000
lr_decay_iters = 1000
