"""
Sampling: continue a prompt with a trained model, streaming the text as it is generated.

Reads out_dir/best.pt (or out_dir/ckpt.pt when no best was kept), or the file named by --init_from,
which may also be a checkpoint written by nanoGPT's train.py, or a Hugging Face model folder
(GPT-2, Llama, SmolLM2, Mistral, Qwen2 or Mixtral layout: config.json, model.safetensors and a
byte-level BPE's tokenizer files). The model is built from the checkpoint's stored config and the
tokenizer from its stored meta: no data folder is needed.

    python sample.py --out_dir=out-shakespeare
    python sample.py --out_dir=out-shakespeare --start="ROMEO:" --num_samples=1 --max_new_tokens=2000
    python sample.py --out_dir=out-shakespeare --start=FILE:prompt.txt --temperature=0 --use_cache=false
    python sample.py --init_from=../nanoGPT/out-shakespeare-char/ckpt.pt \
        --nanogpt_meta=../nanoGPT/data/shakespeare_char/meta.pkl
    python sample.py --init_from=gpt2 --start="The meaning of life is" --temperature=0  # a folder

Export a checkpoint for transformers (AutoModelForCausalLM, AutoTokenizer), then exit; a
mixture-of-experts model goes out as MixtralForCausalLM, or is refused with what Mixtral lacks:
    python sample.py --out_dir=out-sft --export_hf=out-sft-hf
    python sample.py --out_dir=out-shakespeare-moe --export_hf=out-shakespeare-moe-hf

Quantize the weights at load (weight-only, quantize.py), or write a quantized checkpoint that
loads anywhere a checkpoint is taken. With bf16 activations (--dtype=bfloat16) the CPU's int8 and
int4 kernels run; with float32 ones each matmul usually dequantizes its weight (quantize.QUANT_PATHS):
    python sample.py --out_dir=out-shakespeare --quantize=int8 --dtype=bfloat16
    python sample.py --out_dir=out-shakespeare --quantize=int4 --quant_group_size=64 --export_quantized=out-shakespeare/int4.pt
    python sample.py --init_from=out-shakespeare/int4.pt

Decoding faster on this machine, each kept only where it measures faster here (autotune.py): the
compiled decode step, and on a multi-core CPU the split-weight matmul:
    python sample.py --out_dir=out-shakespeare --compile=true --split_linear=true

It prints each sample as it is generated, separated by a line of dashes, and on stderr the speed:
    [sample 1: 500 tokens in 1.42s, 352 tokens/s]

Chat with a fine-tuned model (sft.py): each turn renders the conversation so far with the chat
template (bpe.Tokenizer.render_prompt) and streams the reply until the model closes it with <|end|>.
An empty line is ignored, /reset starts a new conversation, Ctrl-D or Ctrl-C at the prompt leaves,
Ctrl-C during a reply cuts it short (the turn is forgotten). With --start it answers that one
prompt and exits.
    python sample.py --out_dir=out-sft --chat=True
    python sample.py --out_dir=out-sft --chat=True --start="What is 12 + 34?" --temperature=0

Chat in the browser instead (webchat.py; a base model's page continues a prompt): a page on
http://127.0.0.1:8000 with the reply streamed as it decodes, stop and new-conversation buttons,
temperature / top-k / max tokens, and each reply's tokens/s. It binds to 127.0.0.1, this machine
only; --host=0.0.0.0 opens it to anyone who can reach the port, with no password: only on a
network you trust.
    python sample.py --out_dir=out-sft --serve=8000
"""

import codecs
import os
import pickle
import sys
import time
from dataclasses import asdict

import torch

import autotune
import bpe
import common
import webchat
from configurator import configure
from convert import from_nanogpt, save_hf, save_hf_tokenizer
from model import GPT
from quantize import quantize_model

# -----------------------------------------------------------------------------
# I/O
out_dir = "out"  # where train.py wrote its checkpoints
init_from = ""  # a checkpoint file to load instead of out_dir's (nanoGPT's ckpt.pt files work too), or a Hugging Face folder
nanogpt_meta = ""  # a nanoGPT char-level meta.pkl, for a nanoGPT checkpoint of such a dataset
export_hf = ""  # a folder to write the model to for transformers (config.json, model.safetensors, tokenizer), then exit
export_quantized = ""  # a checkpoint file to write the model to as quantize makes it (smaller), then exit
# sampling
start = "\n"  # the prompt, or FILE:path to read it from a file
allow_special = False  # True: special-token strings in the prompt (<|endoftext|>) become those tokens
num_samples = 3
max_new_tokens = 500  # past block_size the context is cropped, unless the model has a rolling cache
temperature = 0.8  # 0 = greedy
top_k = 200  # keep the k most likely tokens (0 = all)
top_p = 1.0  # nucleus sampling: keep the smallest set with this probability (1.0 = all)
use_cache = True  # False recomputes the whole context every token (the slow reference)
chat = False  # True: a multi-turn chat in the chat template; a non-blank --start is answered, then it exits
system = ""  # chat: a system message that opens the conversation (empty: none)
# chat in the browser (webchat.py)
serve = 0  # a port: serve the chat page on it instead of sampling (0 = off)
host = "127.0.0.1"  # serve: the address to bind; 0.0.0.0 opens the model to the whole network, with no password
# system
seed = 1337
device = "auto"
dtype = "auto"  # auto | float32 | bfloat16 | float16
quantize = "none"  # none | int8 | int4: weight-only, applied at load (a quantized checkpoint loads as it was stored)
quant_group_size = 64  # int4: inputs that share one scale, 32 | 64 | 128
compile = False  # torch.compile the decode step, kept only where it measures faster (autotune.compile_decode)
split_linear = False  # the split-weight decode matmul, kept where it measures faster (autotune.split_linear)
# -----------------------------------------------------------------------------


class CharTokenizer:
    """The character vocabulary of a nanoGPT char-level dataset (its meta.pkl)."""

    kind = "char"
    special_tokens = {}

    @property
    def n_vocab(self):
        return len(self.itos)

    def __init__(self, path):
        class OnlyBuiltins(pickle.Unpickler):  # meta.pkl is dicts of str and int; refuse anything else
            def find_class(self, module, name):
                raise pickle.UnpicklingError(f"{path}: unexpected object {module}.{name} in a meta.pkl")

        try:
            with open(path, "rb") as f:
                meta = OnlyBuiltins(f).load()
            self.stoi, self.itos = meta["stoi"], meta["itos"]
        except (OSError, pickle.UnpicklingError, KeyError, EOFError) as e:
            raise ValueError(f"cannot read nanoGPT meta {path}: {e}") from None

    def encode(self, text, allowed_special=()):
        missing = sorted(set(c for c in text if c not in self.stoi))
        if missing:
            raise ValueError(f"the prompt has characters the model's vocabulary lacks: {missing}")
        return [self.stoi[c] for c in text]

    def decode_bytes(self, ids):
        return "".join(self.itos[i] for i in ids).encode()


def load(out_dir, ckpt_path):
    """-> (model, tokenizer, checkpoint path, meta, stage) from a checkpoint of ours (meta: its
    dataset's and tokenizer's; stage: the script that wrote it, pretrain | sft | ...) or of nanoGPT
    (meta and stage None), quantized as the checkpoint or quantize says."""
    if not ckpt_path:
        if not os.path.isdir(out_dir):
            raise FileNotFoundError(f"out_dir {out_dir!r} does not exist; train first or pass --init_from=FILE")
        best, last = os.path.join(out_dir, "best.pt"), os.path.join(out_dir, "ckpt.pt")
        ckpt_path = best if os.path.isfile(best) else last
    checkpoint = common.load_checkpoint(ckpt_path)
    if "meta" in checkpoint:  # ours, quantized or not
        model = common.model_from_checkpoint(checkpoint, ckpt_path, quantize=quantize, quant_group_size=quant_group_size)
        meta = checkpoint["meta"]
        return model, bpe.tokenizer_from_meta(meta), ckpt_path, meta, checkpoint.get("stage")
    # nanoGPT's: no meta; a char-level vocabulary from its meta.pkl, else GPT-2's
    config, state_dict = from_nanogpt(checkpoint["model"], checkpoint["model_args"])
    if nanogpt_meta:
        tokenizer = CharTokenizer(nanogpt_meta)
    elif config.vocab_size in (50257, 50304):
        tokenizer = bpe.gpt2_tokenizer(("<|endoftext|>",))
    else:
        raise ValueError(f"{ckpt_path} is a nanoGPT checkpoint with a {config.vocab_size}-token vocabulary: "
                         f"pass its char-level meta.pkl with --nanogpt_meta=PATH")
    model = GPT(config)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {ckpt_path} does not fit its own model config: {e}") from None
    return quantize_model(model, quantize, quant_group_size), tokenizer, ckpt_path, None, None


def encode_prompt(tokenizer, text):
    specials = [s for s in tokenizer.special_tokens if s in text]
    if specials and not allow_special:
        print(f"note: the prompt contains {specials}; encoding them as plain text "
              f"(--allow_special=true makes them the special tokens)", file=sys.stderr)
    ids = tokenizer.encode(text, allowed_special=set(specials) if allow_special else ())
    if not ids:
        ids = [tokenizer.special_id("<|endoftext|>")]  # an empty prompt starts a new document
    return ids


def main():
    if temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0 or max_new_tokens < 0 or num_samples < 1:
        raise ValueError("need temperature >= 0, top_k >= 0, 0 < top_p <= 1, max_new_tokens >= 0, num_samples >= 1")
    if not 0 <= serve <= 65535:
        raise ValueError(f"serve={serve} is not a port (1..65535, or 0 = off)")
    dev = common.pick_device(device)
    device_type = "cuda" if dev.startswith("cuda") else dev
    dt = common.pick_dtype(dtype, device_type)
    model, tokenizer, path, meta, stage = load(out_dir, init_from)
    model.eval().to(dev)
    q = model.quantization or {}
    weights = f", int{q['bits']} weights" + (f" in groups of {q['group_size']}" if q["group_size"] else "") if q else ""
    print(f"loaded {path}: {model.num_params() / 1e6:.2f}M parameters, {tokenizer.kind} tokenizer{weights}", file=sys.stderr)
    if export_hf:
        return export(model, tokenizer, export_hf)
    if export_quantized:
        return save_quantized(model, meta, stage, path, export_quantized)
    if dt == "auto":  # a CPU with bf16 instructions: bf16 weights only where they measure faster here
        model, dt = autotune.decode_dtype(model, dev)
        print(f"dtype auto: decoding in {dt} (measured)", file=sys.stderr)
    amp = common.autocast(device_type, dt)
    if split_linear:  # the split-weight matmul, where it measures faster here
        print(f"split_linear: {autotune.split_linear(model) or 'nothing to split'} (measured)", file=sys.stderr)
    if compile:  # the decode step over a static cache, kept only where it measures faster here
        choice, eager_ms, compiled_ms = autotune.compile_decode(model)
        print(f"decode step: eager {eager_ms:.2f} ms, compiled {compiled_ms:.2f} ms: using {choice}", file=sys.stderr)
    if serve:
        # a fine-tuned model chats; a pretrained one continues a prompt (our tokenizers reserve the
        # chat tokens from the start, so the tokenizer alone does not tell)
        chats = bpe.has_chat_template(tokenizer) and stage != "pretrain"
        chat_page = webchat.Chat(model, tokenizer, dev, amp, path, chats, system, temperature, top_k, top_p,
                                 max_new_tokens, use_cache, seed)
        return webchat.serve(chat_page, host, serve)
    text = start
    if start.startswith("FILE:"):
        with open(start[5:], encoding="utf-8") as f:
            text = f.read()
    if chat:
        return chat_loop(model, tokenizer, dev, amp, text if text.strip() else None)
    prompt = torch.tensor(encode_prompt(tokenizer, text), dtype=torch.long, device=dev)[None]
    generator = torch.Generator(dev).manual_seed(seed)
    for k in range(num_samples):
        # bytes of one character may be split over tokens: decode them incrementally
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        sys.stdout.write(text)
        t0 = time.time()
        with amp:
            steps = model.generate_tokens(prompt, max_new_tokens, temperature, top_k or None,
                                          top_p if top_p < 1.0 else None, use_cache, generator,
                                          vocab_limit=tokenizer.n_vocab)
            for token, _ in steps:
                sys.stdout.write(utf8.decode(tokenizer.decode_bytes([int(token[0])])))
                sys.stdout.flush()
        sys.stdout.write(utf8.decode(b"", final=True) + "\n" + "-" * 40 + "\n")
        dt = time.time() - t0
        print(f"[sample {k + 1}: {max_new_tokens} tokens in {dt:.2f}s, {max_new_tokens / dt:.0f} tokens/s]", file=sys.stderr)


def export(model, tokenizer, folder):
    """Write the model, and its tokenizer where that has a Hugging Face form, into a folder that
    transformers' AutoModelForCausalLM and AutoTokenizer load. Generation there stops at
    <|end|> (the end of a chat reply) or <|endoftext|> (the end of a document)."""
    specials = tokenizer.special_tokens
    eos = [specials[name] for name in ("<|end|>", "<|endoftext|>") if name in specials]
    hf = save_hf(model, folder, bos_token_id=specials.get("<|endoftext|>"), eos_token_id=eos or None)
    written = "config.json, model.safetensors"
    if not isinstance(tokenizer, bpe.Tokenizer):
        print(f"note: a {tokenizer.kind} vocabulary has no Hugging Face form; no tokenizer files written", file=sys.stderr)
    else:
        try:
            save_hf_tokenizer(tokenizer, folder, model_max_length=model.config.block_size)
            written += ", tokenizer.json, tokenizer_config.json"
        except ValueError as e:
            print(f"note: the tokenizer is not written: {e}", file=sys.stderr)
    print(f"wrote {written} to {folder}: {hf['architectures'][0]}" +
          (" (LoRA adapters merged)" if model.config.lora_rank else ""), file=sys.stderr)


def save_quantized(model, meta, stage, path, out):
    """Write the model as it is now (quantize=int8 | int4: the integers and scales, and the format
    in the checkpoint's "quantization" entry) to the checkpoint file out, which loads wherever a
    checkpoint is taken."""
    if not model.quantization:
        raise ValueError("export_quantized needs quantize=int8 or quantize=int4 (or a quantized checkpoint)")
    if meta is None:
        raise ValueError(f"export_quantized: {path} carries no tokenizer (meta): only checkpoints of this repository")
    common.save_checkpoint({"model": model.state_dict(), "model_args": asdict(model.config),
                            "quantization": model.quantization, "meta": meta, "stage": stage, "source": path,
                            "git": common.git_commit()}, out)
    print(f"wrote {out}: {os.path.getsize(out) / 1e6:.1f} MB ({os.path.getsize(path) / 1e6:.1f} MB as read from {path})"
          if os.path.isfile(path) else f"wrote {out}", file=sys.stderr)


# -----------------------------------------------------------------------------
# chat


def reply(model, tokenizer, history, dev, amp, generator):
    """Stream the assistant's reply to the conversation `history` to stdout; return its text."""
    cfg, end = model.config, tokenizer.special_id("<|end|>")
    room = min(max_new_tokens, cfg.block_size // 2)
    while not cfg.unbounded_positions and len(history) > 1 and len(tokenizer.render_prompt(history)) + room > cfg.block_size:
        # the model has seen no more than block_size tokens at once: forget the oldest turns,
        # the system message last, so the newest message and room for a reply still fit
        del history[next((i for i, m in enumerate(history[:-1]) if m["role"] != "system"), 0)]
    prompt = torch.tensor(tokenizer.render_prompt(history), dtype=torch.long, device=dev)[None]
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    ids = []
    with amp:
        for token, _ in model.generate_tokens(prompt, max_new_tokens, temperature, top_k or None,
                                              top_p if top_p < 1.0 else None, use_cache, generator,
                                              vocab_limit=tokenizer.n_vocab):
            if int(token[0]) == end:  # the model closes its turn
                break
            ids.append(int(token[0]))
            sys.stdout.write(utf8.decode(tokenizer.decode_bytes(ids[-1:])))
            sys.stdout.flush()
    sys.stdout.write(utf8.decode(b"", final=True) + "\n")
    sys.stdout.flush()
    return tokenizer.decode(ids)


def chat_loop(model, tokenizer, dev, amp, question=None):
    """One answer to `question`, or, without one, a conversation read from the terminal."""
    if not bpe.has_chat_template(tokenizer):
        raise ValueError(f"chat needs a checkpoint whose tokenizer has the chat tokens (<|user|>, <|assistant|>, "
                         f"<|end|>); this one is {tokenizer.kind} with {list(tokenizer.special_tokens)}")
    generator = torch.Generator(dev).manual_seed(seed)
    opening = [{"role": "system", "content": system}] if system else []
    if question is not None:
        reply(model, tokenizer, opening + [{"role": "user", "content": question}], dev, amp, generator)
        return
    history = list(opening)
    print("chat: type a message; /reset starts over; Ctrl-D or Ctrl-C leaves", file=sys.stderr)
    while True:
        try:
            sys.stderr.write("> ")
            sys.stderr.flush()
            line = input()
        except (EOFError, KeyboardInterrupt):
            sys.stderr.write("\n")
            return
        if line.strip() == "/reset":
            history = list(opening)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        try:
            history.append({"role": "assistant", "content": reply(model, tokenizer, history, dev, amp, generator)})
        except KeyboardInterrupt:
            history.pop()
            print("\n[reply interrupted; the turn is forgotten]", file=sys.stderr)


if __name__ == "__main__":
    configure(globals(), stream=sys.stderr)  # stdout carries only the samples
    try:
        main()
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)
