"""
Tests of bpe.py: the fast trainer against a naive one written here, the worked example, encoding
through tiktoken against a pure-Python encoder written here, special tokens, saving and loading.

    python -m pytest tests/test_bpe.py -q
"""

import json
import os
import random
import sys

import pytest
import regex

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bpe  # noqa: E402

# -----------------------------------------------------------------------------
# references


def merge(ids, pair, new_id):
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def naive_train(text, num_merges, pattern):
    """The textbook algorithm: every round, count every pair of every chunk in text order and merge
    the max (Python's max returns the first key inserted among equal counts)."""
    docs = [text] if isinstance(text, str) else text
    chunks = [list(c.encode("utf-8")) for doc in docs for c in regex.findall(bpe.resolve_pattern(pattern), doc)]
    merges = []
    while len(merges) < num_merges:
        counts = {}
        for ids in chunks:
            for pair in zip(ids, ids[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        pair = max(counts, key=counts.get)
        chunks = [merge(ids, pair, 256 + len(merges)) for ids in chunks]
        merges.append(pair)
    return merges


def naive_encode(tok, text):
    """Apply the merges to each chunk, lowest rank first, as minbpe does."""
    rank = {pair: i for i, pair in enumerate(tok.merges)}
    out = []
    for chunk in regex.findall(tok.pattern, text):
        ids = list(chunk.encode("utf-8"))
        while len(ids) > 1:
            pair = min(zip(ids, ids[1:]), key=lambda p: rank.get(p, float("inf")))
            if pair not in rank:
                break
            ids = merge(ids, pair, 256 + rank[pair])
        out += ids
    return out


# -----------------------------------------------------------------------------
# test data, made here


def tie_text(seed, n=3000):
    # words over a 3-letter alphabet: hundreds of pairs with equal counts at every round
    rng = random.Random(seed)
    words = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 7))) for _ in range(60)]
    out = []
    while sum(map(len, out)) < n:
        out.append(rng.choice(words) + rng.choice([" ", " ", "  ", "\n", ", ", ".\n\n"]))
    return "".join(out)


def varied_text(seed, n=4000):
    rng = random.Random(seed)
    pieces = [
        "The quick brown fox jumps over the lazy dog. ", "DON'T you'll we've I'm ", "1234567 3.14159 ",
        "aaaa aaa aaaaaaa bbbbbb abab ababab ", "\n\n  \t\r\n", "(hello) [world]!!! ", "naïve café ",
        "日本語のテキスト 中文 ", "😀😃🎉 ", "e\u0301\u0302 ", "x" * rng.randint(50, 200) + " ", "   ",
    ]
    out = []
    while sum(map(len, out)) < n:
        out.append(rng.choice(pieces))
    return "".join(out)


def random_unicode(seed, n=2000):
    rng = random.Random(seed)
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x300, 0x36F), (0x4E00, 0x9FFF), (0x3040, 0x30FF),
              (0x1F600, 0x1F64F), (0x0600, 0x06FF), (0xAC00, 0xD7A3)]
    out = []
    while len(out) < n:
        r = rng.random()
        if r < 0.1:
            out.append(rng.choice([" ", "\n", "\t", "\r\n", "\u00a0", "\u3000"]) * rng.randint(1, 12))
        elif r < 0.12:
            out.append(rng.choice("abcdefgh") * rng.randint(100, 3000))  # a very long word
        else:
            lo, hi = rng.choice(ranges)
            out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


SPECIALS = ("<|endoftext|>", "<|user|>")


@pytest.fixture(scope="module")
def tok():
    return bpe.train(varied_text(0) + tie_text(0), 600, "gpt4", SPECIALS)


# -----------------------------------------------------------------------------
# training


@pytest.mark.parametrize("pattern", ["gpt4", "gpt2"])
@pytest.mark.parametrize("make_text", [tie_text, varied_text])
def test_merges_equal_naive(pattern, make_text):
    for seed in range(2):
        text = make_text(seed)
        reference = naive_train(text, 300, pattern)
        for vocab_size in (256, 257, 300, 420, 556):
            merges = bpe.train(text, vocab_size, pattern).merges
            assert merges == reference[:vocab_size - 256], (pattern, seed, vocab_size)


def test_merges_equal_naive_custom_pattern_and_overlaps():
    # runs of one letter: (a, a) pairs overlap, and merging them leaves (aa, a), (a, aa) ...
    text = " ".join("a" * n for n in (1, 2, 3, 4, 5, 7, 9, 3, 2, 8)) + " ab" * 7 + " abababab ba"
    for pattern in (r"\S+|\s+", r"[\s\S]+", "gpt4"):
        assert bpe.train(text, 300, pattern).merges == naive_train(text, 44, pattern)


def test_runs_out_of_pairs():
    # fewer merges than asked: training stops and the special tokens follow the last merge
    # chunks "ab", " ab", " ab": (a, b) 3 times, then " " + "ab" twice; then nothing is left
    tok = bpe.train("ab ab ab", 1000, special_tokens=SPECIALS)
    assert tok.merges == naive_train("ab ab ab", 744, "gpt4") == [(97, 98), (32, 256)]
    assert tok.special_tokens == {"<|endoftext|>": 258, "<|user|>": 259}
    assert tok.n_vocab == 260


def test_wikipedia_example():
    # "aaabdaaabac", a = 97, b = 98, one chunk:
    #   pairs aa 4, ab 2, bd 1, da 1, ba 1, ac 1         -> 256 = (a, a):      Z a b d Z a b a c
    #   pairs Za 2, ab 2, bd 1, dZ 1, ba 1, ac 1         -> tie; Za comes first: 257 = (256, a) "aaa"
    #   now Y b d Y b a c: pairs Yb 2, bd, dY, ba, ac 1  -> 258 = (257, b) "aaab": X d X a c
    # (Wikipedia breaks the tie the other way and merges "ab" second.)
    tok = bpe.train("aaabdaaabac", 259)
    assert tok.merges == [(97, 97), (256, 97), (257, 98)]
    assert tok.encode("aaabdaaabac") == [258, 100, 258, 97, 99]
    assert tok.decode_bytes([258]) == b"aaab"


def test_vocab_size_counts_everything():
    tok = bpe.train(varied_text(1), 400, "gpt4", bpe.SPECIAL_TOKENS)
    assert len(tok.merges) == 400 - 256 - len(bpe.SPECIAL_TOKENS)
    assert tok.n_vocab == 400
    assert sorted(tok.special_tokens.values()) == list(range(395, 400))
    with pytest.raises(ValueError, match="vocab_size"):
        bpe.train("abc", 258, special_tokens=bpe.SPECIAL_TOKENS)


def test_documents_are_split_separately():
    # a list of documents: no chunk spans two of them, and ties follow document order
    docs = [varied_text(2, 500), tie_text(3, 500), "ab", varied_text(4, 500)]
    assert bpe.train(docs, 406).merges == naive_train(docs, 150, "gpt4")


# -----------------------------------------------------------------------------
# patterns and encoding

# the cl100k and r50k split patterns exactly as tiktoken spells them (possessive quantifiers)
TIKTOKEN_CL100K = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
TIKTOKEN_R50K = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


@pytest.mark.parametrize("ours,theirs", [(bpe.GPT4_PATTERN, TIKTOKEN_CL100K), (bpe.GPT2_PATTERN, TIKTOKEN_R50K)])
def test_patterns_split_like_tiktoken(ours, theirs):
    for seed in range(3):
        for text in (varied_text(seed), random_unicode(seed), tie_text(seed), "trailing  \n", "x\r\n\r\n y  "):
            assert regex.findall(ours, text) == regex.findall(theirs, text)
    # and GPT-4's really differs from GPT-2's where it should
    assert regex.findall(bpe.GPT4_PATTERN, "12345 DON'T") == ["123", "45", " DON", "'T"]
    assert regex.findall(bpe.GPT2_PATTERN, "12345 DON'T") == ["12345", " DON", "'", "T"]


def test_roundtrip_random_unicode(tok):
    for seed in range(5):
        s = random_unicode(seed)
        assert tok.decode(tok.encode(s)) == s
        assert tok.decode_bytes(tok.encode(s)) == s.encode("utf-8")
    # any code point (surrogates aside) survives, assigned or not
    rng = random.Random(0)
    s = "".join(chr(rng.choice([rng.randint(0, 0xD7FF), rng.randint(0xE000, 0x10FFFF)])) for _ in range(3000))
    assert tok.decode(tok.encode(s)) == s


def test_tiktoken_encoding_equals_naive_encoder(tok):
    for seed in range(3):
        for s in (random_unicode(seed, 800), varied_text(seed + 10), tie_text(seed + 10)):
            assert tok.encode_ordinary(s) == naive_encode(tok, s)
    gpt2_tok = bpe.train(varied_text(5) + tie_text(5), 500, "gpt2")
    s = varied_text(6) + random_unicode(6, 500)
    assert gpt2_tok.encode_ordinary(s) == naive_encode(gpt2_tok, s)


def test_decode_bytes_streams_across_token_boundaries(tok):
    s = "日本語 😀 naïve"
    ids = tok.encode(s)
    pieces = [tok.decode_bytes([i]) for i in ids]
    assert b"".join(pieces) == s.encode("utf-8")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.n_vocab])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([-1])


def test_byte_tokenizer():
    tok = bpe.byte_tokenizer(bpe.SPECIAL_TOKENS)
    s = "héllo 😀"
    assert tok.encode(s) == list(s.encode("utf-8"))
    assert tok.decode(tok.encode(s)) == s
    assert tok.kind == "byte" and tok.merges == [] and tok.pattern is None
    assert tok.n_vocab == 261 and tok.special_id("<|endoftext|>") == 256
    assert tok.encode("<|end|>", allowed_special="all") == [260]


def test_gpt2_wrapper_with_a_stand_in_encoding(monkeypatch):
    # the real gpt2 ranks need the network; a small encoding shaped like it (ranks, then
    # <|endoftext|> as the last id) checks how the wrapper adds our special tokens
    ranks = {bytes([i]): i for i in range(256)}
    ranks.update({b"he": 256, b"ll": 257, b"hell": 258})
    fake = bpe.tiktoken.Encoding("gpt2", pat_str=bpe.GPT2_PATTERN, mergeable_ranks=ranks,
                                 special_tokens={"<|endoftext|>": 259})
    monkeypatch.setattr(bpe.tiktoken, "get_encoding", lambda name: fake)
    tok = bpe.gpt2_tokenizer(bpe.SPECIAL_TOKENS)
    assert tok.kind == "gpt2" and tok.merges is None
    assert tok.special_tokens == {name: 259 + i for i, name in enumerate(bpe.SPECIAL_TOKENS)}
    assert tok.n_vocab == 264
    assert tok.encode("hello<|user|>", allowed_special="all") == [258, 111, 261]
    assert tok.decode([258, 111, 261]) == "hello<|user|>"
    same(bpe.Tokenizer.from_state(json.loads(json.dumps(tok.state()))), tok, "hello there")


def test_gpt2_fails_clearly_without_its_ranks(monkeypatch):
    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(bpe.tiktoken, "get_encoding", offline)
    with pytest.raises(RuntimeError, match="gpt2 tokenizer needs tiktoken to download"):
        bpe.gpt2_tokenizer(bpe.SPECIAL_TOKENS)


# -----------------------------------------------------------------------------
# special tokens


def test_special_tokens_cannot_be_forged(tok):
    eot = tok.special_id("<|endoftext|>")
    text = "hi <|endoftext|> there<|user|>"
    ids = tok.encode(text)
    assert eot not in ids and tok.special_id("<|user|>") not in ids
    assert tok.decode(ids) == text  # encoded as the plain text it is
    assert tok.encode(text) == tok.encode_ordinary(text)
    with pytest.raises(ValueError, match="<|endoftext|>"):
        tok.encode(text, refuse_special=True)
    assert tok.encode("no specials here", refuse_special=True) == tok.encode_ordinary("no specials here")


def test_allowed_special(tok):
    eot, user = tok.special_id("<|endoftext|>"), tok.special_id("<|user|>")
    text = "hi<|endoftext|>there<|user|>"
    ids = tok.encode(text, allowed_special={"<|endoftext|>"})
    assert ids.count(eot) == 1 and user not in ids
    assert ids == tok.encode("hi") + [eot] + tok.encode("there<|user|>")
    ids = tok.encode(text, allowed_special="all")
    assert ids == tok.encode("hi") + [eot] + tok.encode("there") + [user]
    assert tok.decode(ids) == text
    # allowed names are not refused, the others still are
    assert tok.encode(text, allowed_special={"<|endoftext|>", "<|user|>"}, refuse_special=True) == ids
    with pytest.raises(ValueError, match="<|user|>"):
        tok.encode(text, allowed_special={"<|endoftext|>"}, refuse_special=True)
    with pytest.raises(ValueError, match=r"<\|nope\|>"):
        tok.encode(text, allowed_special={"<|nope|>"})
    with pytest.raises(ValueError, match=r"<\|nope\|>"):
        tok.special_id("<|nope|>")


# -----------------------------------------------------------------------------
# saving and loading


def same(a, b, text):
    for attr in ("kind", "pattern", "merges", "special_tokens", "n_vocab"):
        assert getattr(a, attr) == getattr(b, attr), attr
    assert a.encode(text, allowed_special="all") == b.encode(text, allowed_special="all")


def test_save_load_roundtrip(tok, tmp_path):
    path = str(tmp_path / "t.bpe")
    tok.save(path)
    same(bpe.Tokenizer.load(path), tok, varied_text(7) + "<|user|>")
    vocab = (tmp_path / "t.vocab").read_text(encoding="utf-8").splitlines()
    a, b = tok.merges[0]
    assert any(line.startswith("256 [") and f"<- {a} [" in line for line in vocab)
    assert any(line.endswith("special") and "<|endoftext|>" in line for line in vocab)
    byte = bpe.byte_tokenizer(bpe.SPECIAL_TOKENS)
    byte.save(str(tmp_path / "byte.tok"))
    same(bpe.Tokenizer.load(str(tmp_path / "byte.tok")), byte, "abc")


def test_state_roundtrip(tok):
    state = json.loads(json.dumps(tok.state()))  # must survive JSON, as inside a checkpoint
    same(bpe.Tokenizer.from_state(state), tok, varied_text(8) + "<|endoftext|>")
    byte = bpe.byte_tokenizer(bpe.SPECIAL_TOKENS)
    same(bpe.Tokenizer.from_state(json.loads(json.dumps(byte.state()))), byte, "xyz")
    with pytest.raises(ValueError, match="format"):
        bpe.Tokenizer.from_state({"kind": "bpe"})
    bad = dict(state, merges=[[300, 1]])
    with pytest.raises(ValueError, match="does not exist yet"):
        bpe.Tokenizer.from_state(bad)


def test_bad_files_fail_clearly(tok, tmp_path):
    path = tmp_path / "good.bpe"
    tok.save(str(path))
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)

    def load(name, content):
        p = tmp_path / name
        p.write_bytes(content) if isinstance(content, bytes) else p.write_text(content, encoding="utf-8")
        with pytest.raises(ValueError) as e:
            bpe.Tokenizer.load(str(p))
        assert str(p) in str(e.value)  # the message names the file
        return str(e.value)

    assert "truncated" in load("cut.bpe", "".join(lines[: len(lines) // 2]))
    assert "truncated" in load("noend.bpe", "".join(lines[:-1]))
    assert "truncated" in load("empty.bpe", "")
    assert "version" in load("v9.bpe", "bpe-tokenizer v9\n" + "".join(lines[1:]))
    assert "not a tokenizer file" in load("foreign.json", json.dumps({"hello": 1}))
    assert "not a tokenizer file" in load("binary.bin", bytes(range(256)) * 4)
    assert "does not exist" in load("damaged.bpe", "".join(lines[:-2] + ["99999 1\n", "end\n"]))
    assert "damaged" in load("garbage.bpe", "".join(lines[:-2] + ["x y\n", "end\n"]))
    with pytest.raises(ValueError, match="does not exist"):
        bpe.Tokenizer.load(str(tmp_path / "missing.bpe"))
