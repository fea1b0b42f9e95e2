# DPO from the SFT model of the mixed dataset (python sft.py config/sft_tasks_mix.py) on its own
# answers to the four arithmetic cells where it knows two ways to answer. On-policy pairs: 8 samples
# at temperature 1 per prompt, up to 4 pairs of a better and a worse answer (by the checker's score),
# of which only those whose chosen reply is a worked solution and whose rejected reply answers
# directly are kept (forms=worked_over_direct): the preference between the two ways of answering.
# The best-against-worst pairs of every form moved nothing (half of them two direct answers); these
# moved greedy decoding to worked solutions, and beta 2.0 (not 0.1) kept the cells DPO does not
# train from falling with them: README.md, "RL that teaches". Built first when
# data/preferences/policy_mix_forms is missing. Then: python sample.py --out_dir=out-dpo-mix --chat=True
exec(open("config/dpo_tasks.py").read())
out_dir = "out-dpo-mix"
init_from = "out-sft-mix/ckpt.pt"
preference_dataset = ("preferences/policy_mix_forms",)
build_pairs = ("--source=policy --init_from=out-sft-mix/ckpt.pt --tasks_dir=tasks_mix --cells=add/2,add/3,sub/2,sub/3 "
               "--train_prompts_per_cell=300 --samples_per_prompt=8 --max_new_tokens=64 --pairs_per_prompt=4 "
               "--forms=worked_over_direct")
prompt_dataset = "tasks_mix"
rl_tasks = ("add/2", "add/3", "sub/2", "sub/3")
eval_max_new_tokens = 64
eval_interval = 25
beta = 2.0
