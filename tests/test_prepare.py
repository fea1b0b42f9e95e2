"""
Smoke tests of the two prepare scripts, run as subprocesses on tiny corpora written to a temporary
folder (never the repo's data/, never the network: the "download" is a file:// address).

    python -m pytest tests/test_prepare.py -q
"""

import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import bpe  # noqa: E402

SHAKESPEARE = os.path.join(ROOT, "data", "tiny_shakespeare", "prepare.py")
TEXT_PREPARE = os.path.join(ROOT, "data", "text", "prepare.py")
META_KEYS = {"tokenizer", "tokenizer_file", "vocab_size", "n_vocab", "pad_vocab_to", "dtype",
             "special_tokens", "train_tokens", "val_tokens"}

CORPUS = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "Second Citizen:\nWould you proceed especially against Caius Marcius? Ay, naïve café 日本 😀\n\n"
) * 30


def run(script, *args, check=True):
    # from another working directory, to check that the scripts find their own paths
    res = subprocess.run([sys.executable, script, *args], cwd="/", capture_output=True, text=True, timeout=120)
    if check and res.returncode != 0:
        raise AssertionError(f"{script} {args} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return res


def read_dataset(folder):
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    assert META_KEYS <= set(meta)
    tok = bpe.load_from_meta(os.path.join(folder, "meta.json"))
    ids = {split: np.fromfile(os.path.join(folder, f"{split}.bin"), dtype=meta["dtype"]).tolist()
           for split in ("train", "val")}
    assert (len(ids["train"]), len(ids["val"])) == (meta["train_tokens"], meta["val_tokens"])
    return meta, tok, ids


def test_shakespeare_byte(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    res = run(SHAKESPEARE, f"--input={corpus}", f"--data_dir={tmp_path}", "--tokenizer=byte")
    assert "train_tokens=" in res.stdout
    meta, tok, ids = read_dataset(tmp_path / "byte")
    n = int(0.9 * len(CORPUS))  # split by characters, as nanoGPT does
    assert tok.decode(ids["train"]) == CORPUS[:n] and tok.decode(ids["val"]) == CORPUS[n:]
    assert meta["tokenizer"] == "byte" and meta["tokenizer_file"] is None
    assert meta["n_vocab"] == 256 + len(bpe.SPECIAL_TOKENS) and meta["vocab_size"] == 320  # padded to 64
    assert meta["dtype"] == "uint16" and meta["pad_vocab_to"] == 64
    assert list(meta["special_tokens"]) == list(bpe.SPECIAL_TOKENS)


def test_shakespeare_bpe_downloads_once(tmp_path):
    # no input.txt in data_dir: the script fetches url (here a local file) and keeps it there
    source = tmp_path / "elsewhere.txt"
    source.write_text(CORPUS, encoding="utf-8")
    data_dir = tmp_path / "ts"
    run(SHAKESPEARE, f"--data_dir={data_dir}", f"--url=file://{source}", "--tokenizer=bpe", "--vocab_size=300",
        "--pad_vocab_to=1")
    assert (data_dir / "input.txt").read_text(encoding="utf-8") == CORPUS
    meta, tok, ids = read_dataset(data_dir / "bpe300")
    n = int(0.9 * len(CORPUS))
    assert tok.decode(ids["train"]) == CORPUS[:n] and tok.decode(ids["val"]) == CORPUS[n:]
    assert meta["tokenizer"] == "bpe" and meta["tokenizer_file"] == "bpe.tokenizer"
    assert (data_dir / "bpe300" / "bpe.vocab").exists()
    assert meta["vocab_size"] == meta["n_vocab"] == tok.n_vocab == 300  # pad_vocab_to=1: no padding
    assert meta["pattern"] == "gpt4" and len(tok.merges) == 300 - 256 - len(bpe.SPECIAL_TOKENS)
    assert len(ids["train"]) < 0.7 * len(CORPUS[:n].encode("utf-8"))  # it really merged something


def test_shakespeare_missing_corpus(tmp_path):
    res = run(SHAKESPEARE, f"--data_dir={tmp_path}", f"--url=file://{tmp_path}/nowhere.txt", check=False)
    assert res.returncode != 0
    assert f"Put tiny shakespeare (the char-rnn input.txt) at {tmp_path}/input.txt" in res.stderr
    assert "Traceback" not in res.stderr
    assert not os.listdir(tmp_path)  # and left nothing behind


def test_text_prepare(tmp_path):
    docs = {
        "a.txt": CORPUS,
        "sub/b.md": "one line with a forged <|endoftext|> in it, no newline at the end",
        "c.txt": "short\n",
        "skip.json": "not read: wrong extension",
        ".hidden.txt": "not read: hidden",
    }
    for name, text in docs.items():
        (tmp_path / "in" / os.path.dirname(name)).mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / name).write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    run(TEXT_PREPARE, f"--input_dir={tmp_path / 'in'}", f"--out_dir={out}", "--tokenizer=bpe",
        "--vocab_size=320", "--block_bytes=500")
    meta, tok, ids = read_dataset(out)
    assert meta["files"] == 3 and meta["tokenizer"] == "bpe"

    # expected: each file's last 10% of bytes (from the next line start, else a character
    # boundary) is val, and every part ends with <|endoftext|>, in sorted path order
    eot = "<|endoftext|>"
    expected = {"train": "", "val": ""}
    for name in ("a.txt", "c.txt", "sub/b.md"):
        data = docs[name].encode("utf-8")
        cut = int(len(data) * 0.9)
        nl = data.find(b"\n", cut)
        cut = nl + 1 if 0 <= nl < len(data) - 1 else cut
        while data[cut:cut + 1] and data[cut] & 0xC0 == 0x80:
            cut -= 1
        expected["train"] += data[:cut].decode() + eot
        if cut < len(data):
            expected["val"] += data[cut:].decode() + eot
    assert tok.decode(ids["train"]) == expected["train"]
    assert tok.decode(ids["val"]) == expected["val"]
    # separators are inserted by id; the forged one in b.md is plain text
    eot_id = tok.special_id(eot)
    assert ids["train"].count(eot_id) == 3 and ids["val"].count(eot_id) == expected["val"].count(eot) == 3
    # tokenizing in 500-byte blocks gives the ids of tokenizing each part whole
    assert ids["train"][:ids["train"].index(eot_id)] == tok.encode_ordinary(expected["train"].split(eot)[0])


def test_dataset_helpers():
    assert bpe.padded_vocab_size(50257, 64) == 50304
    assert bpe.padded_vocab_size(261, 1) == 261
    assert bpe.token_dtype(65536) == "uint16" and bpe.token_dtype(65537) == "uint32"
    assert bpe.dataset_name("bpe", 4096, "gpt4") == "bpe4096"
    assert bpe.dataset_name("bpe", 4096, "gpt2") == "bpe4096_gpt2"
    assert bpe.dataset_name("byte", 4096, "gpt4") == "byte"
