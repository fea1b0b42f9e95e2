# DPO from the SFT model (python sft.py config/sft_tasks.py) on its own answers to the cells where
# SFT is neither solved nor hopeless, grpo_tasks.py's rl_tasks: on-policy pairs, for each prompt the
# best of 8 samples at temperature 1 against the worst (by the checker's score), built first when
# data/preferences/policy_rl is missing. Then: python sample.py --out_dir=out-dpo --chat=True
#
# Sized for at most 10 minutes on a 2-core CPU, the pairs included, from the measured configs (this
# run itself is not timed yet):
#   pairs     1500 train prompts (300 a cell) and every held-out prompt of the 5 cells (about 250),
#             8 samples each: about 14,000 completions of at most 16 tokens, about 110 times the
#             128 completions of a grpo_tasks.py rollout (300 iterations of rollout, update and
#             reference pass, plus 7 evals, take at most 20 minutes there): 2 to 4 minutes
#   training  a step of 32 pairs is reward_tasks.py's forward and backward of 64 conversations (1000
#             steps in about 5 minutes there, 0.3 s a step; the reference is precomputed, one
#             forward over the pairs, about 10 s): 100 steps, about 3 epochs of the pairs, 30 s
#   eval      the same greedy answers and pass@k as grpo_tasks.py's eval, 3 times: at most 2 minutes
# To shorten it: fewer --train_prompts_per_cell in build_pairs (delete data/preferences/policy_rl).
# Not tuned: learning_rate and beta are first guesses (GRPO's rate range, DPO's usual beta).
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
sft_coef = 0.0  # if logp_chosen falls with logp_rejected (likelihood displacement), try 1.0 (RPO)
precompute_ref = True

learning_rate = 5e-5
max_iters = 100
warmup_iters = 10
lr_decay_iters = 100
min_lr = 5e-6
device = "cpu"
compile = False
