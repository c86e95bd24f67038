"""Tokenizers for data preparation: a Hugging Face tokenizer folder, a SentencePiece .model file, or
a SentencePiece BPE model trained here, offline, on the input text.

All three become a `TokenizerSpec`: a picklable description (the backend's serialized form) that a
worker process turns back into an encoder without importing transformers, plus the identity the
shards are stamped with. `tokenizer_id` is that identity: ``sha256:<32 hex>`` of

* HF: the backend tokenizer's canonical JSON (vocab, merges, normalizer, pre-tokenizer, added
  tokens, ...; runtime truncation/padding settings left out), so the same tokenizer gives the same
  id whether it was loaded from tokenizer.json, from vocab+merges or from a GGUF file;
* SentencePiece: the serialized model proto.

The trainer calls ``tokenizer_id(<the model's tokenizer dir or .model>)`` and hands it to the
loader, which refuses shards made with another tokenizer. This module imports numpy, tokenizers and
sentencepiece only (transformers lazily, in the parent), so worker processes start fast.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from megaxatl.data.format import DataError
from megaxatl.fsutil import naming


@dataclass(frozen=True)
class TokenizerSpec:
    kind: str  # "hf" | "spm"
    name: str
    id: str
    eos_id: int
    vocab_size: int
    source: str
    payload: bytes  # HF: tokenizer.json (utf-8); SPM: serialized model proto

    def info(self) -> dict:
        return {"id": self.id, "name": self.name, "kind": self.kind, "source": self.source,
                "vocab_size": self.vocab_size, "eos_id": self.eos_id}


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()[:32]


def _hf_canonical(backend_json: str) -> bytes:
    obj = json.loads(backend_json)
    obj.pop("truncation", None)
    obj.pop("padding", None)
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def _spec_from_hf(tok, source: str, name: str) -> TokenizerSpec:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise DataError(f"{source}: tokenizer has no fast (tokenizers) backend; save it with a "
                        "tokenizer.json")
    if tok.eos_token_id is None:
        raise DataError(f"{source}: tokenizer defines no EOS token; documents need a separator")
    payload = backend.to_str()
    vocab_size = max(backend.get_vocab_size(with_added_tokens=True), int(tok.eos_token_id) + 1)
    return TokenizerSpec("hf", name, _digest(_hf_canonical(payload)), int(tok.eos_token_id),
                         int(vocab_size), source, payload.encode())


def _spec_from_spm(proto: bytes, source: str, name: str) -> TokenizerSpec:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(proto)
    except Exception as e:  # noqa: BLE001 - sentencepiece raises bare RuntimeError/OSError
        raise DataError(f"{source}: not a SentencePiece model ({e})") from None
    proto = sp.serialized_model_proto()
    if sp.eos_id() < 0:
        raise DataError(f"{source}: SentencePiece model has no EOS piece (eos_id = -1)")
    return TokenizerSpec("spm", name, _digest(proto), int(sp.eos_id()), int(sp.get_piece_size()),
                         source, proto)


def load_tokenizer(path: str | Path) -> TokenizerSpec:
    """A local HF tokenizer folder (never the hub; no remote code) or a SentencePiece .model."""
    path = Path(path)
    if path.is_dir():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True,
                                                trust_remote_code=False)
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds; name the folder
            first = str(e).splitlines()[0] if str(e) else ""
            raise DataError(f"{path}: cannot load a Hugging Face tokenizer from this folder "
                            f"({type(e).__name__}: {first})") from None
        return _spec_from_hf(tok, str(path), path.name)
    if path.is_file():
        return _spec_from_spm(path.read_bytes(), str(path), path.stem)
    raise DataError(f"{path}: tokenizer not found (want a Hugging Face tokenizer folder or a "
                    "SentencePiece .model file)")


def tokenizer_id(tokenizer) -> str:
    """The id stamped on shards: from a path (HF folder or .model), a loaded HF tokenizer, or a
    `sentencepiece.SentencePieceProcessor`."""
    if isinstance(tokenizer, (str, Path)):
        return load_tokenizer(tokenizer).id
    if isinstance(tokenizer, TokenizerSpec):
        return tokenizer.id
    if hasattr(tokenizer, "serialized_model_proto"):
        return _digest(tokenizer.serialized_model_proto())
    if hasattr(tokenizer, "backend_tokenizer"):
        return _digest(_hf_canonical(tokenizer.backend_tokenizer.to_str()))
    raise TypeError(f"cannot compute a tokenizer id for {type(tokenizer).__name__}")


def train_spm(sentences: Iterable[str], vocab_size: int, out_file: Path, *, num_threads: int = 2,
              max_sentences: int = 2_000_000, seed: int = 0) -> TokenizerSpec:
    """Train a SentencePiece BPE model offline; write it to `out_file`.

    Settings keep text exact: identity normalization, no whitespace collapsing, byte fallback (so
    any byte, newlines included, round-trips), digits split. Ids: unk 0, bos 1, eos 2, no pad.
    SentencePiece holds its training sentences in memory: at most `max_sentences` lines, sampled
    uniformly from the input by the trainer (`input_sentence_size`), bound that.
    """
    import sentencepiece as spm

    if vocab_size < 300:
        raise DataError(f"--train-spm {vocab_size}: vocab size must be >= 300 (256 byte-fallback "
                        "pieces + specials + merges)")
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)  # the trainer's sentence sampling
    failed: list[BaseException] = []

    def guarded() -> Iterator[str]:
        # SentencePiece reports an error raised by the iterator as one frame of its stack, not the
        # error: keep it, end the input there, and raise it once training has returned
        try:
            yield from sentences
        except Exception as e:  # noqa: BLE001 - re-raised below
            failed.append(e)

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=guarded(), model_writer=model, model_type="bpe",
            vocab_size=vocab_size, byte_fallback=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
            character_coverage=0.9995, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            input_sentence_size=max_sentences, shuffle_input_sentence=True,
            max_sentence_length=1 << 14, num_threads=max(1, num_threads), minloglevel=2)
    except RuntimeError as e:
        if failed:
            raise failed[0] from None
        raise DataError(f"--train-spm {vocab_size}: SentencePiece training failed: "
                        f"{str(e).strip().splitlines()[-1]}") from None
    if failed:
        raise failed[0]
    with naming(out_file):
        out_file.write_bytes(model.getvalue())
    return _spec_from_spm(model.getvalue(), str(out_file), f"spm-bpe-{vocab_size}")


# ---------------------------------------------------------------- worker side (no transformers)
_ENCODER = None


def init_encoder(kind: str, payload: bytes, in_pool: bool = True) -> None:
    """Pool initializer: rebuild the encoder from a spec's payload, once per worker process."""
    global _ENCODER
    if in_pool:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism
    if kind == "hf":
        from tokenizers import Tokenizer

        _ENCODER = ("hf", Tokenizer.from_str(payload.decode()))
    else:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        sp.LoadFromSerializedProto(payload)
        _ENCODER = ("spm", sp)


def _utf8_cum(text: str) -> np.ndarray | None:
    """Byte offset of every char boundary (len(text)+1 entries); None for ASCII (offset = index)."""
    if text.isascii():
        return None
    cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    nbytes = 1 + (cp >= 0x80).astype(np.int64) + (cp >= 0x800) + (cp >= 0x10000)
    return np.concatenate([[0], np.cumsum(nbytes)])


def token_bytes(text: str, ends: np.ndarray) -> np.ndarray:
    """Bytes of `text` attributed to each token, from the tokens' char end offsets.

    Token i covers text[end_{i-1}:end_i] (ends made monotone; the last token takes the rest), so
    the counts sum to exactly len(text.encode()) whatever the tokenizer's offset conventions
    (trimmed spaces, several byte-fallback tokens for one char, a dummy prefix).
    """
    if ends.size == 0:
        return np.zeros(0, dtype=np.uint32)
    ends = np.maximum.accumulate(np.clip(ends.astype(np.int64), 0, len(text)))
    ends[-1] = len(text)
    cum = _utf8_cum(text)
    if cum is not None:
        ends = cum[ends]
    return np.diff(ends, prepend=0).astype(np.uint32)


def encode_texts(texts: list[str], continuation: list[bool] | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokenize a batch of texts (no special tokens) in the current process.

    `continuation[i]` marks a text that continues the previous piece of the same document: a
    leading zero-width dummy-prefix "▁" that the tokenizer adds there is dropped.
    Returns (ids uint32 concatenated, per-token byte counts uint32, per-text token counts int64).
    """
    kind, enc = _ENCODER
    continuation = continuation or [False] * len(texts)
    ids, nbytes = [], []
    if kind == "hf":
        encoded = [(e.ids, e.offsets, e) for e in enc.encode_batch(texts, add_special_tokens=False)]
    else:
        encoded = [(r["ids"], r["offsets"], r) for r in enc.EncodeAsOffsetMapping(texts)]
    for text, cont, (tok_ids, offsets, e) in zip(texts, continuation, encoded):
        skip = 0
        if cont and tok_ids and offsets[0][1] == 0:
            first = e.tokens[0] if kind == "hf" else e["pieces"][0]
            skip = int(first == "\u2581")
        tok_ids = np.asarray(tok_ids[skip:], dtype=np.uint32)
        ends = np.fromiter((end for _, end in offsets[skip:]), dtype=np.int64,
                           count=len(tok_ids))
        ids.append(tok_ids)
        nbytes.append(token_bytes(text, ends))
    counts = np.array([len(a) for a in ids], dtype=np.int64)
    if not ids:
        return np.zeros(0, np.uint32), np.zeros(0, np.uint32), counts
    return np.concatenate(ids), np.concatenate(nbytes), counts
