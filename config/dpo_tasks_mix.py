# DPO from the SFT model of the mixed dataset (python sft.py config/sft_tasks_mix.py) on its own
# answers to the four arithmetic cells where it knows two ways to answer: on-policy pairs, for each
# prompt the best of 8 samples at temperature 1 against the worst (by the checker's score), built
# first when data/preferences/policy_mix is missing. Then: python sample.py --out_dir=out-dpo-mix --chat=True
exec(open("config/dpo_tasks.py").read())
out_dir = "out-dpo-mix"
init_from = "out-sft-mix/ckpt.pt"
preference_dataset = ("preferences/policy_mix",)
build_pairs = ("--source=policy --init_from=out-sft-mix/ckpt.pt --tasks_dir=tasks_mix --cells=add/2,add/3,sub/2,sub/3 "
               "--train_prompts_per_cell=300 --samples_per_prompt=8 --max_new_tokens=64")
prompt_dataset = "tasks_mix"
rl_tasks = ("add/2", "add/3", "sub/2", "sub/3")
eval_max_new_tokens = 64
