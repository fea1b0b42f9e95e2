"""
Byte-level BPE tokenizer: train it, encode and decode with it, save and load it.

Every tokenizer in this repo maps text to ids the same way. The text is UTF-8 bytes, so ids
0..255 are the 256 byte values and any string can be encoded. A regex pre-tokenizer first cuts
the text into chunks (words, numbers, punctuation runs, whitespace); merges never cross a chunk
boundary, so " dog." can become [" dog", "."] but never "g." in one token. Training then takes
the most frequent adjacent pair of ids, gives it the next free id, replaces it everywhere, and
repeats. The i-th merge creates id 256 + i. Special tokens (document separator, chat roles) take
the highest ids and are produced only when the caller asks for them by name.

Worked example (Wikipedia's BPE page): "aaabdaaabac" is one chunk (all letters); a = 97, b = 98.
    pairs aa 4, ab 2, bd 1, da 1, ba 1, ac 1  -> 256 = (a, a) = Z:           Z a b d Z a b a c
    pairs Za 2, ab 2, bd 1, dZ 1, ba 1, ac 1  -> a tie; Za occurs first,
                                                 257 = (256, a) = "aaa" = Y: Y b d Y b a c
    pairs Yb 2, bd 1, dY 1, ba 1, ac 1        -> 258 = (257, b) = "aaab" = X: X d X a c
so train("aaabdaaabac", 259).merges == [(97, 97), (256, 97), (257, 98)]. Wikipedia merges "ab"
second: ties are a convention, and ours is that the pair whose first occurrence comes first in the
text wins, which is what Python's max over a dict of counts filled in text order picks.

Four kinds of tokenizer share one interface (kind, n_vocab, special_tokens, pattern, merges,
encode, encode_ordinary, decode, decode_bytes, special_id, state, save):
    byte   256 ids plus special tokens, no merges          byte_tokenizer(SPECIAL_TOKENS)
    bpe    trained here, encoded by tiktoken at its speed  train(text, 4096, "gpt4", SPECIAL_TOKENS)
    gpt2   OpenAI's GPT-2 ranks, fetched by tiktoken       gpt2_tokenizer(SPECIAL_TOKENS)
    hf     the byte-level BPE of a Hugging Face folder     convert.tokenizer_from_hf("path/to/gpt2")
           (GPT-2's vocab.json + merges.txt, or a tokenizer.json), kept as its ranks: its ids are
           the folder's, GPT-2's first 256 are not the byte values, and the special tokens may
           come first (SmolLM2's 17 are ids 0..16); Qwen2's NFC normaliser comes with it

Special tokens cannot be forged: encode() turns the text "<|endoftext|>" into the ordinary tokens
for "<", "|", "endoftext" ... unless allowed_special names it (or refuse_special=True, which raises).

Train, save and measure from the command line (settings are the globals at the bottom):
    python bpe.py --input=data/tiny_shakespeare/input.txt --vocab_size=4096 --out=out/shakespeare.tokenizer
    python bpe.py --input=FILE --vocab_size=1024 --pattern=gpt2
On tiny shakespeare a healthy run prints about: 3835 merges in 0.4 s, 3.59 bytes per token.
The .tokenizer file is what load() reads; the .vocab twin next to it is for people to read.
"""

import heapq
import json
import os
import time
import unicodedata
from collections import Counter, defaultdict

import regex
import tiktoken

from configurator import configure

# The split patterns of GPT-2 (as in its encoder.py) and of GPT-4 (cl100k). GPT-4's keeps letters
# apart from digits, caps numbers at 3 digits, lets a word take one leading punctuation mark
# ("(hello"), never lets a newline start a word, and reads contractions case-insensitively.
# tiktoken spells cl100k with possessive quantifiers (?+ ++); nothing after them in their branch
# could make backtracking succeed, so these plain forms split every text the same way (a test
# checks it), and tiktoken's regex engine runs them about 30% faster.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT4_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s+$|\s*[\r\n]|\s+(?!\S)|\s"""
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}

# Every tokenizer the repo writes reserves these, so that SFT and RL never have to resize the model.
SPECIAL_TOKENS = ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")

FORMAT = "bpe-tokenizer v1"  # first line of a saved tokenizer, and state()["format"]
KINDS = ("byte", "bpe", "gpt2")  # what get_tokenizer (and so a prepare script) builds; convert.py reads "hf"
NORMALIZERS = (None, "NFC")  # what an hf tokenizer may do to the text before splitting it (Qwen2's: NFC)


def resolve_pattern(pattern):
    """'gpt2' / 'gpt4' to the regex, any other string is taken to be a regex itself."""
    pattern = PATTERNS.get(pattern, pattern)
    try:  # training splits with the regex package, encoding with tiktoken's engine: both must take it
        regex.compile(pattern)
        tiktoken.Encoding("check", pat_str=pattern, mergeable_ranks={b"a": 0}, special_tokens={})
    except Exception as e:
        raise ValueError(f"pattern {pattern!r} is not gpt2, gpt4, or a regex that both the regex package "
                         f"and tiktoken accept: {e}") from None
    return pattern


# -----------------------------------------------------------------------------
# training


def train(text, vocab_size, pattern="gpt4", special_tokens=(), verbose=False):
    """Train a byte-level BPE tokenizer with vocab_size ids in all: 256 bytes, then
    vocab_size - 256 - len(special_tokens) merges, then the special tokens. Stops early (and the
    special tokens follow the last merge) if the text runs out of pairs. `text` may also be a list
    of documents, which are split separately (no chunk spans two documents).

    The merges are exactly those of the naive algorithm (recount all pairs of all chunks in text
    order, merge the max of the dict of counts, repeat), but each round only touches the chunks
    that contain the merged pair."""
    pattern = resolve_pattern(pattern)
    special_tokens = tuple(special_tokens)
    num_merges = vocab_size - 256 - len(special_tokens)
    if num_merges < 0:
        raise ValueError(f"vocab_size={vocab_size} is below 256 bytes + {len(special_tokens)} special tokens")

    # Each distinct chunk once, with how often it occurs, in order of first appearance: a word
    # that occurs 5000 times is merged once and counts 5000 times.
    split = regex.compile(pattern).findall
    chunk_counts = Counter()
    for doc in [text] if isinstance(text, str) else text:
        chunk_counts.update(split(doc))
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]  # current ids of each chunk
    freqs = list(chunk_counts.values())

    # counts: pair -> occurrences in the text. where: pair -> chunks it may occur in (a superset:
    # a chunk stays listed after the pair has left it). first: pair -> (chunk, byte offset) of its
    # first occurrence, or a lower bound of it (see pop_best).
    counts, where, first = {}, defaultdict(set), {}
    for ci, (w, f) in enumerate(zip(words, freqs)):
        for j in range(len(w) - 1):
            pair = (w[j], w[j + 1])
            if pair in counts:
                counts[pair] += f
            else:
                counts[pair] = f
                first[pair] = (ci, j)  # every id is one byte long here, so index j is byte offset j
            where[pair].add(ci)
    nbytes = [1] * 256  # length in bytes of each id, to turn positions into byte offsets

    # Python's max over a dict of counts filled in text order returns, among the most frequent
    # pairs, the one seen first; so the priority is (-count, chunk of first occurrence, byte
    # offset in it). Outdated entries stay in the heap and are skipped when popped ("lazy deletion").
    heap = [(-c, *first[pair], pair) for pair, c in counts.items()]
    heapq.heapify(heap)

    def occurs_at(w, pair, offset):
        pos = 0
        for j in range(len(w) - 1):
            if pos >= offset:
                return pos == offset and w[j] == pair[0] and w[j + 1] == pair[1]
            pos += nbytes[w[j]]
        return False

    def first_occurrence(pair):
        for ci in sorted(where[pair]):
            w, pos = words[ci], 0
            for j in range(len(w) - 1):
                if w[j] == pair[0] and w[j + 1] == pair[1]:
                    return (ci, pos)
                pos += nbytes[w[j]]
            where[pair].discard(ci)  # it left this chunk in an earlier merge
        raise AssertionError(f"pair {pair} has a count but no occurrence")

    def pop_best():
        # A pair only gains occurrences in the merge that creates its newer id; after that it can
        # only lose them, so its first occurrence only moves later. first[pair] is therefore always
        # a lower bound, and exact when that occurrence still exists: check that for the winner only.
        while heap:
            negc, ci, offset, pair = heapq.heappop(heap)
            if counts.get(pair) != -negc or first[pair] != (ci, offset):
                continue  # outdated entry: a newer one for this pair is in the heap
            if ci >= 0 and occurs_at(words[ci], pair, offset):
                return pair
            first[pair] = first_occurrence(pair)
            heapq.heappush(heap, (negc, *first[pair], pair))
        return None

    merges = []
    while len(merges) < num_merges:
        pair = pop_best()
        if pair is None:
            break  # every chunk is a single token
        a, b = pair
        z = 256 + len(merges)
        merges.append(pair)
        nbytes.append(nbytes[a] + nbytes[b])
        if verbose:
            token = render_bytes(_pair_bytes(merges, z))
            print(f"merge {len(merges)}/{num_merges}: {pair} -> {z} [{token}] count={counts[pair]}")

        # Replace (a, b) by z in every chunk that has it, left to right. Around each replaced pair,
        # (prev, a) and (b, next) disappear and (prev, z) and (z, next) appear; when two replaced
        # pairs touch ("abab"), (b, a) disappears once and (z, z) appears once.
        delta = defaultdict(int)
        for ci in where.pop(pair):
            w, f = words[ci], freqs[ci]
            n, i, new = len(w), 0, []
            while i < n:
                if w[i] == a and i + 1 < n and w[i + 1] == b:
                    if i > 0:
                        delta[w[i - 1], a] -= f
                        delta[new[-1], z] += f
                        where[new[-1], z].add(ci)
                    i += 2
                    if i < n and not (w[i] == a and i + 1 < n and w[i + 1] == b):
                        delta[b, w[i]] -= f
                        delta[z, w[i]] += f
                        where[z, w[i]].add(ci)
                    new.append(z)
                else:
                    new.append(w[i])
                    i += 1
            words[ci] = new
        del counts[pair], first[pair]
        for q, d in delta.items():
            if q == pair:
                continue  # (a, a) pairs next to a merged (a, a) vanish with it
            c = counts.get(q, 0) + d
            if c:
                counts[q] = c
                first.setdefault(q, (-1, -1))  # new pair: lower bound, found exactly when needed
                heapq.heappush(heap, (-c, *first[q], q))
            else:
                del counts[q], first[q]
                where.pop(q, None)

    specials = {name: 256 + len(merges) + i for i, name in enumerate(special_tokens)}
    return Tokenizer("bpe", pattern=pattern, merges=merges, special_tokens=specials)


def _pair_bytes(merges, token_id):
    if token_id < 256:
        return bytes([token_id])
    a, b = merges[token_id - 256]
    return _pair_bytes(merges, a) + _pair_bytes(merges, b)


def render_bytes(b):
    """A token's bytes as readable text: invalid UTF-8 as \\xNN, control characters escaped."""
    s = b.decode("utf-8", errors="backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


# -----------------------------------------------------------------------------
# the tokenizer


# texts whose splits tell the usual pre-tokenizer patterns apart (Tokenizer.same_ids_as)
_PROBES = ("Hello world, it's 2024! I'll say: don't", "  two  spaces\n\n\tand tabs \r\n", "12345 6789.0 x1y2",
           "naïve café — 東京 🙂", "CAPS'LL 'S 'd", "a\n b \n\nc", "((x))+= <|endoftext|> ~!")


class Tokenizer:
    """A byte, bpe, gpt2 or hf tokenizer. For byte and bpe, ids 0..255 are the byte values, merged
    ids follow, then the special tokens. gpt2 and hf take their ids from their ranks (tiktoken's,
    or the folder's), where the single bytes need not come first, and their special tokens may sit
    anywhere among them (a tokenizer trained with the tokenizers library puts them first): every id
    0 .. n_vocab - 1 is an ordinary token or a special one, exactly once. normalizer (hf only: None
    or "NFC", Qwen2's) is applied to the text before it is encoded. Encoding runs in tiktoken."""

    def __init__(self, kind, pattern=None, merges=(), special_tokens=None, ranks=None, normalizer=None):
        if kind not in KINDS + ("hf",):
            raise ValueError(f"unknown tokenizer kind {kind!r}, expected one of {KINDS + ('hf',)}")
        if kind in ("bpe", "hf") and not isinstance(pattern, str):
            raise ValueError(f"a {kind} tokenizer needs its split pattern, got {pattern!r}")
        if normalizer not in NORMALIZERS or (normalizer and kind != "hf"):
            raise ValueError(f"normalizer={normalizer!r}: expected None, or {' | '.join(NORMALIZERS[1:])} "
                             "for an hf tokenizer")
        self.kind = kind
        self.pattern = pattern
        self.normalizer = normalizer
        self.special_tokens = dict(special_tokens or {})
        for name, i in self.special_tokens.items():
            if not isinstance(name, str) or not name or type(i) is not int:
                raise ValueError(f"special tokens must map non-empty strings to ids, got {name!r}: {i!r}")

        if ranks is not None:  # gpt2, hf: {token bytes: rank}, which is also the id; merges are implicit
            self.merges = None
            ordinary = {rank: token for token, rank in ranks.items()}  # id -> bytes
            if len(ordinary) != len(ranks):
                raise ValueError(f"two tokens of this {kind} tokenizer share a rank")
        else:
            self.merges = [tuple(pair) for pair in merges]
            vocab = [bytes([i]) for i in range(256)]
            for i, (a, b) in enumerate(self.merges):
                if not (0 <= a < 256 + i and 0 <= b < 256 + i):
                    raise ValueError(f"merge {i} = {(a, b)} uses an id that does not exist yet")
                vocab.append(vocab[a] + vocab[b])
            # tiktoken merges by the rank of the joined bytes; the i-th merge has rank 256 + i.
            # Should two merges spell the same bytes, the earlier one is the one encoding produces.
            ranks = {}
            for i, token in enumerate(vocab):
                ranks.setdefault(token, i)
            ordinary = dict(enumerate(vocab))

        # tiktoken keeps the ordinary ranks and the special ids apart and takes any ids for either;
        # what it cannot tell us is an id used twice or left out, so that is checked here
        n_vocab = len(ordinary) + len(self.special_tokens)
        taken = Counter([*ordinary, *self.special_tokens.values()])
        twice = sorted(i for i, c in taken.items() if c > 1)
        missing = sorted(set(range(n_vocab)) - set(taken))
        if twice or missing:
            raise ValueError(f"the {len(ordinary)} tokens and {len(self.special_tokens)} special tokens of a {kind} "
                             f"tokenizer must take the ids 0..{n_vocab - 1} once each, but id " +
                             (f"{twice[0]} is taken twice" if twice else f"{missing[0]} is missing"))
        specials = {i: name.encode("utf-8") for name, i in self.special_tokens.items()}
        self.vocab = [ordinary[i] if i in ordinary else specials[i] for i in range(n_vocab)]  # id -> bytes
        self.n_vocab = n_vocab
        self._enc = tiktoken.Encoding(
            f"{kind}{self.n_vocab}",
            pat_str=pattern or GPT4_PATTERN,  # byte: any split gives the same bytes
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )

    def same_ids_as(self, other):
        """Whether two tokenizers map text to the same ids, whatever their kinds (a Hugging Face
        folder's GPT-2 and tiktoken's gpt2 are one tokenizer): the same bytes behind every id, the
        same special tokens, and the same ids for a set of probe texts, which catches two split
        patterns that differ (patterns may be spelled differently and still split alike)."""
        if (self.vocab, self.special_tokens, self.normalizer) != (other.vocab, other.special_tokens, other.normalizer):
            return False
        return all(self.encode_ordinary(t) == other.encode_ordinary(t) for t in _PROBES)

    def __repr__(self):
        merges = "" if self.merges is None else f", {len(self.merges)} merges"
        specials = list(self.special_tokens)
        normalizer = f", normalizer={self.normalizer}" if self.normalizer else ""
        return f"Tokenizer({self.kind}, n_vocab={self.n_vocab}{merges}{normalizer}, special_tokens={specials})"

    # --- encoding and decoding

    def encode_ordinary(self, text):
        """Text to ids, special-token strings included, as plain text."""
        return self._enc.encode_ordinary(self.normalize(text))

    def normalize(self, text):
        """The text as the tokenizer encodes it: unchanged, or in Unicode normal form (NFC composes
        "e" + U+0301 into "é"), so decode(encode(text)) gives the normalised text back."""
        return unicodedata.normalize(self.normalizer, text) if self.normalizer else text

    def encode(self, text, allowed_special=(), refuse_special=False):
        """Text to ids. A special token's string becomes its id only if allowed_special names it
        (a set of names, or "all"); otherwise it is encoded as plain text, so that text typed by a
        user can never forge an <|endoftext|>; with refuse_special=True it raises ValueError."""
        if allowed_special == "all":
            allowed = set(self.special_tokens)
        else:
            allowed = {allowed_special} if isinstance(allowed_special, str) else set(allowed_special)
            for name in allowed:
                self.special_id(name)  # fail on unknown names
        text = self.normalize(text)  # a special token's name is ASCII: NFC leaves it, and its edges, alone
        if refuse_special:
            for name in self.special_tokens:
                if name not in allowed and name in text:
                    raise ValueError(f"text contains the special token {name!r}; pass allowed_special="
                                     f"{{{name!r}}} to encode it as its id, or refuse_special=False to "
                                     "encode it as plain text")
        if not allowed:
            return self._enc.encode_ordinary(text)
        return self._enc.encode(text, allowed_special=allowed, disallowed_special=())

    def with_special_tokens(self, names):
        """This tokenizer with those of `names` it lacks appended as special tokens, at the next
        free ids; every id it had keeps its meaning. Itself when nothing is missing. SFT uses it to
        add the chat template's tokens to a tokenizer from elsewhere."""
        missing = [name for name in names if name not in self.special_tokens]
        if not missing:
            return self
        state = self.state()
        for i, name in enumerate(missing):
            state["special_tokens"][name] = self.n_vocab + i
        return Tokenizer.from_state(state)

    def special_id(self, name):
        if name not in self.special_tokens:
            raise ValueError(f"no special token {name!r} in this {self.kind} tokenizer "
                             f"(it has {list(self.special_tokens)})")
        return self.special_tokens[name]

    def decode_bytes(self, ids):
        """Ids to bytes. A multi-byte character may be split across tokens, so streaming code should
        join bytes and decode only complete characters."""
        ids = list(ids)
        if ids and not 0 <= min(ids) <= max(ids) < self.n_vocab:
            bad = next(int(i) for i in ids if not 0 <= i < self.n_vocab)
            raise ValueError(f"token id {bad} is outside the vocabulary 0..{self.n_vocab - 1} "
                             f"of this {self.kind} tokenizer")
        vocab = self.vocab
        return b"".join([vocab[i] for i in ids])

    def decode(self, ids):
        """Ids to text; bytes that are not valid UTF-8 (a cut character) become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # --- the chat template

    def render_conversation(self, messages):
        """A conversation -> (ids, loss_mask), the training sequence of supervised fine-tuning.

        messages: [{"role": "system" | "user" | "assistant", "content": str}, ...]. The sequence is
        <|endoftext|>, then for each message its role token, its content and <|end|>:

            <|endoftext|><|user|>What is 2 + 3?<|end|><|assistant|>5<|end|>
            mask:  0          0   0 ...          0     0            1 1

        loss_mask[i] = 1 where ids[i] is a token the model must learn to produce: the content of
        every assistant message and its closing <|end|> (which is how it learns to stop). The
        role tokens are inserted by id and the contents encoded with encode_ordinary, so a message
        that spells "<|assistant|>" stays text and cannot open a turn of its own."""
        end = self.special_id("<|end|>")
        ids, mask = [self.special_id("<|endoftext|>")], [0]
        for i, m in enumerate(messages):
            role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
            if role not in ("system", "user", "assistant") or not isinstance(content, str):
                raise ValueError(f"message {i}: expected a role system | user | assistant and a string "
                                 f"content, got {m!r:.80}")
            body = self.encode_ordinary(content) + [end]
            ids.append(self.special_id(f"<|{role}|>"))
            mask.append(0)
            ids += body
            mask += [int(role == "assistant")] * len(body)
        return ids, mask

    def render_prompt(self, messages):
        """The conversation so far, then <|assistant|>: what the model continues to answer.
        Generation stops at <|end|>. The same ids as render_conversation up to the point where
        the assistant's reply begins, so a model sees at inference what it saw in training."""
        ids, _ = self.render_conversation(messages)
        return ids + [self.special_id("<|assistant|>")]

    # --- saving and loading

    def state(self):
        """Everything needed to rebuild this tokenizer, as JSON-serialisable values (checkpoints
        embed it so that sampling never needs the data folder)."""
        state = {
            "format": FORMAT,
            "kind": self.kind,
            "pattern": self.pattern,
            "merges": None if self.merges is None else [list(pair) for pair in self.merges],
            "special_tokens": dict(self.special_tokens),
        }
        if self.kind == "hf":
            # every ordinary token in id order, spelled as GPT-2's files spell it, "" at a special
            # token's id, up to the last ordinary id (specials after it need no place holders)
            special_ids = set(self.special_tokens.values())
            ranks = [("" if i in special_ids else spell(token)) for i, token in enumerate(self.vocab)]
            while ranks and ranks[-1] == "":
                ranks.pop()
            state["ranks"] = ranks
            if self.normalizer:
                state["normalizer"] = self.normalizer
        return state

    @classmethod
    def from_state(cls, state, source="tokenizer state"):
        """Rebuild from state(). Raises ValueError, naming `source`, if the state is not one."""

        def bad(what):
            return ValueError(f"{source}: {what}")

        if not isinstance(state, dict) or state.get("format") != FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise bad(f"not a tokenizer state of format {FORMAT!r} (found {found!r})")
        missing = {"kind", "pattern", "merges", "special_tokens"} - set(state)
        if missing:
            raise bad(f"missing {sorted(missing)}")
        kind, specials = state["kind"], state["special_tokens"]
        if not isinstance(specials, dict) or not all(isinstance(v, int) for v in specials.values()):
            raise bad(f"special_tokens must map names to ids, got {specials!r}")
        if kind == "gpt2":
            tok = gpt2_tokenizer(sorted(specials, key=specials.get))
            if tok.special_tokens != specials:
                raise bad(f"special tokens {specials} differ from those gpt2 gives them {tok.special_tokens}")
            return tok
        if kind == "hf":
            ranks = state.get("ranks")
            if not isinstance(ranks, list) or not all(isinstance(t, str) for t in ranks):
                raise bad("an hf tokenizer needs its ranks, a list of tokens spelled as strings")
            try:
                return cls("hf", pattern=state["pattern"], special_tokens=specials, normalizer=state.get("normalizer"),
                           ranks={unspell(t): i for i, t in enumerate(ranks) if t})
            except ValueError as e:
                raise bad(e) from None
        merges = state["merges"]
        if not isinstance(merges, list) or not all(
                isinstance(m, (list, tuple)) and len(m) == 2 and all(type(x) is int for x in m) for m in merges):
            raise bad("merges must be a list of [id, id] pairs")
        if kind == "byte" and merges:
            raise bad("a byte tokenizer has no merges")
        try:
            return cls(kind, pattern=state["pattern"], merges=merges, special_tokens=specials)
        except ValueError as e:
            raise bad(e) from None

    def save(self, path):
        """Write `path` (read by load) and its human-readable twin, `path` with the suffix .vocab."""
        s = self.state()
        lines = [FORMAT, f"kind {s['kind']}", f"pattern {json.dumps(s['pattern'])}"]
        if "normalizer" in s:
            lines += [f"normalizer {s['normalizer']}"]
        lines += [f"special_tokens {len(s['special_tokens'])}"]
        lines += [f"{json.dumps(name)} {i}" for name, i in s["special_tokens"].items()]
        lines += [f"merges {len(s['merges'] or [])}"]
        lines += [f"{a} {b}" for a, b in s["merges"] or []]
        if "ranks" in s:  # hf: one token a line, spelled without whitespace; an empty line at a special id
            lines += [f"ranks {len(s['ranks'])}", *s["ranks"]]
        lines += ["end"]
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        with open(vocab_path(path), "w", encoding="utf-8") as f:
            f.write(f"# {self!r}, saved as {os.path.basename(path)}\n")
            f.write("# id [token bytes as text] <- the pair it was merged from\n")
            specials = {i: name for name, i in self.special_tokens.items()}
            for i, token in enumerate(self.vocab):
                line = f"{i} [{render_bytes(token)}]"
                if i in specials:
                    line += " special"
                elif self.merges and i >= 256:
                    a, b = self.merges[i - 256]
                    line += f" <- {a} [{render_bytes(self.vocab[a])}] + {b} [{render_bytes(self.vocab[b])}]"
                f.write(line + "\n")

    @classmethod
    def load(cls, path):
        """Read a file written by save(). Raises ValueError naming the file and what is wrong."""
        if not os.path.isfile(path):
            raise ValueError(f"tokenizer file {path} does not exist")
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not a tokenizer file (not UTF-8 text)") from None
        if not lines:
            raise ValueError(f"{path}: the file is empty (truncated?)")
        if not lines[0].startswith(FORMAT.split()[0]):
            raise ValueError(f"{path}: not a tokenizer file (first line {lines[0][:60]!r}, expected {FORMAT!r})")
        if lines[0] != FORMAT:
            raise ValueError(f"{path}: version {lines[0]!r} is not the one this code reads, {FORMAT!r}")
        pos = 1

        def take(what, prefix=""):
            # the next line, which must start with prefix; returns the rest of it
            nonlocal pos
            if pos == len(lines):
                raise ValueError(f"{path}: the file ends at line {pos}, before {what} (truncated?)")
            line = lines[pos]
            if not line.startswith(prefix):
                raise ValueError(f"{path} line {pos + 1}: expected {what}, found {line[:60]!r} (damaged?)")
            pos += 1
            return line[len(prefix):]

        def number(s, what):
            if not s.isdigit():
                raise ValueError(f"{path} line {pos}: expected {what}, found {s!r} (damaged?)")
            return int(s)

        try:
            state = {"format": FORMAT, "kind": take("the kind", "kind ")}
            state["pattern"] = json.loads(take("the pattern", "pattern "))
            if pos < len(lines) and lines[pos].startswith("normalizer "):
                state["normalizer"] = take("the normalizer", "normalizer ")
            state["special_tokens"] = {}
            for _ in range(number(take("the special tokens", "special_tokens "), "a count")):
                name, _, i = take("a special token").rpartition(" ")
                state["special_tokens"][json.loads(name)] = number(i, "an id")
            state["merges"] = []
            for _ in range(number(take("the merges", "merges "), "a count")):
                a, _, b = take("a merge").partition(" ")
                state["merges"].append([number(a, "an id"), number(b, "an id")])
            if state["kind"] == "hf":
                state["ranks"] = [take("a token") for _ in range(number(take("the ranks", "ranks "), "a count"))]
            if take("the end line") != "end" or pos != len(lines):
                raise ValueError(f"{path} line {pos}: expected the last line, 'end' (damaged?)")
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {pos}: damaged ({e})") from None
        return cls.from_state(state, source=path)


def has_chat_template(tok):
    """Whether tok can render a conversation for a reply (render_prompt with the <|user|>,
    <|assistant|> and <|end|> tokens), as a fine-tuned model's tokenizer does."""
    return hasattr(tok, "render_prompt") and {"<|user|>", "<|assistant|>", "<|end|>"} <= set(tok.special_tokens)


def vocab_path(path):
    """The human-readable twin of a saved tokenizer."""
    return os.path.splitext(path)[0] + ".vocab"


# -----------------------------------------------------------------------------
# the other kinds, and building tokenizers for datasets


def byte_tokenizer(special_tokens=()):
    """256 byte ids, then the special tokens."""
    return Tokenizer("byte", special_tokens={name: 256 + i for i, name in enumerate(special_tokens)})


def gpt2_tokenizer(special_tokens=()):
    """GPT-2's 50257 ids (tiktoken downloads the ranks once and caches them), then any of
    special_tokens it does not have (it has <|endoftext|> = 50256)."""
    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception as e:
        raise RuntimeError(f"the gpt2 tokenizer needs tiktoken to download its ranks once (or find them in "
                           f"TIKTOKEN_CACHE_DIR), which failed: {type(e).__name__}: {e}. "
                           "Use --tokenizer=bpe or byte.") from None
    specials = dict(enc._special_tokens)
    for name in special_tokens:
        specials.setdefault(name, enc.n_vocab + len(specials) - len(enc._special_tokens))
    ranks = enc._mergeable_ranks
    # ranks covers 0..50255; endoftext = 50256 is the first special id, as Tokenizer expects
    return Tokenizer("gpt2", pattern=enc._pat_str, special_tokens=specials, ranks=ranks)


# -----------------------------------------------------------------------------
# how GPT-2's files spell bytes (an hf tokenizer's state spells its tokens so; convert.py reads and writes the files)


def _gpt2_byte_chars():
    """GPT-2's files spell each byte as one printable character: the 188 bytes that are printable
    Latin-1 characters stand for themselves, and the other 68 (controls, space, DEL, no-break
    space, soft hyphen) become chr(256), chr(257), ... in byte order. So b" the" is spelled "Ġthe"
    (Ġ = chr(256 + 32): space is the 33rd unprintable byte) and b"\n" is "Ċ"."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + n))
            n += 1
    return chars


BYTE_CHARS = _gpt2_byte_chars()  # byte -> its character
CHAR_BYTES = {c: b for b, c in enumerate(BYTE_CHARS)}


def spell(token):
    """Token bytes -> the string GPT-2's files write for them: spell(b" the") == "Ġthe"."""
    return "".join(BYTE_CHARS[b] for b in token)


def unspell(s):
    """The inverse of spell. Raises ValueError for a character that spells no byte."""
    try:
        return bytes(CHAR_BYTES[c] for c in s)
    except KeyError as e:
        raise ValueError(f"{s!r} is not a byte-level token: {e.args[0]!r} spells no byte") from None


def get_tokenizer(kind, text="", vocab_size=4096, pattern="gpt4", special_tokens=SPECIAL_TOKENS):
    """The tokenizer a prepare script writes: byte, gpt2, or bpe trained on `text`."""
    if kind == "byte":
        return byte_tokenizer(special_tokens)
    if kind == "gpt2":
        return gpt2_tokenizer(special_tokens)
    if kind == "bpe":
        return train(text, vocab_size, pattern, special_tokens)
    raise ValueError(f"unknown tokenizer {kind!r}, expected one of {KINDS}")


def dataset_name(kind, vocab_size, pattern="gpt4"):
    """The folder a prepare script writes for this tokenizer: byte, gpt2, bpe4096, bpe4096_gpt2 ..."""
    if kind != "bpe":
        return kind
    return f"bpe{vocab_size}" + ("" if pattern == "gpt4" else "_" + (pattern if pattern in PATTERNS else "custom"))


def padded_vocab_size(n_vocab, multiple):
    """Round up to a multiple (nanoGPT's 50257 -> 50304): matmuls run faster on round shapes.
    The extra ids are never targets, so the model learns to give them no probability."""
    return -(-n_vocab // multiple) * multiple


def token_dtype(vocab_size):
    return "uint16" if vocab_size <= 2**16 else "uint32"


def write_meta(out_dir, tok, pad_vocab_to, train_tokens, val_tokens, **extra):
    """Write meta.json (and for bpe the tokenizer file and its twin) into a dataset folder.
    train.py reads these keys; load_from_meta rebuilds the tokenizer from them."""
    tokenizer_file = None
    if tok.kind == "bpe":
        tokenizer_file = "bpe.tokenizer"
        tok.save(os.path.join(out_dir, tokenizer_file))
    vocab_size = padded_vocab_size(tok.n_vocab, pad_vocab_to)
    meta = {
        "tokenizer": tok.kind,
        "tokenizer_file": tokenizer_file,
        "vocab_size": vocab_size,
        "n_vocab": tok.n_vocab,
        "pad_vocab_to": pad_vocab_to,
        "dtype": token_dtype(vocab_size),
        "special_tokens": tok.special_tokens,
        "train_tokens": train_tokens,
        "val_tokens": val_tokens,
        **extra,
    }
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return meta


def load_from_meta(meta_path):
    """The tokenizer of a dataset folder, from its meta.json."""
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read dataset meta {meta_path}: {e}") from None
    kind = meta.get("tokenizer")
    specials = meta.get("special_tokens", {})
    if kind == "byte":
        tok = byte_tokenizer(sorted(specials, key=specials.get))
    elif kind == "gpt2":
        tok = gpt2_tokenizer(sorted(specials, key=specials.get))
    elif kind == "bpe":
        if not meta.get("tokenizer_file"):
            raise ValueError(f"{meta_path}: a bpe dataset must name its tokenizer_file")
        tok = Tokenizer.load(os.path.join(os.path.dirname(meta_path), meta["tokenizer_file"]))
    else:
        raise ValueError(f"{meta_path}: unknown tokenizer {kind!r}, expected one of {KINDS}")
    if tok.special_tokens != specials or tok.n_vocab != meta.get("n_vocab"):
        raise ValueError(f"{meta_path}: the tokenizer ({tok!r}) does not match the meta "
                         f"(n_vocab={meta.get('n_vocab')}, special_tokens={specials})")
    return tok


# -----------------------------------------------------------------------------
# the tokenizer a checkpoint carries: its meta, a dataset's meta.json with the tokenizer's state in it


def dataset_meta(data_dir):
    """A dataset's meta.json, with its tokenizer's complete state folded in, so that a checkpoint
    carrying the meta can rebuild the tokenizer without the data folder (tokenizer_from_meta)."""
    path = os.path.join(data_dir, "meta.json")
    with open(path) as f:
        meta = json.load(f)
    meta["tokenizer_state"] = load_from_meta(path).state()
    return meta


def tokenizer_from_meta(meta):
    """The tokenizer a checkpoint's meta carries."""
    return Tokenizer.from_state(meta["tokenizer_state"])


def describe_tokenizer(meta):
    state = meta.get("tokenizer_state") or {}
    merges = state.get("merges")
    size = f", {len(merges)} merges" if merges else ""
    return f"{meta.get('tokenizer', state.get('kind', '?'))} ({meta.get('n_vocab', '?')} ids{size})"


def check_same_tokenizer(meta_a, name_a, meta_b, name_b):
    """Two models, or a model and a dataset, must map text to the same ids: compare the tokenizers
    their metas carry. Raises ValueError naming both when they differ."""
    if meta_a.get("tokenizer_state") == meta_b.get("tokenizer_state"):
        return
    try:  # states of different kinds may still describe one tokenizer (gpt2 and an hf GPT-2)
        same = tokenizer_from_meta(meta_a).same_ids_as(tokenizer_from_meta(meta_b))
    except (KeyError, TypeError, ValueError, RuntimeError):
        same = False
    if not same:
        raise ValueError(f"{name_a} uses the {describe_tokenizer(meta_a)} tokenizer but {name_b} uses the "
                         f"{describe_tokenizer(meta_b)} tokenizer: the ids mean different things")


# -----------------------------------------------------------------------------
# command line: train on a file, save, and report speed and compression

if __name__ == "__main__":
    # I/O
    input = ""  # a UTF-8 text file to train on
    out = ""  # where to save the tokenizer (its .vocab twin goes next to it); empty: do not save
    # tokenizer
    vocab_size = 4096  # all ids: 256 bytes + merges + special tokens
    pattern = "gpt4"  # pre-tokenizer split: gpt2 | gpt4 | a regex
    special_tokens = SPECIAL_TOKENS  # names, given the highest ids
    configure(globals())
    if not input:
        raise SystemExit("usage: python bpe.py --input=FILE [--vocab_size=4096] [--pattern=gpt4] [--out=PATH]")

    with open(input, encoding="utf-8") as f:
        text = f.read()
    t0 = time.time()
    tok = train(text, vocab_size, pattern, special_tokens)
    dt = time.time() - t0
    n_merges = len(tok.merges)
    print(f"trained {tok!r} on {len(text):,} characters")
    print(f"train_time={dt:.3f}s merges={n_merges} merges_per_s={n_merges / dt:.0f}")
    t0 = time.time()
    ids = tok.encode_ordinary(text)
    dt = time.time() - t0
    n_bytes = len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    print(f"tokens={len(ids)} bytes_per_token={n_bytes / len(ids):.3f} encode_MB_per_s={n_bytes / dt / 1e6:.1f}")
    if out:
        tok.save(out)
        print(f"saved {out} and {vocab_path(out)}")
