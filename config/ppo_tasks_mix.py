# PPO from the SFT model of the mixed dataset (python sft.py config/sft_tasks_mix.py) on the four
# arithmetic cells where it knows two ways to answer, reward = exact match, a value head on the
# policy's backbone learning at ten times the policy's rate. Then: python sample.py --out_dir=out-ppo-mix --chat=True
exec(open("config/ppo_tasks.py").read())
out_dir = "out-ppo-mix"
init_from = "out-sft-mix/ckpt.pt"
prompt_dataset = "tasks_mix"
rl_tasks = ("add/2", "add/3", "sub/2", "sub/3")
reward = ("exact",)
max_new_tokens = 64  # a worked 3-digit answer is about 55 tokens
eval_max_new_tokens = 64
prompts_per_iter = 128
learning_rate = 1e-4
value_learning_rate = 1e-3
kl_coef = 0.01
max_iters = 60
eval_interval = 10
