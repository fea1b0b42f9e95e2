"""
The settings of every script, as nanoGPT's configurator.py takes them, but checked. A script
declares its settings as module globals and then calls

    config = configure(globals())

which applies, in order, every `config/*.py` file and every `--key=value` argument found on the
command line. For example:

    python train.py config/tiny_shakespeare.py --batch_size=32 --compile=false

An unknown key fails (from a file or the command line), an int is accepted where a float is
expected, true/false/1/0 parse as booleans, and a wrong type raises ValueError naming the key. The
resolved config is printed, and the stages store it in every checkpoint.
"""

import ast
import os
import sys

_SIMPLE_TYPES = (bool, int, float, str, type(None), tuple, list)
_TRUE = {"true", "True", "1", "yes"}
_FALSE = {"false", "False", "0", "no"}


def config_keys(g):
    """The settings of a script: its public module globals of simple types, except CONSTANTS."""
    return [k for k, v in g.items() if not k.startswith("_") and not k.isupper() and isinstance(v, _SIMPLE_TYPES)]


def parse_value(key, default, value):
    """Convert `value` (a string from the command line, or any object from a config file) to the
    type of `default`. Raises ValueError naming the key, the expected type and the value given."""

    def fail(expected):
        raise ValueError(f"config key {key!r} expects {expected}, got {value!r}")

    if isinstance(default, bool):  # before int: bool is a subclass of int
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value in _TRUE | _FALSE:
            return value in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        fail("a bool (true/false/1/0)")
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
            try:  # accept "1e4" for an int when it is a whole number
                f = float(value)
                if f.is_integer():
                    return int(f)
            except ValueError:
                pass
        fail("an int")
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        fail("a float")
    if isinstance(default, str):
        if isinstance(value, str):
            return value
        fail("a str")
    if isinstance(default, (tuple, list)):
        if isinstance(value, str):
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                # a bare comma-separated list: --lora_targets=q,v
                value = tuple(s for s in value.split(",") if s)
        if isinstance(value, (str, int, float)):  # a single item: --decode_lengths=512
            value = (value,)
        if isinstance(value, (tuple, list)):
            return type(default)(value)
        fail("a tuple")
    # default None: the setting is optional; take a Python literal if it is one, else the string
    if isinstance(value, str):
        if value in ("None", "none", "null"):
            return None
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    return value


# settings that were renamed, so that an old command line says what the key is called now
RENAMED = {"group_size": "samples_per_prompt", "grpo_iterations": "update_epochs", "ppo_epochs": "update_epochs",
           "ckpt": "init_from"}


def renamed(key, config):
    """A hint for an unknown key that this script knows by another name now, else ""."""
    new = RENAMED.get(key)
    return f" (it is called {new} now)" if new in config else ""


def configure(g, argv=None, verbose=True, stream=None):
    """Override the settings in `g` (a script's globals()) from config files and --key=value
    arguments. Returns the resolved config as a dict, which is also written back into `g`, and
    prints it (to stdout, or `stream`)."""
    if argv is None:  # called by a script: a bad setting ends it with the message, no traceback
        try:
            return configure(g, sys.argv[1:], verbose, stream)
        except ValueError as e:
            sys.exit(f"config error: {e}")
    keys = config_keys(g)
    config = {k: g[k] for k in keys}
    for arg in argv:
        if not arg.startswith("--"):
            # a config file: run it in a namespace seeded with the current values, so it may read
            # them (lr_decay_iters = max_iters), then take back every plain value it set
            if not os.path.isfile(arg):
                raise ValueError(f"config file {arg!r} not found (and not a --key=value argument)")
            ns = dict(config)
            with open(arg) as f:
                exec(compile(f.read(), arg, "exec"), ns)
            for k, v in ns.items():
                if k.startswith("_") or k == "__builtins__" or callable(v) or type(v).__name__ == "module":
                    continue
                if k not in config:
                    raise ValueError(f"unknown config key {k!r} in {arg}{renamed(k, config)}")
                if v is not config[k]:
                    config[k] = parse_value(k, g[k], v)
        else:
            key, sep, value = arg[2:].partition("=")  # only the first '=' splits
            if not sep:
                raise ValueError(f"expected --key=value, got {arg!r}")
            if key not in config:
                raise ValueError(f"unknown config key {key!r} on the command line{renamed(key, config)}")
            config[key] = parse_value(key, g[key], value)
    g.update(config)
    if verbose:
        print("config: " + " ".join(f"{k}={v!r}" for k, v in config.items()), file=stream or sys.stdout)
    return config
