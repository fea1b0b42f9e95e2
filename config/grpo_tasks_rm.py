# GRPO from the mixed SFT model against the learned reward of config/reward_tasks_mix.py instead of
# the checker: the InstructGPT recipe with GRPO's update. The reward model's score keeps rising after
# the true exact match peaks (over-optimisation); best.pt, chosen on the checked dev split, holds the
# run at its peak. Then: python sample.py --out_dir=out-grpo-rm --chat=True
exec(open("config/grpo_tasks_mix.py").read())
out_dir = "out-grpo-rm"
reward = ("model",)
reward_model = "out-reward-mix/best.pt"
max_iters = 100
eval_interval = 10  # the dev curve finely enough to see where it turns
