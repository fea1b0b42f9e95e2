# config/sft_tasks.py with LoRA: rank-16 adapters on every attention and MLP matrix, plus the token
# embedding, which the tiny_shakespeare base never learned for digits or the chat tokens (without
# it the loss stalls near 3.5). At the end out-sft-lora/merged.pt holds the plain model with the
# adapters folded in (best.pt too) and out-sft-lora/lora.pt the adapters and the embedding.
# Then: python sample.py --out_dir=out-sft-lora --chat=True
exec(open("config/sft_tasks.py").read())
out_dir = "out-sft-lora"
lora_rank = 16
lora_alpha = 32.0
lora_targets = ("attn", "mlp")
train_embeddings = True
