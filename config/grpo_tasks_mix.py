# GRPO from the SFT model of the mixed dataset (python sft.py config/sft_tasks_mix.py) on the four
# arithmetic cells where it knows two ways to answer: reward = exact match, so a group whose worked
# solutions are right and whose direct answers are wrong pushes the worked opening up until greedy
# decoding takes it. Every other cell is watched on the dev split (a solved cell must not drop).
# Then: python sample.py --out_dir=out-grpo-mix --chat=True
exec(open("config/grpo_tasks.py").read())
out_dir = "out-grpo-mix"
init_from = "out-sft-mix/ckpt.pt"
prompt_dataset = "tasks_mix"
rl_tasks = ("add/2", "add/3", "sub/2", "sub/3")
reward = ("exact",)
max_new_tokens = 64  # a worked 3-digit answer is about 55 tokens
eval_max_new_tokens = 64
learning_rate = 1e-4
kl_coef = 0.01
max_iters = 150
eval_interval = 25
