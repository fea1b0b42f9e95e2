# PPO from the SFT model (python sft.py config/sft_tasks.py) on the same cells as grpo_tasks.py,
# reward = the checker's score with partial credit, a value head on the policy's backbone, on a
# 2-core CPU in at most 20 minutes. Then: python sample.py --out_dir=out-ppo --chat=True
#
# Sized against config/grpo_tasks.py, counted in forward passes over its 128-row batch (F; a
# backward costs about 2F): a GRPO iteration is the rollout of 16 x 8 completions, the reference
# pass and one update, about 1 + 3 = 4F. Here a rollout of 64 x 1 completions (half the rows),
# then the old pass (log-probs and values at once) and the reference pass, 2 x 0.5F, and 2 passes
# of 2 minibatches, 2 x 3 x 0.5F: 4F too, with half the sequences to decode. So an iteration
# costs at most what a GRPO one does, and as many of them fit where GRPO's do.
out_dir = "out-ppo"
init_from = "out-sft/ckpt.pt"
prompt_dataset = "tasks"
rl_tasks = ("add/3", "sub/2", "sub/3", "sort/2", "sort/3")
eval_interval = 50
log_interval = 5

prompts_per_iter = 64
samples_per_prompt = 1
max_new_tokens = 16
temperature = 1.0
reward = ("score",)
value_model = "shared"
vf_coef = 0.1
kl_coef = 0.05  # fixed; --target_kl=... (nats per sequence) makes it adaptive
gamma = 1.0
lam = 0.95
clip_eps = 0.2
clip_value = 0.2
update_epochs = 2
num_minibatches = 2

learning_rate = 3e-5
max_iters = 150  # 300-iteration runs chose best.pt (dev split) at 100, 250, 150 on seeds 1337, 2, 3 (README)
warmup_iters = 10
device = "cpu"
compile = False
