# GPT-2 124M on your own large corpus, on 8 GPUs:
#   python data/text/prepare.py --input_dir=/path/to/texts --tokenizer=gpt2 --out_dir=data/text/mycorpus
#   torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m.py --dataset=text/mycorpus
# ~0.5M tokens per iteration (12 x 1024 x 40 accumulated over all processes), GPT-2's shape with
# the modern switches; pos_emb=learned norm=layernorm mlp=gelu gives GPT-2's own architecture.
out_dir = "out-gpt2"
dataset = "text/mycorpus"
eval_interval = 1000
eval_iters = 200
log_interval = 10
wandb_project = "gpt2"
wandb_run_name = "gpt2-124m"

batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0

learning_rate = 6e-4
max_iters = 600000
lr_decay_iters = 600000
min_lr = 6e-5
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
warmup_iters = 2000
