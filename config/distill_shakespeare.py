# Knowledge distillation on tiny shakespeare: a student a quarter the size of the model of
# config/tiny_shakespeare.py (2 layers x 128, 0.43M parameters against 4 x 192, 1.77M) learns from
# that model's distribution as well as from the next byte, same data and iterations. Train the
# teacher first (python train.py config/tiny_shakespeare.py); the same student without a teacher,
# for comparison: python train.py config/distill_shakespeare.py --teacher= --out_dir=out-distill-plain
exec(open("config/tiny_shakespeare.py").read())
out_dir = "out-distill"
teacher = "out-shakespeare/ckpt.pt"
distill_alpha = 0.5
distill_temperature = 2.0
distill_loss = "forward_kl"

n_layer = 2
n_head = 4
n_embd = 128
