#!/usr/bin/env python3
"""Make the Hugging Face reference fixtures under tests/fixtures/.

    python scripts/make_fixtures.py [--out tests/fixtures]

Writes two tiny random-weight checkpoints in the exact on-disk formats of
`transformers` / `sentence-transformers`, plus the numbers `transformers`
computes from them, so that the Rust loaders can be checked without a network:

  tiny-bert/   BertModel (no `bert.` prefix, like sentence-transformers
               checkpoints), WordPiece tokenizer.json, modules.json,
               1_Pooling/config.json, reference.safetensors + reference.json
  tiny-gpt2/   GPT2LMHeadModel (tied lm_head), byte-level BPE tokenizer.json,
               reference.safetensors + reference.json

Deterministic: fixed seeds, one CPU thread, deterministic torch algorithms;
re-running reproduces byte-identical files (with the same package versions).
Python is only needed to regenerate the fixtures, never to use formers.
"""

import argparse
import json
import os
import platform
import shutil
import sys

import numpy as np
import safetensors
import tokenizers
import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "data", "shakespeare.txt")

SEED = 1234  # torch.manual_seed before building each model
BERT_WEIGHT_SEED = 1235  # generator for the weights actually saved
# Chosen among seeds 0..19 so that the greedy continuations of every prompt
# use many distinct tokens (a random GPT-2 often repeats one token forever,
# which would not test the KV cache) and no greedy step is a near-tie.
GPT2_WEIGHT_SEED = 1
INIT_STD = 0.2  # weights ~ N(0, 0.2^2); biases ~ N(0, 0.1^2)
LN_STD = 0.1  # LayerNorm weight = 1 + 0.1*randn, bias = 0.1*randn
MAX_POS = 64
HIDDEN = 36
HEADS = 3
LAYERS = 2

BERT_VOCAB = 300
GPT2_VOCAB = 400
GREEDY_NEW = 15

BERT_TEXTS = [
    "Hamlet",
    "To be, or not to be.",
    "Something is rotten in the state of Denmark.",
    "The café serves wine at 9 o'clock; what's the €-price?",
    "Out, damned spot! out, I say! One; two: why, then 'tis time to do't. Hell is murky!",
    "We are such stuff as dreams are made on, and our little life is rounded with a sleep; "
    "sir, I am vexed, bear with my weakness.",
]

GPT2_TEXTS = [
    "The",
    "To be or not",
    "Tomorrow, and tomorrow, and tomorrow",
    "Our revels now are ended. These our actors, as I foretold you, were all spirits",
]


def versions():
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
    }


def corpus_lines():
    with open(CORPUS, encoding="utf-8") as f:
        return [line for line in f.read().splitlines() if line.strip()]


# ---------------------------------------------------------------- tokenizers


def train_wordpiece_vocab():
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=BERT_VOCAB, special_tokens=specials, continuing_subword_prefix="##", show_progress=False
    )
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    # The trainer picks a deterministic set of tokens but numbers tied ones in
    # a varying order (hash-map iteration), so renumber canonically: specials
    # first, then by (length without "##", is-continuation, text). WordPiece
    # tokenisation is greedy longest-match and does not depend on the ids.
    vocab = tok.get_vocab()
    rest = sorted(
        (t for t in vocab if t not in specials),
        key=lambda t: (len(t[2:]) if t.startswith("##") else len(t), t.startswith("##"), t),
    )
    return {t: i for i, t in enumerate(specials + rest)}


def make_bert_tokenizer():
    vocab = train_wordpiece_vocab()
    assert vocab == train_wordpiece_vocab(), "WordPiece training is not deterministic"
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", continuing_subword_prefix="##", max_input_chars_per_word=100))
    tok.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    for i, s in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return tok


def make_gpt2_tokenizer():
    tok = train_bpe()
    assert tok.to_str() == train_bpe().to_str(), "BPE training is not deterministic"
    return tok


def train_bpe():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=GPT2_VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    return tok


# ---------------------------------------------------------------- weights


def randomise(model, gen):
    """Overwrite every parameter with seeded noise, in sorted-name order.

    Independent of how transformers initialises (which changes between
    versions): weights/embeddings ~ N(0, INIT_STD), biases ~ N(0, 0.1),
    LayerNorm weight ~ 1 + N(0, LN_STD), LayerNorm bias ~ N(0, LN_STD).
    Non-zero biases and non-trivial norms make a missing or misplaced
    bias/norm visible in the tests.
    """
    norm_params = set()
    for mname, mod in model.named_modules():
        if isinstance(mod, torch.nn.LayerNorm):
            for pname, _ in mod.named_parameters(recurse=False):
                norm_params.add(f"{mname}.{pname}" if mname else pname)
    seen = set()
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(remove_duplicate=True)):
            if id(p) in seen:
                continue
            seen.add(id(p))
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name in norm_params:
                p.copy_((1.0 + LN_STD * noise) if name.endswith("weight") else LN_STD * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(INIT_STD * noise)


def tensor_names(path):
    with safetensors.safe_open(path, "pt") as f:
        return {k: (f.get_slice(k).get_dtype(), list(f.get_slice(k).get_shape())) for k in f.keys()}


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def save_reference(out, tensors, meta):
    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()}
    save_file(tensors, os.path.join(out, "reference.safetensors"), metadata={"format": "pt"})
    meta["tensors"] = {k: list(v.shape) for k, v in sorted(tensors.items())}
    write_json(os.path.join(out, "reference.json"), meta)


# ---------------------------------------------------------------- BERT


def mean_pool_normalise(hidden, mask):
    """sentence-transformers Pooling(mean) followed by Normalize()."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * m).sum(1)
    counts = torch.clamp(m.sum(1), min=1e-9)
    return torch.nn.functional.normalize(summed / counts, p=2, dim=1)


def make_bert(out):
    tok = make_bert_tokenizer()
    vocab = tok.get_vocab_size()
    tok.save(os.path.join(out, "tokenizer.json"))

    cfg = transformers.BertConfig(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        num_hidden_layers=LAYERS,
        intermediate_size=64,
        max_position_embeddings=MAX_POS,
        type_vocab_size=2,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        initializer_range=INIT_STD,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(SEED)
    model = transformers.BertModel(cfg)
    randomise(model, torch.Generator().manual_seed(BERT_WEIGHT_SEED))
    model.eval()
    model.save_pretrained(out, safe_serialization=True)

    # sentence-transformers side files (same layout as all-MiniLM-L6-v2).
    write_json(
        os.path.join(out, "modules.json"),
        [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ],
    )
    write_json(os.path.join(out, "sentence_bert_config.json"), {"max_seq_length": MAX_POS, "do_lower_case": False})
    os.makedirs(os.path.join(out, "1_Pooling"), exist_ok=True)
    write_json(
        os.path.join(out, "1_Pooling", "config.json"),
        {
            "word_embedding_dimension": HIDDEN,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": False,
            "include_prompt": True,
        },
    )
    # Lets transformers.AutoTokenizer (and so scripts/bench_torch.py) load the fixture.
    write_json(
        os.path.join(out, "tokenizer_config.json"),
        {
            "tokenizer_class": "BertTokenizerFast",
            "do_lower_case": True,
            "model_max_length": MAX_POS,
            "unk_token": "[UNK]",
            "sep_token": "[SEP]",
            "pad_token": "[PAD]",
            "cls_token": "[CLS]",
            "mask_token": "[MASK]",
        },
    )

    ids = [tok.encode(t).ids for t in BERT_TEXTS]
    lengths = [len(x) for x in ids]
    assert max(lengths) <= MAX_POS, lengths
    tensors = {}
    with torch.inference_mode():
        for i, x in enumerate(ids):
            inp = torch.tensor([x])
            mask = torch.ones_like(inp)
            h = model(input_ids=inp, attention_mask=mask, token_type_ids=torch.zeros_like(inp)).last_hidden_state
            tensors[f"hidden_{i}"] = h[0]
            tensors[f"embedding_{i}"] = mean_pool_normalise(h, mask)[0]

        maxlen = max(lengths)
        batch_ids = torch.zeros(len(ids), maxlen, dtype=torch.long)  # [PAD] = 0
        batch_mask = torch.zeros(len(ids), maxlen, dtype=torch.long)
        for i, x in enumerate(ids):
            batch_ids[i, : len(x)] = torch.tensor(x)
            batch_mask[i, : len(x)] = 1
        bh = model(
            input_ids=batch_ids, attention_mask=batch_mask, token_type_ids=torch.zeros_like(batch_ids)
        ).last_hidden_state
        tensors["batch_hidden"] = bh
        tensors["batch_mask"] = batch_mask
        tensors["batch_embedding"] = mean_pool_normalise(bh, batch_mask)
        for i, n in enumerate(lengths):
            d = (bh[i, :n] - tensors[f"hidden_{i}"]).abs().max().item()
            assert d < 1e-5, f"padded vs unpadded hidden differ by {d} for sentence {i}"
            d = (tensors["batch_embedding"][i] - tensors[f"embedding_{i}"]).abs().max().item()
            assert d < 1e-5, f"padded vs unpadded embedding differ by {d} for sentence {i}"
        assert tensors["hidden_0"].abs().mean() > 0.1

    meta = {
        "generator": "scripts/make_fixtures.py",
        "versions": versions(),
        "model": "transformers.BertModel (eager attention), random weights, seed %d" % BERT_WEIGHT_SEED,
        "texts": BERT_TEXTS,
        "tokens": [tok.encode(t).tokens for t in BERT_TEXTS],
        "ids": ids,
        "lengths": lengths,
        "token_type_ids": "all zeros",
        "batch_ids": batch_ids.tolist(),
        "pooling": "mean over attention mask, then L2 normalise (sentence-transformers Pooling + Normalize)",
        "notes": {
            "hidden_i": "last_hidden_state of sentence i alone (batch of 1, no padding) [len_i, hidden]",
            "embedding_i": "mean-pooled, L2-normalised embedding of sentence i [hidden]",
            "batch_hidden": "last_hidden_state of all sentences as one right-padded batch [n, maxlen, hidden]; "
            "rows past lengths[i] are padding and not meaningful",
            "batch_mask": "attention mask of the padded batch as f32 0/1 [n, maxlen]",
            "batch_embedding": "embeddings computed from the padded batch [n, hidden]",
        },
    }
    save_reference(out, tensors, meta)
    return tensor_names(os.path.join(out, "model.safetensors"))


# ---------------------------------------------------------------- GPT-2


def make_gpt2(out):
    tok = make_gpt2_tokenizer()
    vocab = tok.get_vocab_size()
    tok.save(os.path.join(out, "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")

    cfg = transformers.GPT2Config(
        vocab_size=vocab,
        n_embd=HIDDEN,
        n_head=HEADS,
        n_layer=LAYERS,
        n_positions=MAX_POS,
        n_inner=None,
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
        initializer_range=INIT_STD,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eos,
        eos_token_id=eos,
        tie_word_embeddings=True,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(SEED)
    model = transformers.GPT2LMHeadModel(cfg)
    model.tie_weights()
    randomise(model, torch.Generator().manual_seed(GPT2_WEIGHT_SEED))
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr(), "lm_head not tied"
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    write_json(
        os.path.join(out, "tokenizer_config.json"),
        {
            "tokenizer_class": "GPT2TokenizerFast",
            "model_max_length": MAX_POS,
            "bos_token": "<|endoftext|>",
            "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
            "add_prefix_space": False,
        },
    )

    ids = [tok.encode(t).ids for t in GPT2_TEXTS]
    lengths = [len(x) for x in ids]
    assert lengths[0] == 1, lengths

    # Pure greedy: no stopping at <|endoftext|>, always GREEDY_NEW tokens.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = eos
    tensors, greedy, margins = {}, [], []
    with torch.inference_mode():
        for i, x in enumerate(ids):
            inp = torch.tensor([x])
            o = model(input_ids=inp, output_hidden_states=True)
            tensors[f"logits_{i}"] = o.logits[0]
            tensors[f"hidden_{i}"] = o.hidden_states[-1][0]  # after ln_f
            h2 = model.transformer(input_ids=inp).last_hidden_state[0]
            assert torch.equal(h2, tensors[f"hidden_{i}"])
            if len(x) + GREEDY_NEW > MAX_POS:
                greedy.append(None)
                continue
            g = model.generate(
                inp,
                attention_mask=torch.ones_like(inp),
                do_sample=False,
                max_new_tokens=GREEDY_NEW,
                min_new_tokens=0,
                use_cache=True,
            )[0, len(x) :].tolist()
            assert len(g) == GREEDY_NEW, g
            # cross-check against a cache-free argmax loop, and record how
            # close the decisions were (the Rust side must make the same ones)
            seq = list(x)
            for _ in range(GREEDY_NEW):
                lg = model(input_ids=torch.tensor([seq])).logits[0, -1]
                top2 = torch.topk(lg, 2).values
                margins.append((top2[0] - top2[1]).item())
                seq.append(int(lg.argmax()))
            assert seq[len(x) :] == g, (seq[len(x) :], g)
            assert len(set(g)) >= 5, f"greedy continuation {i} is degenerate: {g}"
            greedy.append(g)

    assert min(margins) > 1e-3, f"a greedy step is a near-tie (top-2 margin {min(margins)})"

    meta = {
        "generator": "scripts/make_fixtures.py",
        "versions": versions(),
        "model": "transformers.GPT2LMHeadModel (eager attention, tied lm_head), random weights, seed %d" % GPT2_WEIGHT_SEED,
        "texts": GPT2_TEXTS,
        "tokens": [tok.encode(t).tokens for t in GPT2_TEXTS],
        "ids": ids,
        "lengths": lengths,
        "eos_token_id": eos,
        "greedy_new_tokens": GREEDY_NEW,
        "greedy": greedy,
        "greedy_min_top2_margin": round(min(margins), 6),
        "notes": {
            "logits_i": "next-token logits for every position of prompt i [len_i, vocab]",
            "hidden_i": "last hidden state after ln_f [len_i, hidden]",
            "greedy": "new ids from model.generate(do_sample=False, max_new_tokens=15, use_cache=True), "
            "no eos stopping; null where len+15 > n_positions",
        },
    }
    save_reference(out, tensors, meta)
    return tensor_names(os.path.join(out, "model.safetensors"))


# ---------------------------------------------------------------- main


def fresh_dir(path):
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.makedirs(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures"))
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    names = {}
    for name, fn in (("tiny-bert", make_bert), ("tiny-gpt2", make_gpt2)):
        d = os.path.join(args.out, name)
        fresh_dir(d)
        names[name] = fn(d)

    for name, ts in names.items():
        print(f"{name}/model.safetensors tensors:")
        for k, (dt, shape) in sorted(ts.items()):
            print(f"  {k} {dt} {shape}")
    total = 0
    print("files:")
    for dirpath, _, files in sorted(os.walk(args.out)):
        for fn in sorted(files):
            p = os.path.join(dirpath, fn)
            n = os.path.getsize(p)
            total += n
            print(f"  {n:>9}  {os.path.relpath(p, ROOT)}")
    print(f"  {total:>9}  total")
    if total > 1_000_000:
        sys.exit(f"fixtures are {total} bytes, over the 1 MB budget")


if __name__ == "__main__":
    main()
