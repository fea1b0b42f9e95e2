# Byte-level tiny shakespeare on a laptop CPU in about 5 minutes, with the modern defaults
# (rope, rmsnorm, swiglu). Then: python sample.py --out_dir=out-shakespeare
out_dir = "out-shakespeare"
dataset = "tiny_shakespeare/byte"
eval_interval = 250
eval_iters = 20
log_interval = 25

batch_size = 16
block_size = 128
n_layer = 4
n_head = 4
n_embd = 192
dropout = 0.0
pos_emb = "rope"
norm = "rmsnorm"
mlp = "swiglu"

learning_rate = 2e-3
max_iters = 1500
lr_decay_iters = 1500
min_lr = 2e-4
warmup_iters = 100
beta2 = 0.99
device = "cpu"
compile = False
