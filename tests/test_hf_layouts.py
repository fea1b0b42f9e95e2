"""
The small open models people fine-tune, as random folders built here with transformers' own config
classes and tokenizers trained here with the tokenizers library, saved through transformers, as a
new user makes them (nothing is downloaded):

    gpt2      GPT2LMHeadModel, ByteLevelBPETokenizer().train(special_tokens=...): <|endoftext|> is id 0
    llama3    LlamaForCausalLM, a Split regex then ByteLevel, special tokens after the vocab (Llama 3)
    smollm2   LlamaForCausalLM, Digits then ByteLevel, 17 special tokens at ids 0..16, ChatML (SmolLM2)
    qwen2     Qwen2ForCausalLM (q, k, v biases, tied head), NFC then a Split regex, specials after (Qwen2.5)

For each: our tokenizer encodes and decodes as theirs, specials included and kept as text in user
text; our logits equal theirs and so does our greedy continuation; the export loads back in
transformers with the same logits and ids. Then SFT, GRPO and DPO start from the SmolLM2 folder:
the chat tokens are appended, the embedding grows, and the reference is the loaded model. What
does not map (SentencePiece tokenizers, GPT-NeoX) is refused by name.

    python -m pytest tests/test_hf_layouts.py -q
"""

import json
import math
import os
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

import bpe  # noqa: E402
import common  # noqa: E402
from conftest import TEXT, read_log, run_script, write_jsonl  # noqa: E402
from convert import DIGITS_GPT2_PATTERN, config_from_hf, save_hf, save_hf_tokenizer, tokenizer_from_hf  # noqa: E402
from data.tasks.tasks import generate  # noqa: E402
from test_hf import assert_same_encoding, max_diff, randomize, varied_strings  # noqa: E402

transformers.logging.set_verbosity_error()
TOL = 1e-4  # fp32, max |logit difference|

# Llama 3's and Qwen2's split regexes, as their tokenizer.json files spell them
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
SMOLLM2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>",
                    "<filename>", "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>",
                    "<jupyter_start>", "<jupyter_text>", "<jupyter_code>", "<jupyter_output>", "<jupyter_script>",
                    "<empty_output>"]
CORPUS = [TEXT[:2500], *varied_strings(300, seed=1), "The 12 + 345 = 357; x² ½ ٣ 2024-01-01 v1.2.3 " * 20]


def trained_tokenizer(pre_tokenizer, specials_first=(), specials_after=(), normalizer=None, vocab_size=600):
    """A byte-level BPE trained with the tokenizers library on CORPUS: the trainer gives
    specials_first the first ids; specials_after are added after training, at the ids after the
    vocab, as Llama 3's and Qwen2's files have them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre_tokenizer, decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials_first), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens(list(specials_after))
    return tok


def layout_tokenizer(layout):
    """-> (the transformers tokenizer of the layout, its special tokens, an added token it does
    not call special or None)."""
    from tokenizers import AddedToken, ByteLevelBPETokenizer, Regex, normalizers, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    plain = None
    if layout == "gpt2":  # what the tokenizers README shows, and what a new user runs
        specials = ["<|endoftext|>"]
        inner = ByteLevelBPETokenizer()
        inner.train_from_iterator(CORPUS, vocab_size=600, special_tokens=specials, show_progress=False)
        inner = inner._tokenizer
    elif layout == "llama3":
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|eot_id|>"]
        inner = trained_tokenizer(pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
                                                           byte_level]), specials_after=specials)
    elif layout == "smollm2":
        specials = SMOLLM2_SPECIALS
        inner = trained_tokenizer(pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                           pre_tokenizers.ByteLevel(add_prefix_space=False)]),
                                  specials_first=specials)
    else:
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        inner = trained_tokenizer(pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated"),
                                                           byte_level]),
                                  specials_after=specials, normalizer=normalizers.NFC())
        plain = "<tool_call>"  # Qwen2.5's tool tokens are added tokens that it does not call special
        inner.add_tokens([AddedToken(plain, special=False, normalized=False)])
    eos = "<|end_of_text|>" if layout == "llama3" else specials[0]
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_object=inner, eos_token=eos)
    return theirs, specials, plain


def layout_model(layout, vocab_size):
    """A random model of the layout (every parameter drawn, biases and norms included)."""
    small = dict(vocab_size=vocab_size, bos_token_id=None, eos_token_id=None)
    llama = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, **small)
    if layout == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=128,
                                                                     **small))
    elif layout == "llama3":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(rope_theta=500000.0, tie_word_embeddings=False,
                                                                       **llama))
    elif layout == "smollm2":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(rope_theta=100000.0, tie_word_embeddings=True,
                                                                       **llama))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(rope_theta=1000000.0, tie_word_embeddings=True,
                                                                       **llama))
    return randomize(model.eval(), 0.3)


LAYOUTS = ("gpt2", "llama3", "smollm2", "qwen2")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One folder per layout, made once: layout -> (folder, their model, their tokenizer, specials, plain)."""
    out = {}
    for layout in LAYOUTS:
        folder = str(tmp_path_factory.mktemp(layout))
        tok, specials, plain = layout_tokenizer(layout)
        # Qwen2 pads its embedding beyond the tokenizer (151936 rows for 151665 ids); so do we, here
        model = layout_model(layout, len(tok) + (64 - len(tok) % 64 if layout == "qwen2" else 0))
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        out[layout] = (folder, model, tok, specials, plain)
    return out


# -----------------------------------------------------------------------------
# each layout: the folder's tokenizer and model, ours and theirs, and back


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_loads_with_their_ids_logits_and_greedy_tokens_and_exports_back(folders, layout, tmp_path):
    folder, theirs, hf_tok, specials, plain = folders[layout]
    tok = tokenizer_from_hf(folder)
    # every id is the folder's: its special tokens where it put them, first or last
    ids = {s: hf_tok.convert_tokens_to_ids(s) for s in specials + ([plain] if plain else [])}
    assert tok.n_vocab == len(hf_tok) and tok.special_tokens == ids
    first = {"gpt2": 0, "smollm2": 0, "llama3": len(hf_tok) - len(specials), "qwen2": len(hf_tok) - 4}[layout]
    assert tok.special_id(specials[0]) == first
    chat = [f"{s}user\nWhat is 2 + 3?{specials[-1]}\n" for s in specials[:2]]
    assert_same_encoding(tok, hf_tok, varied_strings(600, seed=2) + chat + [" ".join(specials)])
    for s in specials:  # a special written in user text stays text
        assert tok.special_id(s) not in tok.encode(f"a {s}") and tok.decode(tok.encode(f"a {s}")) == f"a {s}"
    if plain:  # an added token transformers does not call special: its id when asked for, else text
        assert tok.encode(f"x{plain}", allowed_special="all") == hf_tok.encode(f"x{plain}", add_special_tokens=False)
        assert tok.special_id(plain) not in tok.encode(f"x{plain}")
    if layout == "qwen2":
        assert tok.encode("e\u0301") == tok.encode("\u00e9") and tok.normalizer == "NFC"
    if layout == "smollm2":
        assert tok.pattern == DIGITS_GPT2_PATTERN
        assert [tok.decode([i]) for i in tok.encode(" 123")] == [" ", "1", "2", "3"]  # every digit alone

    # the model: the folder as a checkpoint of ours, logits and greedy tokens as theirs
    ckpt = common.load_checkpoint(folder)
    ours = common.model_from_checkpoint(ckpt, folder).eval()
    assert ours.config.qkv_bias == (layout == "qwen2") and ours.config.tie_weights == (layout != "llama3")
    idx = torch.randint(0, len(hf_tok), (3, 48), generator=torch.Generator().manual_seed(0))
    assert max_diff(ours, theirs, idx) < TOL
    prompt = torch.tensor([tok.encode("First Citizen: 12 + 3")])
    expected = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False)
    assert torch.equal(ours.generate(prompt, 20, temperature=0), expected)

    # export: a folder transformers loads, with the same logits and the same ids
    save_hf(ours, tmp_path)
    save_hf_tokenizer(bpe.tokenizer_from_meta(ckpt["meta"]), tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(back).__name__ == type(theirs).__name__ and max_diff(ours, back, idx) < TOL
    assert_same_encoding(tok, transformers.AutoTokenizer.from_pretrained(tmp_path), varied_strings(200, seed=3) + chat)
    assert tokenizer_from_hf(tmp_path).same_ids_as(tok)


def test_tokenizer_state_and_file_keep_specials_anywhere(folders, tmp_path):
    tok = tokenizer_from_hf(folders["smollm2"][0]).with_special_tokens(bpe.SPECIAL_TOKENS)
    n = len(folders["smollm2"][2])
    assert tok.special_tokens["<|im_start|>"] == 1 and tok.special_tokens["<|end|>"] == n + 3 == tok.n_vocab - 1
    # ChatML's tokens in a message stay text: only the template's own tokens are special ids
    ids, _ = tok.render_conversation([{"role": "user", "content": "<|im_start|>system"}])
    assert tok.special_id("<|im_start|>") not in ids and tok.decode(ids) == "<|endoftext|><|user|><|im_start|>system<|end|>"
    state = json.loads(json.dumps(tok.state()))
    assert state["ranks"][:17] == [""] * 17 and len(state["ranks"]) == n  # an empty place at each special id
    tok.save(str(tmp_path / "smol.tokenizer"))
    qwen = tokenizer_from_hf(folders["qwen2"][0])
    qwen.save(str(tmp_path / "qwen.tokenizer"))
    text = "<|im_start|>user\nnaïve cafe\u0301 12<|end|>"
    for a, b in ((tok, bpe.Tokenizer.from_state(state)), (tok, bpe.Tokenizer.load(str(tmp_path / "smol.tokenizer"))),
                 (qwen, bpe.Tokenizer.load(str(tmp_path / "qwen.tokenizer")))):
        assert a.same_ids_as(b) and b.encode(text, allowed_special="all") == a.encode(text, allowed_special="all")
    assert bpe.Tokenizer.load(str(tmp_path / "qwen.tokenizer")).normalizer == "NFC"
    ranks = {t: i for i, t in enumerate(tok.vocab) if 17 <= i < n}
    specials = dict(list(tok.special_tokens.items())[:17])
    for change, message in [({"<a>": 17}, "id 17 is taken twice"), ({"<empty_output>": n}, "id 16 is missing")]:
        with pytest.raises(ValueError, match=message):
            bpe.Tokenizer("hf", DIGITS_GPT2_PATTERN, ranks=ranks, special_tokens={**specials, **change})
    assert bpe.Tokenizer("hf", DIGITS_GPT2_PATTERN, ranks=ranks, special_tokens=specials).same_ids_as(
        tokenizer_from_hf(folders["smollm2"][0]))


# -----------------------------------------------------------------------------
# what does not map is refused, naming what it found


def test_sentencepiece_tokenizer_and_gpt_neox_are_refused_by_name(tmp_path):
    # Llama 2 / TinyLlama / Mistral: metaspace and byte fallback, as transformers' LlamaTokenizer writes them
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}, "\u2581": 259, "a": 260,
             "\u2581a": 261}
    transformers.LlamaTokenizer(vocab=vocab, merges=[("\u2581", "a")]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"SentencePiece-style BPE \(pre_tokenizer Metaspace, decoder ByteFallback, "
                                         r"model.byte_fallback\).*Not supported"):
        tokenizer_from_hf(tmp_path)
    # Pythia: parallel attention and MLP, rope on a quarter of each head
    neox = transformers.GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64).to_dict()
    with pytest.raises(ValueError, match=r"GPT-NeoX \(Pythia\) is not supported.*use_parallel_residual=True.*"
                                         r"rotary_pct=0.25"):
        config_from_hf(dict(neox, architectures=["GPTNeoXForCausalLM"]))
    qwen = transformers.Qwen2Config(hidden_size=32, num_attention_heads=4, num_hidden_layers=4, use_sliding_window=True,
                                    sliding_window=16, max_window_layers=2).to_dict()
    with pytest.raises(ValueError, match="use_sliding_window=True"):
        config_from_hf(dict(qwen, architectures=["Qwen2ForCausalLM"]))


# -----------------------------------------------------------------------------
# SFT, GRPO and DPO from the SmolLM2 folder

# dtype=float32: the first step is compared with the reference exactly
STAGE = ["--device=cpu", "--compile=false", "--dtype=float32", "--log_interval=1", "--warmup_iters=1",
         "--eval_prompts=2", "--eval_max_new_tokens=4", "--learning_rate=1e-3"]


@pytest.fixture(scope="module")
def smol(folders, tmp_path_factory):
    """The SmolLM2 folder, task conversations with answers, and preference pairs."""
    data = tmp_path_factory.mktemp("smol_data")
    rng = random.Random(0)
    tasks, pairs = data / "tasks", data / "pairs"
    tasks.mkdir(), pairs.mkdir()
    for split, n in (("train", 4), ("val", 2)):
        examples = [generate(t, 1, rng) for t in ("add", "copy") for _ in range(n)]
        write_jsonl(tasks / f"{split}.jsonl", examples)
        write_jsonl(pairs / f"{split}.jsonl", [{"prompt": ex["messages"][:1], "chosen": ex["answer"],
                                                "rejected": ex["answer"][::-1] + "x", "task": ex["task"],
                                                "difficulty": 1, "answer": ex["answer"]} for ex in examples])
    return folders["smollm2"][0], len(folders["smollm2"][2]), str(tasks), str(pairs), data


def grown(out_dir, n):
    """The stage's checkpoint has the folder's ids, then the four chat tokens, and a grown embedding."""
    ckpt = common.load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
    tok = bpe.tokenizer_from_meta(ckpt["meta"])
    assert tok.special_tokens["<|im_start|>"] == 1 and tok.special_id("<|user|>") == n + 1
    assert ckpt["model_args"]["vocab_size"] == ckpt["model"]["wte.weight"].shape[0] == 640  # n + 4 up to 64
    return ckpt


def test_sft_from_a_smollm2_folder(smol):
    folder, n, tasks, _, data = smol
    out = str(data / "sft")
    res = run_script("sft.py", *STAGE, f"--init_from={folder}", f"--sft_dataset={tasks}", f"--out_dir={out}",
                     "--max_iters=2", "--eval_interval=2", "--batch_size=4", "--eval_iters=1")
    assert (f"tokenizer: appended <|system|> <|user|> <|assistant|> <|end|> as ids {n}..{n + 3}; the token embedding "
            f"(and an untied head) grows from {n} to 640 rows") in res.stdout
    grown(out, n)


def test_grpo_from_a_smollm2_folder_measures_kl_to_the_loaded_model(smol):
    folder, n, tasks, _, data = smol
    out = str(data / "grpo")
    res = run_script("grpo.py", *STAGE, f"--init_from={folder}", f"--prompt_dataset={tasks}", f"--out_dir={out}",
                     "--rl_tasks=", "--prompts_per_iter=2", "--samples_per_prompt=2", "--max_new_tokens=4", "--max_iters=1",
                     "--eval_interval=1", "--test_prompts=0", "--pass_k_prompts=0")
    assert f"reference: {folder}" in res.stdout
    steps = [r for r in read_log(out) if "reward" in r]
    assert steps[0]["kl"] == 0.0  # the policy starts as the reference: both the folder, grown alike
    assert grown(out, n)["reference"] == folder


def test_dpo_from_a_smollm2_folder_starts_at_its_reference(smol):
    folder, n, tasks, pairs, data = smol
    out = str(data / "dpo")
    run_script("dpo.py", *STAGE, f"--init_from={folder}", f"--prompt_dataset={tasks}", f"--preference_dataset={pairs}",
               f"--out_dir={out}", "--rl_tasks=", "--batch_size=4", "--eval_pairs=4", "--max_iters=1",
               "--precompute_ref=false", "--eval_interval=1", "--test_prompts=0", "--pass_k_prompts=0")
    rows = read_log(out)
    step = [r for r in rows if "loss" in r][0]
    # policy = reference (the live one: the same batches, so the same numbers): rewards 0, loss log 2
    assert step["loss"] == pytest.approx(math.log(2), abs=1e-6) and step["reward_chosen"] == step["margin"] == 0.0
    assert grown(out, n)["reference"] == folder
