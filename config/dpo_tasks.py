# DPO from the SFT model (python sft.py config/sft_tasks.py) on its own answers to the cells where
# SFT is neither solved nor hopeless, grpo_tasks.py's rl_tasks: on-policy pairs, for each prompt the
# best of 8 samples at temperature 1 against the worst (by the checker's score), built first when
# data/preferences/policy_rl is missing. Then: python sample.py --out_dir=out-dpo --chat=True
# sft_coef 1.0 because plain DPO fell below SFT here (likelihood displacement), and beta 0.5 and IPO
# did no better: README.md, "Direct Preference Optimization", has the measurements.
out_dir = "out-dpo"
init_from = "out-sft/ckpt.pt"
preference_dataset = ("preferences/policy_rl",)
build_pairs = ("--source=policy --init_from=out-sft/ckpt.pt --cells=add/3,sub/2,sub/3,sort/2,sort/3 "
               "--train_prompts_per_cell=300 --samples_per_prompt=8 --max_new_tokens=16")
prompt_dataset = "tasks"
rl_tasks = ("add/3", "sub/2", "sub/3", "sort/2", "sort/3")
eval_interval = 50
log_interval = 10
eval_pairs = 1000
eval_prompts = 1000  # every held-out prompt of every cell
pass_k_prompts = 100

batch_size = 32
loss_type = "sigmoid"
beta = 0.1
sft_coef = 1.0  # RPO: plus the chosen reply's NLL, which keeps logp_chosen from falling with logp_rejected
precompute_ref = True

learning_rate = 5e-5
max_iters = 100
warmup_iters = 10
lr_decay_iters = 100
min_lr = 5e-6
device = "cpu"
compile = False
