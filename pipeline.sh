#!/usr/bin/env bash
# The whole pipeline in one command: data, tokenizer and pretraining, SFT, preference pairs, the
# reward model, GRPO, PPO and DPO on the same tasks, SFT and GRPO on worked solutions, then the
# report (report.md, with its pictures): 43 minutes on a 2-core CPU in float32 (README, the pipeline).
#
#   bash pipeline.sh                               # everything; a stage already done is skipped
#   STAGES="reward grpo report" bash pipeline.sh   # only these (their inputs must be there)
#   FORCE=1 STAGES=grpo bash pipeline.sh           # redo a stage that is done
#   OUT=runs/a bash pipeline.sh                    # every output under runs/a instead of here
#   DTYPE=float32 bash pipeline.sh                 # every stage in float32 (default auto: bf16 where it measures faster)
#
# It is a shell script because each stage is already one command of its own script with its own
# config; this file only puts them in order, times them and stops at the first failure. Every
# stage writes its output to $OUT/out-<stage>/ (or $OUT/pairs/), its console to
# $OUT/out-pipeline/<stage>.log, and when it succeeds $OUT/out-pipeline/<stage>.done with its
# seconds. A stage that fails stops the pipeline with its name and log; what the earlier stages
# made stays, and the next run starts at the stage that failed.
set -uo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}
OUT=${OUT:-.}
STAGES=${STAGES:-data pretrain sft pairs reward grpo ppo dpo sft_cot grpo_cot report}
FORCE=${FORCE:-0}
DTYPE=${DTYPE:-auto}
TINY=${TINY:-0}  # 1: a tiny model and a few iterations per stage (the smoke test), with DATASET set
DATASET=${DATASET:-tiny_shakespeare/byte}
LOGS=$OUT/out-pipeline
mkdir -p "$LOGS"

# what TINY=1 adds to each stage: a random 1 x 32 model, a few iterations, small evals
tiny() {
    [ "$TINY" = 1 ] || return 0
    case $1 in
        pretrain) echo "--n_layer=1 --n_head=2 --n_embd=32 --block_size=64 --batch_size=4 --max_iters=4 --eval_interval=2 --eval_iters=1 --log_interval=1" ;;
        sft|sft_cot) echo "--max_iters=3 --eval_interval=3 --eval_iters=1 --batch_size=4 --eval_prompts=6 --eval_max_new_tokens=8 --log_interval=1" ;;
        pairs) echo "--train_prompts_per_cell=2 --samples_per_prompt=2 --max_new_tokens=4" ;;
        reward) echo "--max_iters=3 --eval_interval=3 --batch_size=4 --eval_pairs=8 --log_interval=1" ;;
        grpo|grpo_cot) echo "--max_iters=2 --eval_interval=2 --prompts_per_iter=2 --samples_per_prompt=2 --max_new_tokens=4 --eval_prompts=6 --pass_k_prompts=2 --pass_k_samples=2 --eval_max_new_tokens=6 --log_interval=1" ;;
        ppo) echo "--max_iters=2 --eval_interval=2 --prompts_per_iter=4 --max_new_tokens=4 --eval_prompts=6 --pass_k_prompts=2 --pass_k_samples=2 --eval_max_new_tokens=6 --log_interval=1" ;;
        # a few iterations of SFT rarely give two samples of a prompt different scores, so the tiny
        # policy's own pairs may be none at all: DPO's smoke test trains on the rules pairs
        dpo) echo "--max_iters=2 --eval_interval=2 --batch_size=4 --eval_pairs=8 --eval_prompts=6 --pass_k_prompts=2 --pass_k_samples=2 --eval_max_new_tokens=6 --log_interval=1 --preference_dataset=$(realpath "$OUT/pairs/rules")" ;;
    esac
}

run() {  # run <stage> <command...>: skip when done, else run, time and record it
    local stage=$1 log=$LOGS/$1.log
    shift
    if [ -e "$LOGS/$stage.done" ] && [ "$FORCE" != 1 ]; then
        echo "[$index/$count] $stage: done already ($(cat "$LOGS/$stage.done") s), skipped"
        return 0
    fi
    echo "[$index/$count] $stage: $* (log: $log; $(( $(date +%s) - t_start )) s since the start)"
    local t0
    t0=$(date +%s)
    if ! "$@" > "$log" 2>&1; then
        tail -n 15 "$log"
        echo "pipeline: stage '$stage' failed; its log is $log. What earlier stages made is kept." >&2
        exit 1
    fi
    echo $(( $(date +%s) - t0 )) > "$LOGS/$stage.done"
    echo "[$index/$count] $stage: done in $(cat "$LOGS/$stage.done") s; $(projection)"
}

# Seconds each stage took in the README's measured run (2-core AMD EPYC, float32). Only their
# proportions matter: the stages done on this machine give the scale, so the projection fits any machine.
REFERENCE="data=5 pretrain=373 sft=620 pairs=90 reward=158 grpo=95 ppo=214 dpo=61 sft_cot=745 grpo_cot=211 report=3"
ref() { local kv; for kv in $REFERENCE; do [ "${kv%%=*}" = "$1" ] && echo "${kv#*=}" && return; done; echo 0; }

projection() {  # the time so far and the projected rest: the remaining stages' reference seconds x (done / reference)
    local s i=0 done_s=0 done_ref=0 rest_ref=0 elapsed=$(( $(date +%s) - t_start ))
    for s in $STAGES; do
        i=$((i + 1))
        if [ "$i" -le "$index" ]; then
            [ -e "$LOGS/$s.done" ] && done_s=$((done_s + $(cat "$LOGS/$s.done"))) && done_ref=$((done_ref + $(ref "$s")))
        else
            rest_ref=$((rest_ref + $(ref "$s")))
        fi
    done
    [ "$done_ref" -gt 0 ] || { echo "$elapsed s since the start"; return; }
    local rest=$(( rest_ref * done_s / done_ref ))
    echo "$elapsed s since the start, about $rest s to go (projected total $((elapsed + rest)) s: the stages left, at this machine's pace so far, $((100 * done_s / done_ref))% of the README's run)"
}

stage() {
    case $1 in
        data)  # the corpus (unless DATASET names another), the task mix, and its worked-solution twins
            local small="" corpus="$PYTHON data/tiny_shakespeare/prepare.py --tokenizer=byte &&"
            [ "$TINY" = 1 ] && small="--train_per_cell=20 --val_per_cell=4 --extra_train_per_cell=4"
            [ "$DATASET" != tiny_shakespeare/byte ] && corpus=""
            run data bash -c "$corpus $PYTHON data/tasks/prepare.py --out_dir=$OUT/tasks $small &&
                $PYTHON data/tasks/prepare.py --cot=True --out_dir=$OUT/tasks_cot $small &&
                $PYTHON data/tasks/prepare.py --cot=True --extra_train_difficulties=4 --out_dir=$OUT/tasks_cot_rl $small" ;;
        pretrain) run pretrain "$PYTHON" train.py config/tiny_shakespeare.py --dataset="$DATASET" --out_dir="$OUT/out-shakespeare" --dtype="$DTYPE" $(tiny pretrain) ;;
        sft) run sft "$PYTHON" sft.py config/sft_tasks.py --init_from="$OUT/out-shakespeare/ckpt.pt" --sft_dataset="$(realpath "$OUT/tasks")" --out_dir="$OUT/out-sft" --dtype="$DTYPE" $(tiny sft) ;;
        pairs) run pairs bash -c "$PYTHON data/preferences/prepare.py --source=rules --tasks_dir=$(realpath "$OUT/tasks") --out_dir=$OUT/pairs/rules $(tiny pairs) &&
            $PYTHON data/preferences/prepare.py --source=policy --dtype=$DTYPE --init_from=$OUT/out-sft/ckpt.pt --tasks_dir=$(realpath "$OUT/tasks") --out_dir=$OUT/pairs/policy $(tiny pairs) &&
            $PYTHON data/preferences/prepare.py --source=policy --dtype=$DTYPE --init_from=$OUT/out-sft/ckpt.pt --tasks_dir=$(realpath "$OUT/tasks") --out_dir=$OUT/pairs/policy_rl --cells=add/3,sub/2,sub/3,sort/2,sort/3 $(tiny pairs)" ;;
        reward) run reward "$PYTHON" reward.py config/reward_tasks.py --init_from="$OUT/out-sft/ckpt.pt" --preference_dataset="$(realpath "$OUT/pairs/rules"),$(realpath "$OUT/pairs/policy")" --out_dir="$OUT/out-reward" --dtype="$DTYPE" $(tiny reward) ;;
        grpo) run grpo "$PYTHON" grpo.py config/grpo_tasks.py --init_from="$OUT/out-sft/ckpt.pt" --prompt_dataset="$(realpath "$OUT/tasks")" --out_dir="$OUT/out-grpo" --dtype="$DTYPE" $(tiny grpo) ;;
        ppo) run ppo "$PYTHON" ppo.py config/ppo_tasks.py --init_from="$OUT/out-sft/ckpt.pt" --prompt_dataset="$(realpath "$OUT/tasks")" --out_dir="$OUT/out-ppo" --dtype="$DTYPE" $(tiny ppo) ;;
        dpo) run dpo "$PYTHON" dpo.py config/dpo_tasks.py --init_from="$OUT/out-sft/ckpt.pt" --preference_dataset="$(realpath "$OUT/pairs/policy_rl")" --prompt_dataset="$(realpath "$OUT/tasks")" --out_dir="$OUT/out-dpo" --dtype="$DTYPE" $(tiny dpo) ;;
        sft_cot) run sft_cot "$PYTHON" sft.py config/sft_tasks_cot.py --init_from="$OUT/out-shakespeare/ckpt.pt" --sft_dataset="$(realpath "$OUT/tasks_cot")" --out_dir="$OUT/out-sft-cot" --dtype="$DTYPE" $(tiny sft_cot) ;;
        grpo_cot) run grpo_cot "$PYTHON" grpo.py config/grpo_tasks_cot.py --init_from="$OUT/out-sft-cot/ckpt.pt" --prompt_dataset="$(realpath "$OUT/tasks_cot_rl")" --out_dir="$OUT/out-grpo-cot" --dtype="$DTYPE" $(tiny grpo_cot) ;;
        # every column but base is a stage's answers to the whole test split, by its best.pt
        report) run report "$PYTHON" report.py --out="$OUT/report.md" --figures="$OUT/report" --times="$LOGS/times.json" \
            --pretrain_dir="$OUT/out-shakespeare" --sft_dirs="sft=$OUT/out-sft,sft_cot=$OUT/out-sft-cot" --reward_dir="$OUT/out-reward" \
            --stages="base=$OUT/out-sft@first,sft=$OUT/out-sft,grpo=$OUT/out-grpo,ppo=$OUT/out-ppo,dpo=$OUT/out-dpo,sft_cot=$OUT/out-sft-cot,grpo_cot=$OUT/out-grpo-cot" ;;
        *) echo "pipeline: unknown stage '$1' (stages: data pretrain sft pairs reward grpo ppo dpo sft_cot grpo_cot report)" >&2; exit 2 ;;
    esac
}

times_json() {  # the seconds of every stage done so far, for the report
    local sep="" s
    printf "{" > "$LOGS/times.json"
    for s in data pretrain sft pairs reward grpo ppo dpo sft_cot grpo_cot; do
        if [ -e "$LOGS/$s.done" ]; then printf '%s"%s": %s' "$sep" "$s" "$(cat "$LOGS/$s.done")" >> "$LOGS/times.json"; sep=", "; fi
    done
    printf "}\n" >> "$LOGS/times.json"
}

t_start=$(date +%s)
set -- $STAGES
count=$#
index=0
for s in "$@"; do
    index=$((index + 1))
    [ "$s" = report ] && times_json
    stage "$s"
done
times_json
echo "pipeline: done in $(( $(date +%s) - t_start )) s; the report is $OUT/report.md"
echo "chat with the last model: python sample.py --out_dir=$OUT/out-grpo-cot --chat=True (or out-sft, out-grpo, out-ppo, out-dpo)"
