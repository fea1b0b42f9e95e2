# config/sft_tasks.py on the mixed dataset (python data/tasks/prepare.py --cot_share=0.15 --out_dir=data/tasks_mix,
# generated on first use): the same problems, but 15% of the addition and subtraction rows answer
# with a worked solution that opens with a "Work:" line, the rest directly. The model learns both
# ways; greedy decoding picks the majority one (direct, often wrong at 3 digits) while sampling
# starts a worked solution now and then (nearly always right): what the RL stages select from.
# Then: python grpo.py config/grpo_tasks_mix.py
exec(open("config/sft_tasks.py").read())
out_dir = "out-sft-mix"
sft_dataset = "tasks_mix"
eval_max_new_tokens = 64  # a worked 3-digit sum or difference is about 55 tokens with its <|end|>
