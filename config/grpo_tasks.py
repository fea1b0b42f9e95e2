# GRPO from the SFT model (python sft.py config/sft_tasks.py) on the cells where SFT is neither
# solved nor hopeless, reward = the checker's score with partial credit, on a 2-core CPU in at most
# 20 minutes. Then: python sample.py --out_dir=out-grpo --chat=True
out_dir = "out-grpo"
init_from = "out-sft/ckpt.pt"
prompt_dataset = "tasks"
rl_tasks = ("add/3", "sub/2", "sub/3", "sort/2", "sort/3")
eval_interval = 50
log_interval = 5

prompts_per_iter = 16
samples_per_prompt = 8
max_new_tokens = 16
temperature = 1.0
reward = ("score",)
scale_rewards = "group"
loss_type = "grpo"
kl_coef = 0.04

learning_rate = 3e-5
max_iters = 150  # 300-iteration runs chose best.pt (dev split) at 100-150 on seeds 1337, 2, 3 (README)
warmup_iters = 10
device = "cpu"
compile = False
