# Full fine-tuning of the tiny_shakespeare model (python train.py config/tiny_shakespeare.py) into a
# chat model that answers the verifiable tasks of data/tasks (generated on first use: 57k
# conversations, difficulties 1-3, weighted towards arithmetic), on a 2-core CPU in about 10 minutes.
# Then: python sample.py --out_dir=out-sft --chat=True
out_dir = "out-sft"
init_from = "out-shakespeare/ckpt.pt"
sft_dataset = "tasks"
eval_interval = 500
log_interval = 25
eval_iters = 20
eval_prompts = 240

batch_size = 32
curriculum = "none"  # difficulty: 0.65 exact match overall against 0.76 without (see README)

# 2e-3, the pretraining rate, stalls: the loss sat near 2.3 for 1000 iterations
learning_rate = 1e-3
max_iters = 4000
lr_decay_iters = 4000
min_lr = 1e-4
warmup_iters = 100
device = "cpu"
compile = False
