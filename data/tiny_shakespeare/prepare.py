"""
Prepare tiny shakespeare (1.1 MB of plays, the char-rnn corpus) as token files for train.py.

Reads   --input=PATH, else data/tiny_shakespeare/input.txt, else downloads that file once from
        the char-rnn repository (it is not committed).
Writes  data/tiny_shakespeare/<name>/train.bin, val.bin, meta.json, where <name> is byte,
        bpe<vocab_size> (which also holds bpe.tokenizer and its readable twin bpe.vocab)
        or gpt2. Every tokenizer reserves bpe.SPECIAL_TOKENS.

    python data/tiny_shakespeare/prepare.py --tokenizer=byte
    python data/tiny_shakespeare/prepare.py --tokenizer=bpe --vocab_size=4096
    python data/tiny_shakespeare/prepare.py --tokenizer=gpt2   # needs tiktoken's gpt2 ranks (network, once)

The first 90% of the characters are train, the last 10% val, as in nanoGPT, so that losses are
comparable across tokenizers; the bpe tokenizer is trained on the train part only. Token ids are
stored as uint16 (uint32 if the vocab is larger). A healthy byte run prints
    wrote .../byte: train_tokens=1003854 val_tokens=111540 vocab_size=320 (n_vocab=261) dtype=uint16
and bpe 4096 about 280k train tokens, 3.6 bytes per token. Runs from any directory; train.py
calls it as a subprocess when a dataset folder is missing.
"""

import os
import sys
import time
import urllib.request

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import bpe  # noqa: E402  (the repo root is on the path now)
from configurator import configure  # noqa: E402


def read_corpus(input, data_dir, url):
    """The corpus text: from `input`, else data_dir/input.txt, else downloaded from url into it.
    Exits with a message saying where to put the file if none of that works."""
    if input:
        if not os.path.isfile(input):
            raise SystemExit(f"error: --input={input} does not exist")
        path = input
    else:
        path = os.path.join(data_dir, "input.txt")
        if not os.path.isfile(path):
            try:
                if not url:
                    raise OSError("downloading is off (url is empty)")
                print(f"downloading {url} ...")
                with urllib.request.urlopen(url, timeout=10) as r:
                    data = r.read()
                os.makedirs(data_dir, exist_ok=True)
                with open(path + ".tmp", "wb") as f:  # so that a failed download leaves no half file
                    f.write(data)
                os.replace(path + ".tmp", path)
            except OSError as e:
                raise SystemExit(f"error: no corpus. Could not download {url or '(no url)'}: {e}\n"
                                 f"Put tiny shakespeare (the char-rnn input.txt) at {os.path.abspath(path)}\n"
                                 f"or pass --input=PATH.") from None
    with open(path, encoding="utf-8") as f:
        return f.read(), path


def prepare(text, out_dir, tokenizer="byte", vocab_size=4096, pattern="gpt4", pad_vocab_to=64, source=""):
    """Split text 90/10 by characters, tokenize both parts, write train.bin, val.bin and meta.json
    (and the bpe tokenizer file) into out_dir. Returns the meta dict."""
    n = int(0.9 * len(text))
    train_text, val_text = text[:n], text[n:]
    tok = bpe.get_tokenizer(tokenizer, train_text, vocab_size, pattern)
    dtype = bpe.token_dtype(bpe.padded_vocab_size(tok.n_vocab, pad_vocab_to))
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, "meta.json")):
        os.remove(os.path.join(out_dir, "meta.json"))  # until the new one is written, the folder is incomplete
    counts = {}
    for split, part in (("train", train_text), ("val", val_text)):
        ids = np.array(tok.encode_ordinary(part), dtype=dtype)
        ids.tofile(os.path.join(out_dir, f"{split}.bin"))
        counts[split] = len(ids)
    # meta.json last: a folder with a meta.json is complete
    return bpe.write_meta(
        out_dir, tok, pad_vocab_to, counts["train"], counts["val"],
        source=source,
        pattern=pattern if tokenizer == "bpe" else None,
        split="first 90% of the characters train, last 10% val",
    )


if __name__ == "__main__":
    # I/O
    input = ""  # corpus file; empty: data_dir/input.txt, downloaded from url if missing
    data_dir = ""  # where input.txt is looked for and <name>/ is written; empty: this script's folder
    # where to download input.txt from when it is missing; empty: never download
    url = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
    # tokenizer
    tokenizer = "byte"  # byte | bpe | gpt2
    vocab_size = 4096  # bpe only: all ids, 256 bytes + merges + special tokens
    pattern = "gpt4"  # bpe only: pre-tokenizer split, gpt2 | gpt4 | a regex
    pad_vocab_to = 64  # the model's vocab_size is n_vocab rounded up to a multiple of this (1 = off)
    configure(globals())
    if tokenizer not in bpe.KINDS:
        raise SystemExit(f"error: --tokenizer={tokenizer}, expected one of {bpe.KINDS}")
    if pad_vocab_to < 1:
        raise SystemExit(f"error: --pad_vocab_to={pad_vocab_to}, expected 1 (off) or more")

    data_dir = data_dir or os.path.dirname(os.path.abspath(__file__))
    text, source = read_corpus(input, data_dir, url)
    out_dir = os.path.join(data_dir, bpe.dataset_name(tokenizer, vocab_size, pattern))
    t0 = time.time()
    try:
        meta = prepare(text, out_dir, tokenizer, vocab_size, pattern, pad_vocab_to, source)
    except (RuntimeError, ValueError) as e:  # gpt2 ranks not available, a bad vocab_size or pattern
        raise SystemExit(f"error: {e}") from None
    bytes_per_token = len(text.encode("utf-8")) / (meta["train_tokens"] + meta["val_tokens"])
    print(f"wrote {out_dir}: train_tokens={meta['train_tokens']} val_tokens={meta['val_tokens']} "
          f"vocab_size={meta['vocab_size']} (n_vocab={meta['n_vocab']}) dtype={meta['dtype']} "
          f"bytes_per_token={bytes_per_token:.2f} time={time.time() - t0:.1f}s")
