# config/tiny_shakespeare.py with the MLP of every layer replaced by 8 experts, of which each token
# goes through 2 (Mixtral's shape). Each expert is half the dense MLP's width (expert_hidden None:
# 512 / 2 = 256), so a token uses as many parameters as in the dense model (1.84M against 1.83M,
# the routers the difference) while the model holds 5.38M; everything else is the dense config's,
# so the two compare at equal iterations and at equal active parameters per token (README,
# Mixture-of-experts). Then: python sample.py --out_dir=out-shakespeare-moe
# At equal total parameters instead (1.84M, of which 0.95M active):
#   python train.py config/tiny_shakespeare_moe.py --expert_hidden=64 --out_dir=out-shakespeare-moe-small
exec(open("config/tiny_shakespeare.py").read())
out_dir = "out-shakespeare-moe"
n_expert = 8
n_expert_active = 2
moe_every = 1
n_shared_expert = 0
moe_aux_coef = 0.01
moe_z_coef = 0.001
