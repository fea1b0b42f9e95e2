"""
The report of a pipeline run (pipeline.sh): what each stage bought, from the logs the stages wrote.

Reads every stage's out_dir/log.jsonl and the pipeline's stage times, and writes report.md:
held-out greedy exact match per task and difficulty for the base model, SFT and each alignment
stage (GRPO, PPO, DPO, and the worked-solution ones when they ran), their mean over the cells the RL
stages train on, the reward model's held-out accuracy, the KL to the reference of each RL stage,
wall-clock time per stage and in all, the git commit and the machine. With matplotlib installed it
also draws, next to the report: the training losses, reward and exact match over the RL iterations
(GRPO and PPO on one plot), the KL, and for a mixture-of-experts pretraining run the load of each
expert over the iterations, one panel per MoE layer.

    python report.py                         # after bash pipeline.sh
    python report.py --out=docs/report.md --figures=docs

A stage whose out_dir holds no log is left out of the table, and said so.

It also compares pretraining runs (train.py's logs), a MoE model against the dense one, say: their
parameters (all, and active per token), val loss at equal iterations and at equal wall-clock
(interpolated between evals), tokens/s, and the routing (load_cv, the load pictures). --stages=
leaves the pipeline's part out:

    python report.py --stages= --compare=dense=out-moe-dense,moe=out-shakespeare-moe --out=moe.md
"""

import json
import os
import platform
import sys

import torch

import common
from configurator import configure
from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
out = "report.md"  # the report to write
figures = ""  # folder for the PNG curves (empty: next to the report)
times = "out-pipeline/times.json"  # the pipeline's stage times: {"stage": seconds, ...}
# the stages: name=out_dir, in the order of the table; a column is the last held-out eval of that
# out_dir's log (a stage's answers to the test split, by its best.pt, when it wrote them), or with
# @first its first one (the model that stage started from, on that stage's dev prompts), as
# pipeline.sh passes them
stages = ("base=out-sft@first", "sft=out-sft", "grpo=out-grpo", "ppo=out-ppo", "dpo=out-dpo",
          "sft_cot=out-sft-cot", "grpo_cot=out-grpo-cot")
pretrain_dir = "out-shakespeare"
sft_dirs = ("sft=out-sft", "sft_cot=out-sft-cot")  # the fine-tuning runs whose training loss is drawn
reward_dir = "out-reward"
rl_tasks = ("add/3", "sub/2", "sub/3", "sort/2", "sort/3")  # the cells the RL stages train on
compare = ()  # pretraining runs to compare, name=out_dir: dense=out-moe-dense,moe=out-shakespeare-moe (empty: none)
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
    """The first (the model the stage started from) or the last held-out exact-match eval of a log:
    the stage's answers to the test split when it wrote them (its last line, with standard errors)."""
    evals = [r for r in rows if "em" in r and "loss" not in r]
    return (evals[0] if first else evals[-1]) if evals else None


def cells_of(columns):
    cells = sorted({k[3:] for col in columns.values() for k in col if k.startswith("em/")},
                   key=lambda c: (c.split("/")[0], int(c.split("/")[1]) if c.split("/")[1].isdigit() else 0))
    return cells


def fmt(v, se=None):
    if v is None:
        return ""
    return f"{v:.2f}" if se is None else f"{v:.3f} ± {se:.3f}"  # a test split's figure with its standard error


def table(columns):
    """Markdown: a row per task/difficulty cell, a column per stage, then the mean over the RL cells."""
    names = list(columns)
    lines = ["| task/difficulty | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for cell in cells_of(columns):
        mark = " *" if cell in rl_tasks else ""
        lines.append(f"| {cell}{mark} | " + " | ".join(fmt(columns[n].get(f"em/{cell}"), columns[n].get(f"se/{cell}"))
                                                        for n in names) + " |")
    lines.append("| all cells | " + " | ".join(fmt(columns[n].get("em")) for n in names) + " |")
    lines.append("| **RL cells (*)** | " + " | ".join(f"**{fmt(*rl_mean(columns[n], se=True))}**" for n in names) + " |")
    return "\n".join(lines)


def rl_mean(col, se=False):
    """The mean exact match over the RL cells; with se, (mean, its standard error) where the cells have
    theirs (independent cells: sqrt(sum se_i^2) / n), else (mean, None)."""
    vals = [col[f"em/{c}"] for c in rl_tasks if f"em/{c}" in col]
    mean = sum(vals) / len(vals) if vals else None
    if not se:
        return mean
    ses = [col.get(f"se/{c}") for c in rl_tasks if f"em/{c}" in col]
    return mean, (sum(x * x for x in ses) ** 0.5 / len(ses) if ses and None not in ses else None)


def draw(logs, runs, folder):
    """The PNG curves: the pipeline's when its stages are asked for (logs), the load per expert of
    every MoE pretraining run (the pipeline's and those compared, runs {name: log rows}); -> their
    file names, or a sentence saying why there are none."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "(no pictures: pip install matplotlib, then run python report.py again)"
    os.makedirs(folder, exist_ok=True)
    made = draw_pipeline(plt, logs, folder) if stages else []
    for name, rows in runs.items():
        if draw_load(plt, rows, os.path.join(folder, f"load_{name}.png"), name):
            made.append(f"load_{name}.png")
    return made


def draw_load(plt, rows, path, title):
    """The load of each expert over the iterations (the share of the routed token-expert pairs it
    got in the batch of each log line), one panel per MoE layer, the even share dashed. -> whether
    the log had any (a dense run has none)."""
    steps = [r for r in rows or [] if "load" in r]
    if not steps:
        return False
    load = torch.tensor([r["load"] for r in steps])  # (log lines, MoE layers, experts)
    iters = [r["iter"] for r in steps]
    n_layer, n_expert = load.shape[1:]
    fig, axes = plt.subplots(1, n_layer, figsize=(3.2 * n_layer, 3), sharey=True, squeeze=False)
    for layer, ax in enumerate(axes[0]):
        for e in range(n_expert):
            ax.plot(iters, load[:, layer, e].tolist(), lw=1, label=f"expert {e}")
        ax.axhline(1 / n_expert, color="k", ls="--", lw=0.8)
        ax.set_title(f"{title}: MoE layer {layer}", fontsize=9), ax.set_xlabel("iteration")
    axes[0][0].set_ylabel("load (share of routed tokens)")
    axes[0][-1].legend(fontsize=6, ncol=2)
    fig.tight_layout(), fig.savefig(path, dpi=110), plt.close(fig)
    return True


def draw_pipeline(plt, logs, folder):
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
    # the RL stages: those whose log has rollouts (a reward) or preference steps (a margin); their dev
    # evals (not the test line, which is the best checkpoint's, drawn at no iteration)
    rl = {name: rows for name, rows in logs.items() if any("reward" in r or "margin" in r for r in rows or [])}
    worked = any("work" in r and "reward" in r for rows in rl.values() for r in rows)
    fig, axes = plt.subplots(1, 3 if worked else 2, figsize=(15 if worked else 10, 3.5))
    a1, a2 = axes[0], axes[-1]
    for k, (name, rows) in enumerate(rl.items()):
        c = f"C{k}"  # one colour per stage: its rollouts solid, its held-out evals dashed
        steps = [r for r in rows if "reward" in r]
        evals = [r for r in rows if "em" in r and "loss" not in r and "of" not in r]
        if steps:
            a1.plot([r["iter"] for r in steps], [r["reward"] for r in steps], c, lw=1, label=f"{name} reward (rollouts)")
            a2.plot([r["iter"] for r in steps], [r.get("kl", 0.0) for r in steps], c, label=name)
        if evals:
            a1.plot([r["iter"] for r in evals], [rl_mean(r) for r in evals], "o--", color=c,
                    label=f"{name} held-out exact match")
        if worked and steps and "work" in steps[0]:  # the mechanism: how many replies are worked solutions
            axes[1].plot([r["iter"] for r in steps], [r["work"] for r in steps], c, lw=1, label=f"{name} rollouts (sampled)")
        if worked and any("work" in r for r in evals):
            axes[1].plot([r["iter"] for r in evals], [r.get("work", float("nan")) for r in evals], "o--", color=c,
                         label=f"{name} held-out (greedy)")
    a1.set_xlabel("iteration"), a1.set_title("reward and held-out exact match (RL cells)"), a1.legend(fontsize=7)
    a2.set_xlabel("iteration"), a2.set_title("KL to the reference per token"), a2.legend(fontsize=7)
    if worked:
        axes[1].set_xlabel("iteration"), axes[1].set_title("share of replies that are worked solutions")
        axes[1].legend(fontsize=7)
    fig.tight_layout(), fig.savefig(os.path.join(folder, "rl.png"), dpi=110), plt.close(fig)
    made.append("rl.png")
    return made


# -----------------------------------------------------------------------------
# pretraining runs compared: a MoE model against the dense one


def timeline(rows):
    """A train.py log -> (step rows, eval rows), each with t: the seconds since the start at its
    iteration. A step line's ms is the mean over the iterations since the line before, the evals
    among them included, so both runs pay for their own evals."""
    steps, t, last = [], 0.0, 0
    for r in rows:
        if "loss" in r and "ms" in r:
            t += r["ms"] / 1000 * (r["iter"] - last)
            last = r["iter"]
            steps.append(dict(r, t=t))
    clock = {0: 0.0, **{r["iter"]: r["t"] for r in steps}}
    evals = [dict(r, t=clock[r["iter"]]) for r in rows if "val_loss" in r and r["iter"] in clock]
    return steps, evals


def at_time(evals, t):
    """(val loss, iteration) at t seconds, linear between the two evals around t; None outside them."""
    for a, b in zip(evals, evals[1:] or evals):
        if a["t"] <= t <= b["t"]:
            w = (t - a["t"]) / (b["t"] - a["t"]) if b["t"] > a["t"] else 0.0
            return a["val_loss"] + w * (b["val_loss"] - a["val_loss"]), a["iter"] + w * (b["iter"] - a["iter"])
    return None


def parameters(folder):
    """(all parameters, those one token uses) of the model in folder/ckpt.pt, or None without one.
    Counted on the meta device: nothing is allocated."""
    path = os.path.join(folder, "ckpt.pt")
    if not os.path.isfile(path):
        return None
    with torch.device("meta"):
        model = GPT(GPTConfig(**common.load_checkpoint(path)["model_args"]))
    return model.num_params(), model.num_params(active=True)


def compare_runs(runs):
    """Markdown comparing pretraining runs {name: out_dir}: size, speed, val loss at equal
    iterations and at equal wall-clock, and the routing of the MoE ones."""
    logs = {name: read_log(d) for name, d in runs.items()}
    data = {name: timeline(rows) for name, rows in logs.items() if rows}
    lines = ["## Pretraining runs compared", ""]
    missing = [f"{name} ({d})" for name, d in runs.items() if name not in data]
    if missing:
        lines += [f"No log: {', '.join(missing)}.", ""]
    data = {name: (steps, evals) for name, (steps, evals) in data.items() if steps and evals}
    if not data:
        return lines
    lines += ["| run | parameters | active per token | iterations | seconds | ms per iteration | tokens/s | "
              "val loss at the end | load_cv first / last |", "| --- |" + " --- |" * 8]
    for name, (steps, evals) in data.items():
        n = parameters(runs[name])
        tok_s = sorted(r["tok_s"] for r in steps)[len(steps) // 2]  # the median line
        cv = [r["load_cv"] for r in steps if "load_cv" in r]
        lines.append(f"| {name} | {f'{n[0] / 1e6:.2f}M' if n else '?'} | {f'{n[1] / 1e6:.2f}M' if n else '?'} | "
                     f"{steps[-1]['iter']} | {steps[-1]['t']:.0f} | {1000 * steps[-1]['t'] / steps[-1]['iter']:.0f} | "
                     f"{tok_s:,} | {evals[-1]['val_loss']:.4f} | {f'{cv[0]:.3f} / {cv[-1]:.3f}' if cv else '-'} |")
    names = list(data)
    shared = sorted(set.intersection(*({e["iter"] for e in evals} for _, evals in data.values())))
    lines += ["", "Val loss at equal iterations (equal active parameters per token where the column above agrees):",
              "", "| iteration | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for it in shared:
        lines.append(f"| {it} | " + " | ".join(f"{next(e['val_loss'] for e in data[n][1] if e['iter'] == it):.4f}"
                                               for n in names) + " |")
    t = min(evals[-1]["t"] for _, evals in data.values())  # when the fastest run ended
    lines += ["", f"Val loss at equal wall-clock, {t:.0f} s (when the first run ended; linear between evals): " +
              ", ".join(f"{n} {at[0]:.4f} at iteration {at[1]:.0f}" if at else f"{n} -"
                        for n in names for at in [at_time(data[n][1], t)]) + "."]
    return lines


def pipeline_report():
    """The pipeline's part: -> (the logs by stage name, pretrain among them, the markdown lines)."""
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
    lines = ["## Held-out greedy exact match per task and difficulty", "",
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
    if stage_times:  # the pipeline's records; runs compared without it have none
        # where the minutes go: a stage's evals (held-out losses, answers, the test split) from its log
        evals = {name: sum(r["s"] for r in rows if "s" in r) for name, rows in {**logs, "reward": rm}.items()
                 if rows and any("s" in r for r in rows)}
        lines += ["", "## Time", "", "| stage | seconds | of which evals |", "| --- | --- | --- |"]
        lines += [f"| {k} | {v:.0f} | {f'{evals[k]:.0f}' if k in evals else ''} |" for k, v in stage_times.items()]
        total = sum(stage_times.values())
        lines.append(f"| **total** | **{total:.0f}** ({total / 60:.1f} min) | {sum(evals.get(k, 0) for k in stage_times):.0f} |")
    return logs, lines + [""]


def main():
    lines = ["# Pipeline report" if stages else "# Report", "",
             f"commit {common.git_commit()}, {platform.platform()}, {machine_cpu()}, python {platform.python_version()}", ""]
    logs, section = pipeline_report() if stages else ({}, [])
    runs = {name: d for name, d in (s.split("=", 1) for s in compare)}
    if compare:
        section += compare_runs(runs) + [""]
    folder = figures or os.path.dirname(os.path.abspath(out))
    pretraining = {"pretrain": logs.get("pretrain"), **{name: read_log(d) for name, d in runs.items()}}
    made = draw(logs, pretraining, folder)
    lines += section + ["## Curves", ""]
    if isinstance(made, str):
        lines.append(made)
    else:
        rel = os.path.relpath(folder, os.path.dirname(os.path.abspath(out)))
        lines += [f"![{m}]({os.path.join(rel, m)})" for m in made]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
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
