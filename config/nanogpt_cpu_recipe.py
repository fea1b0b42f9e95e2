# nanoGPT's published CPU recipe for shakespeare_char, on our byte-level data (the corpus is ASCII,
# so bytes are its characters and the losses compare), with nanoGPT's architecture. nanoGPT itself
# reaches val loss 1.8857 in 74 s on a 2-core CPU. The same recipe with the modern switches:
#   python train.py config/nanogpt_cpu_recipe.py --pos_emb=rope --norm=rmsnorm --mlp=swiglu
out_dir = "out-nanogpt-recipe"
dataset = "tiny_shakespeare/byte"
eval_interval = 250
eval_iters = 20
log_interval = 1
always_save_checkpoint = False

batch_size = 12
block_size = 64
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
bias = False
pos_emb = "learned"
norm = "layernorm"
mlp = "gelu"
tie_weights = True

learning_rate = 1e-3
max_iters = 2000
lr_decay_iters = 2000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
device = "cpu"
compile = False
