# GRPO on worked solutions: from the SFT model that writes its steps before the answer
# (python sft.py config/sft_tasks_cot.py), on the cells still unsolved after it, difficulty 4
# included (4-digit numbers, longer strings; SFT never trained on it). The reward looks only at the
# final answer, the text after the last "Answer:" (partial credit), plus a small reward for
# following the trace format. data/tasks_cot_rl has SFT's problems and held-out set, and training
# prompts at difficulty 4 (generated when missing).
exec(open("config/grpo_tasks.py").read())
out_dir = "out-grpo-cot"
init_from = "out-sft-cot/ckpt.pt"
prompt_dataset = "tasks_cot_rl"
rl_tasks = ("add/4", "sub/3", "sub/4", "sort/3", "sort/4", "count/3", "count/4")
max_new_tokens = 96  # the longest worked solution, sort at difficulty 4, is 93 tokens
eval_max_new_tokens = 96
reward = ("score", "format=0.1")
prompts_per_iter = 8
samples_per_prompt = 8
# the fp32 pipeline run's 150 iterations chose best.pt (dev split) at iteration 100: the learning rate
# is constant after warmup, so 100 iterations give that checkpoint, a minute sooner
max_iters = 100
