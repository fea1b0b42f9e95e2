# config/sft_tasks.py on worked solutions: full fine-tuning of the tiny_shakespeare model on
# data/tasks_cot (python data/tasks/prepare.py --cot=True: the same 57k problems, each answered
# with its steps and then "Answer: <answer>"; val also holds difficulty 4, which training never
# sees). Eval grades the answer after the last "Answer:" and logs how often the trace keeps its
# format (fmt/add/3 ...). Then: python sample.py --out_dir=out-sft-cot --chat=True
exec(open("config/sft_tasks.py").read())
out_dir = "out-sft-cot"
sft_dataset = "tasks_cot"

# A worked solution is twice as long (54 tokens on average against 26), so a batch of 16 pads to
# the ~1,330 tokens a direct batch of 32 does: 4000 iterations cost what sft_tasks.py's do, and
# each batch still carries 4x the assistant tokens (16 x 32 against 32 x 4).
batch_size = 16
# the longest worked solution, 12 different letters to sort, is 93 tokens with its <|end|>; a
# greedy eval generates up to that many per prompt where a direct one stops after about 5, so
# evaluate half as often
eval_max_new_tokens = 96
eval_interval = 1000
