"""Streaming the prepared shards from any URL webdataset opens: local paths, ``pipe:`` commands
(an object store's copy-to-stdout, ``pipe:aws s3 cp s3://bucket/ds/{name} -``), http(s).

The random-access loader (loader.py) needs a local file system (one ``pread`` per sample). A
dataset in an object store is read here instead, shard by shard as a sequential tar stream
(webdataset's ``gopen`` + ``tarfile_to_samples``), with the same contracts as loader.py:

* Location. ``location`` names the dataset folder: a local path or an http(s) prefix (a shard's
  URL is ``<location>/<name>``), or any webdataset URL holding ``{name}``, which is replaced by
  ``manifest.json`` and by each shard's file name (``pipe:cat /data/ds/{name}``). The manifest is
  read through the same URL and checked as loader.py checks it (format, tokenizer id, seq_len).

* Order (training). A random-access order (a permutation over all samples) cannot be streamed, so
  this loader's order is the streaming one, equally deterministic: epoch e visits the shards in the
  order of `IndexPermutation(num_shards, (seed, "shards"), e)` and the samples of each shard in
  the order of `IndexPermutation(shard size, (seed, shard), e)`; a shard is held in memory while it
  is read (one shard: samples_per_shard x sample_stride bytes). It is NOT the random-access
  loader's order: a run keeps one access mode, and a resume refuses the other's state.

* DP sharding and resume: exactly loader.py's, on this order. Global micro-step m covers stream
  positions [m*G, (m+1)*G), rank r takes m*G + r*B ... + B-1; the position is the one integer
  ``consumed_samples``; resuming there yields exactly what the uninterrupted run would have (the
  shards before the resume point are not opened). Every rank reads every shard of the stream (its
  samples are spread over all of them): the per-rank read rate is dp times what it consumes,
  which benchmarks/data_stream.py sets beside what a run needs.

* Validation: one pass in stored order, padded at the tail exactly as loader.py's.

* Checks while streaming: every shard yields exactly the manifest's sample count, with the keys
  ``first_sample + j`` in order, each an .npy of the manifest's dtype and length (read without
  pickle) and a meta.json with a valid num_tokens; anything else is a DataError naming the URL.
  The sha256 of a streamed shard is not checked (run `verify_shards` where the data is written).
"""

from __future__ import annotations

import io
import json
import queue
import threading
from typing import Iterator

import numpy as np
import torch

from megaxatl.data.format import (FORMAT, FORMAT_VERSION, IGNORE_INDEX, META_EXT, SPLITS, TOKENS_EXT, DataError,
                                  check_token_ids, sample_key, sample_stride, vocab_limit)
from megaxatl.data.loader import IndexPermutation

ORDER = "stream-v1"  # the state_dict's "order": shards permuted, then samples within a shard


def shard_url(location: str, name: str) -> str:
    location = str(location)
    if "{name}" in location:
        return location.replace("{name}", name)
    if location.startswith("pipe:"):
        raise DataError(f"{location}: a pipe: location must say where the file name goes with {{name}}")
    return location.rstrip("/") + "/" + name


def _open(url: str):
    import webdataset

    try:
        return webdataset.gopen(url, "rb")
    except Exception as e:  # noqa: BLE001 - gopen raises what the scheme raises
        raise DataError(f"{url}: cannot open ({e})") from None


def read_stream_manifest(location: str) -> dict:
    """manifest.json through `location` (any webdataset URL), checked as `read_manifest` does."""
    url = shard_url(location, "manifest.json")
    try:
        with _open(url) as f:
            manifest = json.loads(f.read())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{url}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{url}: not a {FORMAT} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise DataError(f"{url}: format version {manifest.get('version')}, this code reads {FORMAT_VERSION}")
    for key in ("seq_len", "sample_tokens", "token_dtype", "sample_stride", "eos_id", "tokenizer", "splits"):
        if key not in manifest:
            raise DataError(f"{url}: manifest lacks {key!r}")
    if manifest["sample_tokens"] != manifest["seq_len"] + 1 or \
            manifest["sample_stride"] != sample_stride(manifest["sample_tokens"], np.dtype(manifest["token_dtype"])):
        raise DataError(f"{url}: inconsistent seq_len / sample_tokens / sample_stride")
    return manifest


class StreamShards:
    """One split of a dataset at `location`: its manifest and `read_shard(k)`, the shard's samples
    in stored order as (tokens uint array (seq_len+1,), num_tokens, num_bytes)."""

    def __init__(self, location: str, split: str = "train", *, seq_len: int | None = None,
                 expected_tokenizer_id: str | None = None, vocab_size: int | None = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        self.location, self.split = str(location), split
        m = self.manifest = read_stream_manifest(location)
        where = shard_url(location, "manifest.json")
        tok_id = m["tokenizer"].get("id")
        if expected_tokenizer_id is not None and tok_id != expected_tokenizer_id:
            raise DataError(f"{where}: shards were tokenized with tokenizer {tok_id} ({m['tokenizer'].get('name')}), "
                            f"but the model's tokenizer is {expected_tokenizer_id}; re-run prepare-data with the "
                            "model's tokenizer")
        if seq_len is not None and seq_len != m["seq_len"]:
            raise DataError(f"{where}: shards hold seq_len {m['seq_len']}, asked for {seq_len}")
        if split not in m["splits"]:
            raise DataError(f"{where}: no {split!r} split")
        info = m["splits"][split]
        self.shards = info["shards"]
        self.num_samples = int(info["num_samples"])
        self.seq_len, self.sample_tokens = m["seq_len"], m["sample_tokens"]
        self.dtype, self.eos_id = np.dtype(m["token_dtype"]), int(m["eos_id"])
        self.fingerprint = m.get("fingerprint")
        self.vocab_size = vocab_limit(m, vocab_size)  # every token id must be below it
        expect = 0
        for s in self.shards:
            if int(s["first_sample"]) != expect:
                raise DataError(f"{where}: shard list is not contiguous at {s['name']}")
            expect += int(s["num_samples"])
        if expect != self.num_samples:
            raise DataError(f"{where}: shards hold {expect} samples, manifest says {self.num_samples}")

    def read_shard(self, k: int) -> list[tuple[np.ndarray, int, int]]:
        import webdataset

        s = self.shards[k]
        url = shard_url(self.location, s["name"])
        first, count = int(s["first_sample"]), int(s["num_samples"])
        out = []
        pipeline = webdataset.DataPipeline(webdataset.SimpleShardList([url]), webdataset.tarfile_to_samples())
        try:
            for sample in pipeline:
                j = len(out)
                key = sample_key(first + j)
                if j >= count or sample.get("__key__") != key or set(sample) - {"__key__", "__url__"} != \
                        {TOKENS_EXT, META_EXT}:
                    raise DataError(f"{url}: corrupt shard: expected sample {key} ({count} samples from "
                                    f"{sample_key(first)}), got {sample.get('__key__')!r} with members "
                                    f"{sorted(set(sample) - {'__key__', '__url__'})}")
                out.append(self._decode(url, key, sample))
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - tarfile / pipe / http errors: name the shard
            raise DataError(f"{url}: cannot stream shard ({type(e).__name__}: {e})") from None
        if len(out) != count:
            raise DataError(f"{url}: {len(out)} samples, manifest says {count} (truncated or replaced shard)")
        return out

    def _decode(self, url: str, key: str, sample: dict):
        try:
            tokens = np.load(io.BytesIO(sample[TOKENS_EXT]), allow_pickle=False)
            meta = json.loads(sample[META_EXT])
            num_tokens, num_bytes = int(meta["num_tokens"]), int(meta["num_bytes"])
        except (ValueError, KeyError, TypeError, OSError):
            raise DataError(f"{url}: corrupt shard: bad {key}") from None
        if tokens.dtype != self.dtype or tokens.shape != (self.sample_tokens,) or \
                not 2 <= num_tokens <= self.sample_tokens:
            raise DataError(f"{url}: corrupt shard: {key} holds {tokens.dtype} {tokens.shape}, num_tokens "
                            f"{num_tokens}; the manifest says {self.dtype} ({self.sample_tokens},)")
        check_token_ids(tokens, self.vocab_size, url, key)
        return tokens, num_tokens, num_bytes


class StreamLoader:
    """Iterable of batches for one DP rank, streamed (see the module docstring); the interface of
    loader.ShardLoader: training infinite from `consumed_samples`, validation one pass per iter()."""

    def __init__(self, shards: StreamShards, micro_batch_size: int, *, dp_rank: int = 0, dp_world: int = 1,
                 seed: int = 0, consumed_samples: int = 0):
        if micro_batch_size < 1 or not 0 <= dp_rank < dp_world:
            raise ValueError(f"bad micro_batch_size {micro_batch_size} / dp_rank {dp_rank} / dp_world {dp_world}")
        self.shards, self.split = shards, shards.split
        self.micro_batch_size, self.dp_rank, self.dp_world, self.seed = micro_batch_size, dp_rank, dp_world, seed
        self.consumed_samples = int(consumed_samples)
        self.train = shards.split == "train"
        if self.train and shards.num_samples == 0:
            raise DataError(f"{shards.location}: the train split holds no samples")

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.dp_world

    @property
    def dataset(self) -> StreamShards:  # ShardLoader's name for it (seq_len, num_samples, ...)
        return self.shards

    @property
    def epoch(self) -> int:
        return self.consumed_samples // max(1, self.shards.num_samples)

    def __len__(self) -> int:
        if self.train:
            raise TypeError("the training loader is infinite")
        G = self.global_batch_size
        return (self.shards.num_samples + G - 1) // G

    # -- order
    def _epoch_shards(self, epoch: int) -> list[int]:
        n = len(self.shards.shards)
        if not self.train:
            return list(range(n))
        return IndexPermutation(n, f"{self.seed}/shards", epoch)(np.arange(n)).tolist()

    def _within(self, epoch: int, k: int, count: int) -> np.ndarray:
        if not self.train:
            return np.arange(count)
        return IndexPermutation(count, f"{self.seed}/shard{k}", epoch)(np.arange(count))

    def _positions(self, start: int) -> Iterator[int]:
        """This rank's stream positions from global position `start` (a batch boundary)."""
        B, G, r = self.micro_batch_size, self.global_batch_size, self.dp_rank
        m = start
        while True:
            yield from range(m + r * B, m + r * B + B)
            m += G

    def _samples(self, start: int, stop: int | None) -> Iterator[tuple | None]:
        """This rank's samples at its positions from `start` (positions >= stop: padding None)."""
        n = self.shards.num_samples
        sizes = [int(s["num_samples"]) for s in self.shards.shards]
        positions = self._positions(start)
        p = next(positions)
        while stop is None or p < stop:
            epoch = p // n
            order = self._epoch_shards(epoch)
            offset = 0
            for slot, k in enumerate(order):
                if p % n >= offset + sizes[k]:  # nothing of this rank's here: not opened
                    offset += sizes[k]
                    continue
                data = self._read(k, order, slot, epoch)
                perm = self._within(epoch, k, sizes[k])
                while p // n == epoch and p % n < offset + sizes[k] and (stop is None or p < stop):
                    yield data[int(perm[p % n - offset])]
                    p = next(positions)
                offset += sizes[k]
                if p // n != epoch or (stop is not None and p >= stop):
                    break
        while True:  # validation tail: padding positions
            yield None

    def _read(self, k, order, slot, epoch):
        # the next shard of this epoch is fetched in a thread while this one is consumed
        ahead = self._ahead
        if ahead is not None and ahead[0] == (epoch, k):
            ahead[1].join()
            data = ahead[2].get()
            if isinstance(data, BaseException):
                raise data
        else:
            data = self.shards.read_shard(k)
        self._ahead = None
        if slot + 1 < len(order):
            nxt, box = order[slot + 1], queue.Queue(1)

            def fetch():
                try:
                    box.put(self.shards.read_shard(nxt))
                except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
                    box.put(e)
            t = threading.Thread(target=fetch, daemon=True)
            t.start()
            self._ahead = ((epoch, nxt), t, box)
        return data

    def _batch(self, samples: list) -> dict:
        L = self.shards.seq_len
        ids = torch.full((len(samples), L), self.shards.eos_id, dtype=torch.long)
        labels = torch.full((len(samples), L), IGNORE_INDEX, dtype=torch.long)
        num_bytes = torch.zeros(len(samples), dtype=torch.long)
        for i, s in enumerate(samples):
            if s is None:
                continue
            tokens, num_tokens, nb = s
            t = torch.from_numpy(tokens.astype(np.int64))
            ids[i] = t[:-1]
            labels[i, :num_tokens - 1] = t[1:num_tokens]
            num_bytes[i] = nb
        return {"input_ids": ids, "labels": labels, "num_bytes": num_bytes}

    def __iter__(self) -> Iterator[dict]:
        self._ahead = None
        B = self.micro_batch_size
        if self.train:
            samples = self._samples(self.consumed_samples, None)
            while True:
                batch = self._batch([next(samples) for _ in range(B)])
                self.consumed_samples += self.global_batch_size
                yield batch
        else:
            steps = len(self)
            samples = self._samples(0, self.shards.num_samples)
            for _ in range(steps):
                yield self._batch([next(samples) for _ in range(B)])

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "seed": self.seed, "split": self.split,
                "num_samples": self.shards.num_samples, "fingerprint": self.shards.fingerprint,
                "global_batch_size": self.global_batch_size, "order": ORDER}

    def load_state_dict(self, state: dict) -> None:
        if state.get("order") != ORDER:
            raise DataError(f"{self.shards.location}: loader state is for the {state.get('order', 'random-access')!r} "
                            f"order, this streaming loader reads in the {ORDER!r} order (a run keeps one access mode)")
        for key, mine in (("split", self.split), ("seed", self.seed), ("fingerprint", self.shards.fingerprint),
                          ("num_samples", self.shards.num_samples)):
            if key in state and state[key] != mine:
                raise DataError(f"{self.shards.location}: loader state is for {key} {state[key]!r}, "
                                f"this loader has {mine!r}")
        self.consumed_samples = int(state["consumed_samples"])


def build_stream_loader(location: str, split: str = "train", micro_batch_size: int = 1, seq_len: int | None = None,
                        *, dp_rank: int = 0, dp_world: int = 1, seed: int = 0,
                        expected_tokenizer_id: str | None = None, consumed_samples: int = 0,
                        state: dict | None = None, vocab_size: int | None = None) -> StreamLoader:
    """A `StreamLoader` over the dataset at `location` (see `shard_url`); arguments as build_loader's."""
    shards = StreamShards(location, split, seq_len=seq_len, expected_tokenizer_id=expected_tokenizer_id,
                          vocab_size=vocab_size)
    loader = StreamLoader(shards, micro_batch_size, dp_rank=dp_rank, dp_world=dp_world, seed=seed,
                          consumed_samples=consumed_samples)
    if state is not None:
        loader.load_state_dict(state)
    return loader
