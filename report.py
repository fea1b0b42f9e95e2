"""
The report of a pipeline run (pipeline.sh): what each stage bought, from the logs the stages wrote.

Reads every stage's out_dir/log.jsonl and the pipeline's stage times, and writes report.md:
held-out greedy exact match per task and difficulty for the base model, SFT and each alignment
stage (GRPO, PPO, DPO, and the worked-solution ones when they ran), their mean over the cells the RL
stages train on, the reward model's held-out accuracy, the KL to the reference of each RL stage,
wall-clock time per stage and in all, the git commit and the machine. With matplotlib installed it
also draws, next to the report: the training losses, reward and exact match over the RL iterations
(GRPO and PPO on one plot), and the KL.

    python report.py                         # after bash pipeline.sh
    python report.py --out=docs/report.md --figures=docs

A stage whose out_dir holds no log is left out of the table, and said so.
"""

import json
import os
import platform
import sys

import common
from configurator import configure

# -----------------------------------------------------------------------------
out = "report.md"  # the report to write
figures = ""  # folder for the PNG curves (empty: next to the report)
times = "out-pipeline/times.json"  # the pipeline's stage times: {"stage": seconds, ...}
# the stages: name=out_dir, in the order of the table; a column is the last held-out eval of that
# out_dir's log, or with @first its first one (the model that stage started from, on that stage's
# prompts): SFT's columns are the first evals of the GRPO runs that start from them, on every held-out
# prompt as the later stages are (sft.py's own evals answer 240), as pipeline.sh passes them
stages = ("base=out-sft@first", "sft=out-grpo@first", "grpo=out-grpo", "ppo=out-ppo", "dpo=out-dpo",
          "sft_cot=out-grpo-cot@first", "grpo_cot=out-grpo-cot")
pretrain_dir = "out-shakespeare"
sft_dirs = ("sft=out-sft", "sft_cot=out-sft-cot")  # the fine-tuning runs whose training loss is drawn
reward_dir = "out-reward"
rl_tasks = ("add/3", "sub/2", "sub/3", "sort/2", "sort/3")  # the cells the RL stages train on
# -----------------------------------------------------------------------------


def read_log(folder):
    path = os.path.join(folder, "log.jsonl")
    if not os.path.isfile(path):
        return None
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    return rows


def answers(rows, first=False):
    """The first (the model the stage started from) or the last held-out exact-match eval of a log."""
    evals = [r for r in rows if "em" in r and "loss" not in r]
    return (evals[0] if first else evals[-1]) if evals else None


def cells_of(columns):
    cells = sorted({k[3:] for col in columns.values() for k in col if k.startswith("em/")},
                   key=lambda c: (c.split("/")[0], int(c.split("/")[1]) if c.split("/")[1].isdigit() else 0))
    return cells


def fmt(v):
    return "" if v is None else f"{v:.2f}"


def table(columns):
    """Markdown: a row per task/difficulty cell, a column per stage, then the mean over the RL cells."""
    names = list(columns)
    lines = ["| task/difficulty | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for cell in cells_of(columns):
        mark = " *" if cell in rl_tasks else ""
        lines.append(f"| {cell}{mark} | " + " | ".join(fmt(columns[n].get(f"em/{cell}")) for n in names) + " |")
    lines.append("| all cells | " + " | ".join(fmt(columns[n].get("em")) for n in names) + " |")
    lines.append("| **RL cells (*)** | " + " | ".join(f"**{fmt(rl_mean(columns[n]))}**" for n in names) + " |")
    return "\n".join(lines)


def rl_mean(col):
    vals = [col[f"em/{c}"] for c in rl_tasks if f"em/{c}" in col]
    return sum(vals) / len(vals) if vals else None


def draw(logs, folder):
    """The PNG curves; -> their file names, or a sentence saying why there are none."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "(no pictures: pip install matplotlib, then run python report.py again)"
    os.makedirs(folder, exist_ok=True)
    made = []
    fig, ax = plt.subplots(figsize=(6, 3.5))
    trained = {"pretrain": logs.get("pretrain")}
    trained.update({name: read_log(d) for name, d in (s.split("=", 1) for s in sft_dirs)})
    for name, rows in trained.items():
        steps = [r for r in rows or [] if "loss" in r and "iter" in r]
        if steps:
            ax.plot([r["iter"] for r in steps], [r["loss"] for r in steps], label=name)
    ax.set_xlabel("iteration"), ax.set_ylabel("training loss (cross-entropy)"), ax.set_yscale("log"), ax.legend()
    fig.tight_layout(), fig.savefig(os.path.join(folder, "loss.png"), dpi=110), plt.close(fig)
    made.append("loss.png")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
    for name in ("grpo", "ppo", "grpo_cot"):
        rows = logs.get(name) or []
        steps = [r for r in rows if "reward" in r]
        evals = [r for r in rows if "em" in r and "loss" not in r]
        if steps:
            a1.plot([r["iter"] for r in steps], [r["reward"] for r in steps], label=f"{name} reward (rollouts)")
            a2.plot([r["iter"] for r in steps], [r.get("kl", 0.0) for r in steps], label=name)
        if evals:
            a1.plot([r["iter"] for r in evals], [rl_mean(r) for r in evals], "o--", label=f"{name} held-out exact match")
    a1.set_xlabel("iteration"), a1.set_title("reward and held-out exact match (RL cells)"), a1.legend(fontsize=7)
    a2.set_xlabel("iteration"), a2.set_title("KL to the reference per token"), a2.legend(fontsize=7)
    fig.tight_layout(), fig.savefig(os.path.join(folder, "rl.png"), dpi=110), plt.close(fig)
    made.append("rl.png")
    return made


def main():
    specs = dict(s.split("=", 1) for s in stages)
    stage_dirs = {name: d.removesuffix("@first") for name, d in specs.items()}
    firsts = {name for name, d in specs.items() if d.endswith("@first")}  # columns from the first eval
    logs = {name: read_log(d) for name, d in stage_dirs.items()}
    logs["pretrain"] = read_log(pretrain_dir)
    columns, missing = {}, []
    for name, rows in logs.items():
        if name == "pretrain":
            continue
        ev = answers(rows, first=name in firsts) if rows else None
        if ev is None:
            missing.append(f"{name} ({stage_dirs[name]})")
        else:
            columns[name] = ev
    stage_times = {}
    if os.path.isfile(times):
        with open(times) as f:
            stage_times = json.load(f)
    lines = ["# Pipeline report", "",
             f"commit {common.git_commit()}, {platform.platform()}, {machine_cpu()}, python {platform.python_version()}", ""]
    lines += ["## Held-out greedy exact match per task and difficulty", "",
              "Greedy answers to held-out prompts, exact match after stripping whitespace; * marks the cells the RL "
              "stages train on; base is the pretrained model before SFT.", "", table(columns) if columns else "(no evals)",
              ""]
    started = [f"{name} is the first eval in {stage_dirs[name]}" for name in stage_dirs
               if name in firsts and name in columns]
    if started:
        lines += ["Columns measured where a later stage started: " + "; ".join(started) + ".", ""]
    if missing:
        lines += [f"Not in the table (no log with an eval): {', '.join(missing)}.", ""]
    lines += ["## Alignment stages", ""]
    rm = read_log(reward_dir)
    if rm:
        ev = [r for r in rm if "val_loss" in r]
        if ev:
            keys = {k: v for k, v in ev[-1].items() if k.endswith("acc") or k.endswith("spearman") or k.endswith("ece")}
            lines.append("Reward model (held-out pairs): " + ", ".join(f"{k} {v:.3f}" for k, v in keys.items()))
    for name in ("grpo", "ppo", "dpo", "grpo_cot"):
        rows = logs.get(name)
        if rows:
            kls = [r["kl"] for r in rows if "kl" in r]
            if kls:
                lines.append(f"{name}: KL to the reference per token at the end {kls[-1]:.4f} (max {max(kls):.4f})")
    lines += ["", "## Time", "", "| stage | seconds |", "| --- | --- |"]
    lines += [f"| {k} | {v:.0f} |" for k, v in stage_times.items()]
    if stage_times:
        lines.append(f"| **total** | **{sum(stage_times.values()):.0f}** ({sum(stage_times.values()) / 60:.1f} min) |")
    folder = figures or os.path.dirname(os.path.abspath(out))
    made = draw(logs, folder)
    lines += ["", "## Curves", ""]
    if isinstance(made, str):
        lines.append(made)
    else:
        rel = os.path.relpath(folder, os.path.dirname(os.path.abspath(out)))
        lines += [f"![{m}]({os.path.join(rel, m)})" for m in made]
    with open(out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {out}" + ("" if isinstance(made, str) else f" and {', '.join(made)} in {folder}"))


def machine_cpu():
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "cpu")
    except OSError:
        name = platform.processor() or "cpu"
    return f"{name}, {os.cpu_count()} cores"


if __name__ == "__main__":
    configure(globals())
    try:
        main()
    except (OSError, ValueError, json.JSONDecodeError) as e:
        sys.exit(f"error: {e}")
