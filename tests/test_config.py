"""configurator.configure: the checked config mechanism every script shares."""

import ast
import os

import pytest

from configurator import configure, parse_value


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script_settings(script):
    """The names a script assigns at its top level: its settings."""
    with open(os.path.join(ROOT, script)) as f:
        tree = ast.parse(f.read())
    return {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)}


def defaults():
    return dict(batch_size=12, learning_rate=6e-4, compile=True, out_dir="out", n_kv_head=None,
                lora_targets=("c_q", "c_v"), start="\n")


def test_command_line_overrides_and_types(capsys):
    g = defaults()
    config = configure(g, ["--batch_size=32", "--learning_rate=1", "--compile=false", "--n_kv_head=2"])
    assert g["batch_size"] == 32 and isinstance(g["batch_size"], int)
    assert g["learning_rate"] == 1.0 and isinstance(g["learning_rate"], float)
    assert g["compile"] is False
    assert g["n_kv_head"] == 2
    assert config == {k: g[k] for k in config}
    assert "batch_size=32" in capsys.readouterr().out


@pytest.mark.parametrize("text, value", [("true", True), ("True", True), ("1", True),
                                         ("false", False), ("False", False), ("0", False)])
def test_booleans(text, value):
    assert parse_value("compile", True, text) is value


def test_value_may_contain_equals():
    g = defaults()
    configure(g, ["--start=a=b==c"], verbose=False)
    assert g["start"] == "a=b==c"


def test_tuple_values():
    assert parse_value("lora_targets", ("c_q",), "c_q,c_k,c_v") == ("c_q", "c_k", "c_v")
    assert parse_value("lora_targets", ("c_q",), "('c_q', 'mlp')") == ("c_q", "mlp")
    assert parse_value("lora_targets", ("c_q",), "lm_head") == ("lm_head",)
    assert parse_value("decode_lengths", (128, 256), "512") == (512,)
    assert parse_value("decode_lengths", (128, 256), "128,512") == (128, 512)


def test_none_default_takes_literals():
    assert parse_value("n_kv_head", None, "None") is None
    assert parse_value("n_kv_head", None, "4") == 4
    assert parse_value("init_from", None, "out/ckpt.pt") == "out/ckpt.pt"


@pytest.mark.parametrize("arg, fragment", [
    ("--batch_size=3.5", "'batch_size' expects an int, got '3.5'"),
    ("--learning_rate=fast", "'learning_rate' expects a float, got 'fast'"),
    ("--compile=maybe", "'compile' expects a bool"),
    ("--batchsize=3", "unknown config key 'batchsize'"),
    ("--batch_size", "expected --key=value"),
    ("config/does_not_exist.py", "not found"),
])
def test_bad_command_line_raises(arg, fragment):
    with pytest.raises(ValueError) as e:
        configure(defaults(), [arg], verbose=False)
    assert fragment in str(e.value)


def test_a_renamed_key_says_its_new_name():
    with pytest.raises(ValueError, match=r"unknown config key 'ckpt' on the command line \(it is called init_from now\)"):
        configure(dict(defaults(), init_from=""), ["--ckpt=a.pt"], verbose=False)
    with pytest.raises(ValueError, match=r"unknown config key 'group_size' on the command line$"):
        configure(defaults(), ["--group_size=8"], verbose=False)  # no samples_per_prompt here: no hint


def test_config_file_is_checked(tmp_path):
    good = tmp_path / "good.py"
    good.write_text("import math\nbatch_size = 4 * 8\nlearning_rate = 1\nout_dir = out_dir + '-x'\n")
    g = defaults()
    configure(g, [str(good), "--batch_size=7"], verbose=False)  # the command line comes last
    assert g["batch_size"] == 7 and g["learning_rate"] == 1.0 and g["out_dir"] == "out-x"

    typo = tmp_path / "typo.py"
    typo.write_text("batchsize = 4\n")
    with pytest.raises(ValueError, match=r"unknown config key 'batchsize' in .*typo.py"):
        configure(defaults(), [str(typo)], verbose=False)

    wrong = tmp_path / "wrong.py"
    wrong.write_text("compile = 'yes please'\n")
    with pytest.raises(ValueError, match="'compile' expects a bool"):
        configure(defaults(), [str(wrong)], verbose=False)


@pytest.mark.parametrize("script", ["train.py", "sft.py", "reward.py", "grpo.py", "ppo.py", "dpo.py"])
def test_every_stage_has_the_settings_its_loop_and_its_model_read_by_name(script):
    # common.Loop and model_from_checkpoint take these from a stage's config by their names: a
    # setting renamed in one script must fail here, not at the start of a run
    from dataclasses import fields

    import common

    settings = script_settings(script)
    needed = {f.name for f in fields(common.LoopSettings)} | set(common.TRAINING_FIELDS)
    assert needed <= settings, sorted(needed - settings)


def test_train_py_takes_every_moe_field_and_the_moe_config_is_the_dense_one_plus_experts(monkeypatch):
    # every MoE field of GPTConfig is a train.py setting of the same name (the command line used to
    # stop at --n_expert with "unknown config key"); the MoE config compares with the dense one
    # because everything else is the same
    import runpy

    settings = script_settings("train.py")
    moe = {"n_expert", "n_expert_active", "moe_every", "n_shared_expert", "expert_hidden", "moe_aux_coef", "moe_z_coef"}
    assert moe <= settings, sorted(moe - settings)
    monkeypatch.chdir(ROOT)  # a config file reads the one it extends from the repository root, as the scripts run
    dense = runpy.run_path(os.path.join(ROOT, "config", "tiny_shakespeare.py"))
    experts = runpy.run_path(os.path.join(ROOT, "config", "tiny_shakespeare_moe.py"))
    plain = lambda ns: {k: v for k, v in ns.items() if not k.startswith("__")}  # noqa: E731
    assert {k: v for k, v in plain(experts).items() if plain(dense).get(k, object()) != v} == {
        "out_dir": "out-shakespeare-moe", "n_expert": 8, "n_expert_active": 2, "moe_every": 1, "n_shared_expert": 0,
        "moe_aux_coef": 0.01, "moe_z_coef": 0.001}
    assert set(plain(dense)) <= set(plain(experts))


def test_train_py_sets_every_architecture_field_but_those_it_leaves_to_checkpoints():
    # train.py passes GPTConfig the settings named like its fields: a field renamed in model.py
    # would leave train.py's old setting unread and the new default in force, so say it here
    from dataclasses import fields

    from model import GPTConfig

    settings = script_settings("train.py")
    # vocab_size comes from the data's meta; the others only from imported checkpoints (Hugging Face
    # layouts) or later stages (a reward model's scalar head)
    left = {"vocab_size", "gelu_approximate", "n_inner", "norm_eps", "qkv_bias", "scalar_head"}
    assert {f.name for f in fields(GPTConfig)} - settings == left


def test_every_config_file_sets_only_settings_its_script_has(monkeypatch):
    # a config's stage is its name's first word (sft_tasks_mix.py -> sft.py; the rest are train.py's)
    import runpy

    monkeypatch.chdir(ROOT)  # configs exec the config they build on by its path from the repo root
    stages = {"sft", "reward", "grpo", "ppo", "dpo"}
    for name in sorted(os.listdir(os.path.join(ROOT, "config"))):
        if not name.endswith(".py"):
            continue
        stage = name.split("_")[0]
        script = f"{stage}.py" if stage in stages else "train.py"
        keys = {k for k in runpy.run_path(os.path.join("config", name)) if not k.startswith("__")}
        settings = script_settings(script)
        assert keys <= settings, (name, sorted(keys - settings))
