# nanoGPT's shakespeare_char scale on one GPU: 6 layers, 6 heads, 384 wide, 256 tokens of context.
# nanoGPT reports val loss 1.4697 in about 3 minutes on an A100.
out_dir = "out-shakespeare-gpu"
dataset = "tiny_shakespeare/byte"
eval_interval = 250
eval_iters = 200
log_interval = 10
always_save_checkpoint = False

gradient_accumulation_steps = 1
batch_size = 64
block_size = 256
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3
max_iters = 5000
lr_decay_iters = 5000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
