"""Builders shared by the tests/test_data_*.py files (no tests here): tiny corpora and a tiny
byte-level BPE tokenizer saved as a Hugging Face folder, made in tmp dirs, nothing downloaded."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

WORDS = ("the cat sat on a mat and the dog ran far away from home while it rained all night "
         "héllo wörld naïve café 東京 😀 x1 42 3.14").split()
EOS = "<|endoftext|>"


def make_doc(rng: random.Random, min_words: int = 3, max_words: int = 120) -> str:
    """A document: sentences, some newlines, a paragraph break now and then, unicode."""
    out = []
    for _ in range(rng.randint(min_words, max_words)):
        out.append(rng.choice(WORDS))
        r = rng.random()
        out.append("\n\n" if r < 0.03 else "\n" if r < 0.08 else ". " if r < 0.15 else " ")
    return "".join(out).strip()


def make_corpus(root: Path, n_docs: int = 60, seed: int = 0) -> tuple[list[Path], list[str]]:
    """Two .jsonl files and some .txt files (one document each). Returns (inputs, docs in the
    order prepare_data reads them: folder sorted, then the listed file)."""
    rng = random.Random(seed)
    docs = [make_doc(rng) for _ in range(n_docs)]
    folder = root / "corpus"
    folder.mkdir(parents=True)
    n_txt = 10
    jsonl_docs, txt_docs = docs[: n_docs - n_txt], docs[n_docs - n_txt:]
    half = len(jsonl_docs) // 2
    for name, part in (("a.jsonl", jsonl_docs[:half]), ("b.jsonl", jsonl_docs[half:])):
        with open(folder / name, "w") as f:
            for d in part:
                f.write(json.dumps({"text": d, "id": 1}, ensure_ascii=False) + "\n")
    (folder / "sub").mkdir()
    for i, d in enumerate(txt_docs):
        (folder / "sub" / f"t{i:02d}.txt").write_text(d, encoding="utf-8")
    (folder / ".hidden.txt").write_text("never read")
    (folder / "notes.csv").write_text("ignored,by,extension")
    return [folder], jsonl_docs[:half] + jsonl_docs[half:] + txt_docs


def make_hf_tokenizer(path: Path, vocab_size: int = 400) -> Path:
    """A byte-level BPE tokenizer (GPT-2 style, EOS <|endoftext|>) saved with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(1)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([make_doc(rng) for _ in range(200)], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS).save_pretrained(path)
    return path


def read_split_samples(out_dir: Path, split: str) -> list[tuple[np.ndarray, int, int]]:
    """All samples of a split in stored order: (tokens, num_tokens, num_bytes)."""
    from megaxatl.data.loader import ShardDataset

    ds = ShardDataset(out_dir, split, verify=True)
    return [ds.read(i) for i in range(len(ds))]


def stream_of(samples) -> np.ndarray:
    """Undo the packing: samples overlap by one token; the last one may be padded."""
    parts = []
    for k, (tokens, num_tokens, _) in enumerate(samples):
        parts.append(tokens[:num_tokens] if k == 0 else tokens[1:num_tokens])
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def docs_of(stream: np.ndarray, eos_id: int) -> list[list[int]]:
    """Split ``EOS d0 EOS d1 ... EOS`` into documents."""
    assert stream[0] == eos_id and stream[-1] == eos_id
    cuts = np.flatnonzero(stream == eos_id)
    return [stream[a + 1:b].tolist() for a, b in zip(cuts[:-1], cuts[1:])]
