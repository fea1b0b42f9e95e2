"""
Prepare a folder of your own text files as token files for train.py. It streams: files are read and
tokenized a block at a time and appended to the .bin files, so the corpus may be larger than memory.

Reads   every file under --input_dir (recursively, in sorted path order, hidden files skipped)
        whose name ends in one of `extensions`; bytes that are not UTF-8 become U+FFFD.
Writes  --out_dir (default data/text/<input_dir's name>/<byte | bpe4096 | gpt2>): train.bin,
        val.bin and meta.json (bpe also bpe.tokenizer and bpe.vocab), in the same format as
        data/tiny_shakespeare, so train.py reads either.

    python data/text/prepare.py --input_dir=~/books --tokenizer=bpe --vocab_size=4096 --out_dir=data/text/books
    python data/text/prepare.py --input_dir=~/books --tokenizer=byte

Each file is one document, followed by <|endoftext|> (inserted by id: text that happens to spell
"<|endoftext|>" stays plain text). The split: the last val_fraction (10%) of every file's bytes is
val, starting at the next line start if the tail has one, else at a character boundary; the rest is
train. So val holds a little of every document, like the 90/10 cut of tiny shakespeare, and this
works for one big file as for many small ones. Each part of a document ends in <|endoftext|>.

BPE is trained on a bounded sample: the first bpe_sample_bytes (10 MB) of the train parts, in file
order (each file's part a separate document). A healthy run prints one line per file and then
    wrote data/text/books/bpe4096: train_tokens=... val_tokens=... vocab_size=4096 ...
"""

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import bpe  # noqa: E402  (the repo root is on the path now)
from configurator import configure  # noqa: E402


def list_files(input_dir, extensions):
    paths = []
    for root, dirs, files in os.walk(input_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith(".") and (not extensions or name.endswith(tuple(extensions))):
                paths.append(os.path.join(root, name))
    return sorted(paths)


def val_start(path, val_fraction):
    """The byte offset where the file's val part begins (see the docstring at the top)."""
    size = os.path.getsize(path)
    cut = int(size * (1 - val_fraction))
    with open(path, "rb") as f:
        f.seek(cut)
        pos = cut
        while block := f.read(1 << 20):
            i = block.find(b"\n")
            if i >= 0:
                if pos + i + 1 < size:
                    return pos + i + 1
                break
            pos += len(block)
        # no line starts in the tail: step back to the first byte of a UTF-8 character
        while 0 < cut < size:
            f.seek(cut)
            if f.read(1)[0] & 0xC0 != 0x80:  # 10xxxxxx bytes continue a character
                break
            cut -= 1
    return cut


def read_text(path, start, end, block_bytes):
    """Yield the text of bytes [start, end) of a file in blocks of about block_bytes. A block ends
    only after a line ending in a non-space character and before one starting with one, where the
    gpt2 and gpt4 pre-tokenizers split anyway, so tokenizing block by block gives the same ids as
    tokenizing the whole text (a custom pattern may differ there). A single line longer than memory
    would not fit."""
    if start >= end:
        return
    with open(path, "rb") as f:
        f.seek(start)
        left = end - start
        lines, size = [], 0
        for raw in f:
            raw = raw[:left]
            left -= len(raw)
            line = raw.decode("utf-8", errors="replace")
            if size >= block_bytes and lines[-1][-2:-1] and not lines[-1][-2].isspace() \
                    and lines[-1][-1] == "\n" and not line[:1].isspace():
                yield "".join(lines)
                lines, size = [], 0
            lines.append(line)
            size += len(raw)
            if left <= 0:
                break
        if lines:
            yield "".join(lines)


def prepare(paths, out_dir, tokenizer="bpe", vocab_size=4096, pattern="gpt4", pad_vocab_to=64,
            val_fraction=0.1, bpe_sample_bytes=10_000_000, block_bytes=1 << 22, source=""):
    """Tokenize the files into out_dir/train.bin and val.bin, then write meta.json. Returns the meta."""
    parts = []  # (path, start, end, split): each file's train part and val part
    for path in paths:
        cut = val_start(path, val_fraction)
        parts += [(path, 0, cut, "train"), (path, cut, os.path.getsize(path), "val")]

    sample = []
    if tokenizer == "bpe":
        budget = bpe_sample_bytes
        for path, start, end, split in parts:
            if split != "train" or budget <= 0:
                continue
            sample.append("".join(read_text(path, start, min(end, start + budget), block_bytes)))
            budget -= min(end, start + budget) - start
        print(f"training bpe on {bpe_sample_bytes - max(budget, 0):,} bytes of {len(sample)} files ...")
    tok = bpe.get_tokenizer(tokenizer, sample, vocab_size, pattern)
    eot = tok.special_id("<|endoftext|>")
    dtype = bpe.token_dtype(bpe.padded_vocab_size(tok.n_vocab, pad_vocab_to))

    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, "meta.json")):
        os.remove(os.path.join(out_dir, "meta.json"))  # until the new one is written, the folder is incomplete
    counts = {"train": 0, "val": 0}
    files = {split: open(os.path.join(out_dir, f"{split}.bin"), "wb") for split in counts}
    for k, (path, start, end, split) in enumerate(parts):
        if start < end:  # (a file too short to give val anything has an empty val part)
            for block in read_text(path, start, end, block_bytes):
                ids = np.array(tok.encode_ordinary(block), dtype=dtype)
                ids.tofile(files[split])
                counts[split] += len(ids)
            np.array([eot], dtype=dtype).tofile(files[split])
            counts[split] += 1
        if split == "val" and (k // 2 % max(1, len(paths) // 20) == 0 or k == len(parts) - 1):
            print(f"{k // 2 + 1}/{len(paths)} {path}: train_tokens={counts['train']} val_tokens={counts['val']}")
    for f in files.values():
        f.close()
    return bpe.write_meta(
        out_dir, tok, pad_vocab_to, counts["train"], counts["val"],
        source=source,
        files=len(paths),
        pattern=pattern if tokenizer == "bpe" else None,
        split=f"the last {val_fraction:g} of every file's bytes (from a line start) val, the rest train",
        bpe_sample_bytes=bpe_sample_bytes if tokenizer == "bpe" else None,
    )


if __name__ == "__main__":
    # I/O
    input_dir = ""  # folder of text files, searched recursively
    out_dir = ""  # empty: data/text/<input_dir's name>/<byte | bpe4096 | gpt2>
    extensions = (".txt", ".md")  # which files to read, by the end of their name; () for all files
    # data
    val_fraction = 0.1  # the last this fraction of every file is val
    # tokenizer
    tokenizer = "bpe"  # byte | bpe | gpt2
    vocab_size = 4096  # bpe only: all ids, 256 bytes + merges + special tokens
    pattern = "gpt4"  # bpe only: pre-tokenizer split, gpt2 | gpt4 | a regex
    bpe_sample_bytes = 10_000_000  # bpe only: trained on the first this many bytes of the train parts
    pad_vocab_to = 64  # the model's vocab_size is n_vocab rounded up to a multiple of this (1 = off)
    # system
    block_bytes = 1 << 22  # text is read and tokenized in blocks of about this many bytes
    configure(globals())
    if not input_dir or not os.path.isdir(os.path.expanduser(input_dir)):
        raise SystemExit(f"error: --input_dir={input_dir!r} is not a folder; pass the folder of your text files")
    if tokenizer not in bpe.KINDS:
        raise SystemExit(f"error: --tokenizer={tokenizer}, expected one of {bpe.KINDS}")
    if not 0 <= val_fraction < 1 or pad_vocab_to < 1:
        raise SystemExit("error: need 0 <= val_fraction < 1 and pad_vocab_to >= 1")

    input_dir = os.path.expanduser(input_dir)
    paths = list_files(input_dir, extensions)
    if not paths:
        raise SystemExit(f"error: no files ending in {extensions} under {input_dir}")
    if not out_dir:
        name = os.path.basename(os.path.normpath(os.path.abspath(input_dir)))
        here = os.path.dirname(os.path.abspath(__file__))
        out_dir = os.path.join(here, name, bpe.dataset_name(tokenizer, vocab_size, pattern))
    t0 = time.time()
    try:
        meta = prepare(paths, out_dir, tokenizer, vocab_size, pattern, pad_vocab_to, val_fraction,
                       bpe_sample_bytes, block_bytes, source=os.path.abspath(input_dir))
    except (RuntimeError, ValueError) as e:  # gpt2 ranks not available, a bad vocab_size or pattern
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {out_dir}: train_tokens={meta['train_tokens']} val_tokens={meta['val_tokens']} "
          f"vocab_size={meta['vocab_size']} (n_vocab={meta['n_vocab']}) dtype={meta['dtype']} "
          f"time={time.time() - t0:.1f}s")
