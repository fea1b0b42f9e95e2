# PPO from the mixed SFT model against the learned reward of config/reward_tasks_mix.py: InstructGPT's
# recipe (a value head, the KL in the reward). best.pt, chosen on the checked dev split, holds the run
# before the reward model is over-optimised. Then: python sample.py --out_dir=out-ppo-rm --chat=True
exec(open("config/ppo_tasks_mix.py").read())
out_dir = "out-ppo-rm"
reward = ("model",)
reward_model = "out-reward-mix/best.pt"
