"""Deterministic, resumable, DP-sharded loading of prepared shards (format: see format.py).

Design: the SAMPLER decides every index, workers only read.

* Random access. Every sample of a split occupies `sample_stride` bytes of its shard, so sample j
  of a shard is one ``os.pread(stride, j * stride)``: no per-sample index in memory, no sequential
  tar scan. Each read checks both member names and tar header checksums (a misaligned or damaged
  shard is an error naming the file). At construction every shard must exist with the size the
  manifest records, the manifest's tokenizer id must equal `expected_tokenizer_id`, and with
  ``verify=True`` every shard's sha256 is checked (~1 GB/s on one core; ``"auto"``, the default,
  does it when the split's shards total <= 2 GiB, i.e. under ~2 s, and skips it above, where the
  size, name and checksum checks still catch truncation and misalignment but not flipped token
  bytes; call `verify_shards` once per dataset, e.g. after copying it to a cluster). Every sample
  read is also checked to hold only token ids below the vocabulary size (the manifest's, or the
  model's when smaller): a DataError naming the shard and sample, never an IndexError mid-step.

* Order (training). The split's samples are one infinite stream of epochs; epoch e visits all N
  samples in the order of a pseudo-random permutation keyed by (seed, e): a Feistel network on
  the next even power of two with cycle walking, a bijection of [0, N) computed per index in
  O(1) memory (a stored permutation of a 300B-token corpus would be ~1 GB per worker). Global
  micro-step m covers stream positions [m*G, (m+1)*G) with G = micro_batch_size * dp_world;
  rank r takes positions m*G + r*B ... m*G + r*B + B-1. So over any run of steps the ranks' samples
  are disjoint and, per epoch, cover every sample exactly once (a batch may straddle two epochs;
  nothing is dropped or repeated within an epoch).

* Workers. A `torch.utils.data.DataLoader` with that batch sampler: it hands whole batches to its
  workers round-robin and returns them in sampler order, so the batches are the same for any
  `num_workers` (workers only read; they hold no RNG and no position).

* Resume. The position is ONE integer, ``consumed_samples`` (global, over all ranks: the Megatron
  convention), advanced when a batch is handed to the caller, not when a worker prefetches it.
  ``state_dict()`` -> ``{"consumed_samples", "seed", "split", "fingerprint", ...}``;
  ``load_state_dict()`` (or ``build_loader(consumed_samples=...)``) restarts the sampler exactly
  there, and the resumed run yields exactly what the uninterrupted run would have; consumed_samples
  stays valid if the DP world size changes between runs.

* Validation. One finite pass in stored order. Global batch b covers positions [b*G, (b+1)*G)
  split by rank as above; positions past the end are padding samples (input EOS, labels all -100,
  num_bytes 0), so every rank runs the same number of full-shape batches (collectives in the
  forward, e.g. ZeRO-3 gathers, stay in step) and the union over ranks is every sample once.

Batches: ``{"input_ids": LongTensor(B, seq_len), "labels": LongTensor(B, seq_len),
"num_bytes": LongTensor(B)}``; labels are the next tokens, -100 (ignore_index) at padding;
num_bytes is the UTF-8 source bytes the sample's labels cover (bits/byte = sum loss / ln2 / sum).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from megaxatl.fsutil import sha256_file
from megaxatl.data.format import (
    BLOCK,
    IGNORE_INDEX,
    META_EXT,
    SPLITS,
    TOKENS_EXT,
    DataError,
    check_token_ids,
    npy_header,
    read_manifest,
    sample_key,
    tar_header_ok,
    tar_member_size,
    vocab_limit,
)

log = logging.getLogger("megaxatl.data")

AUTO_VERIFY_BYTES = 2 << 30


# ------------------------------------------------------------------------------ permutation
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer (uint64 arithmetic wraps)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


class IndexPermutation:
    """A pseudo-random bijection of [0, n) keyed by (seed, epoch), evaluated per index.

    Balanced Feistel network over [0, 4**h) with 4**h >= n (6 rounds of splitmix64 mixing), made a
    bijection of [0, n) by cycle walking (re-apply while the value is >= n; terminates because
    the cycle through any x < n returns to x; expected < 4 applications).
    """

    ROUNDS = 6

    def __init__(self, n: int, seed: int, epoch: int):
        if n < 1:
            raise ValueError("cannot permute an empty range")
        self.n = n
        self.half = max(1, ((n - 1).bit_length() + 1) // 2)
        self.mask = np.uint64((1 << self.half) - 1)
        digest = hashlib.blake2b(f"megaxatl-perm\0{seed}\0{epoch}".encode(),
                                 digest_size=8 * self.ROUNDS).digest()
        self.keys = [np.uint64(int.from_bytes(digest[8 * i:8 * i + 8], "little"))
                     for i in range(self.ROUNDS)]

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half)
        left, right = x >> h, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix(right ^ k) & self.mask)
        return (left << h) | right

    def __call__(self, index) -> np.ndarray:
        x = np.asarray(index, dtype=np.uint64)
        if x.size and int(x.max()) >= self.n:
            raise IndexError(f"index out of range for a permutation of {self.n}")
        with np.errstate(over="ignore"):
            y = self._feistel(x)
            bad = y >= np.uint64(self.n)
            while bad.any():
                y[bad] = self._feistel(y[bad])
                bad = y >= np.uint64(self.n)
        return y.astype(np.int64)


# ---------------------------------------------------------------------------------- dataset
class ShardDataset(Dataset):
    """Map-style view of one split: ``ds[i]`` is sample i in stored order; ``ds[None]`` a padding
    sample. Opens file descriptors lazily, per process (safe across DataLoader worker forks),
    at most `max_open` at a time."""

    def __init__(self, shard_dir: str | Path, split: str = "train", *, seq_len: int | None = None,
                 expected_tokenizer_id: str | None = None, verify: bool | str = "auto",
                 max_open: int = 64, vocab_size: int | None = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        self.shard_dir = Path(shard_dir)
        self.split = split
        m = self.manifest = read_manifest(self.shard_dir)
        where = self.shard_dir / "manifest.json"
        tok_id = m["tokenizer"].get("id")
        if expected_tokenizer_id is not None and tok_id != expected_tokenizer_id:
            raise DataError(
                f"{where}: shards were tokenized with tokenizer {tok_id} "
                f"({m['tokenizer'].get('name')}), but the model's tokenizer is "
                f"{expected_tokenizer_id}; re-run prepare-data with the model's tokenizer")
        if seq_len is not None and seq_len != m["seq_len"]:
            raise DataError(f"{where}: shards hold seq_len {m['seq_len']}, asked for {seq_len}")
        if split not in m["splits"]:
            raise DataError(f"{where}: no {split!r} split")
        info = m["splits"][split]
        self.seq_len = m["seq_len"]
        self.sample_tokens = m["sample_tokens"]
        self.stride = m["sample_stride"]
        self.dtype = np.dtype(m["token_dtype"])
        self.eos_id = int(m["eos_id"])
        self.vocab_size = vocab_limit(m, vocab_size)  # every token id must be below it
        self.shards = info["shards"]
        self.num_samples = int(info["num_samples"])
        self.fingerprint = m.get("fingerprint")
        self._first = [int(s["first_sample"]) for s in self.shards]
        self._npy_header = npy_header(self.sample_tokens, self.dtype)
        self._npy_len = len(self._npy_header) + self.sample_tokens * self.dtype.itemsize
        self._meta_at = BLOCK + (self._npy_len + BLOCK - 1) // BLOCK * BLOCK
        self._max_open = max_open
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._pid = os.getpid()
        expect = 0
        for s in self.shards:
            path = self.shard_dir / s["name"]
            if int(s["first_sample"]) != expect:
                raise DataError(f"{where}: shard list is not contiguous at {s['name']}")
            expect += int(s["num_samples"])
            if not path.is_file():
                raise DataError(f"{path}: missing shard (listed in {where})")
            size = path.stat().st_size
            if size != int(s["size_bytes"]) or size < int(s["num_samples"]) * self.stride:
                raise DataError(f"{path}: {size} bytes, manifest says {s['size_bytes']} "
                                "(truncated or replaced shard)")
        if expect != self.num_samples:
            raise DataError(f"{where}: shards hold {expect} samples, manifest says "
                            f"{self.num_samples}")
        total = sum(int(s["size_bytes"]) for s in self.shards)
        if verify == "auto":
            verify = total <= AUTO_VERIFY_BYTES
        if verify:
            verify_shards(self.shard_dir, splits=(split,), manifest=m)

    def __len__(self) -> int:
        return self.num_samples

    # -- reading
    def _fd(self, shard: int) -> int:
        if os.getpid() != self._pid:  # forked into a worker: the parent's descriptors are not ours
            self._fds = OrderedDict()
            self._pid = os.getpid()
        fd = self._fds.get(shard)
        if fd is not None:
            self._fds.move_to_end(shard)
            return fd
        path = self.shard_dir / self.shards[shard]["name"]
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise DataError(f"{path}: cannot open shard ({e.strerror})") from None
        self._fds[shard] = fd
        if len(self._fds) > self._max_open:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def read(self, index: int) -> tuple[np.ndarray, int, int]:
        """(tokens of length seq_len+1, num_tokens real, num_bytes) of sample `index`."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} out of range [0, {self.num_samples})")
        shard = bisect.bisect_right(self._first, index) - 1
        j = index - self._first[shard]
        path = self.shard_dir / self.shards[shard]["name"]
        buf = os.pread(self._fd(shard), self.stride, j * self.stride)
        key = sample_key(index)
        meta_header = buf[self._meta_at:self._meta_at + BLOCK]
        if (len(buf) != self.stride
                or not tar_header_ok(buf[:BLOCK], f"{key}.{TOKENS_EXT}".encode())
                or not tar_header_ok(meta_header, f"{key}.{META_EXT}".encode())
                or buf[BLOCK:BLOCK + len(self._npy_header)] != self._npy_header):
            raise DataError(f"{path}: corrupt shard: sample {key} not found at byte "
                            f"{j * self.stride} (damaged or not written by this format)")
        tokens = np.frombuffer(buf, dtype=self.dtype, count=self.sample_tokens,
                               offset=BLOCK + len(self._npy_header))
        size = tar_member_size(meta_header)
        try:
            meta = json.loads(buf[self._meta_at + BLOCK:self._meta_at + BLOCK + size])
            num_tokens, num_bytes = int(meta["num_tokens"]), int(meta["num_bytes"])
        except (ValueError, KeyError, TypeError):
            raise DataError(f"{path}: corrupt shard: bad {key}.{META_EXT}") from None
        if not 2 <= num_tokens <= self.sample_tokens:
            raise DataError(f"{path}: corrupt shard: {key} num_tokens {num_tokens}")
        check_token_ids(tokens, self.vocab_size, str(path), key)
        return tokens, num_tokens, num_bytes

    def __getitem__(self, index: int | None) -> dict:
        if index is None:  # padding sample (validation tail)
            ids = torch.full((self.seq_len,), self.eos_id, dtype=torch.long)
            return {"input_ids": ids, "labels": torch.full_like(ids, IGNORE_INDEX),
                    "num_bytes": 0}
        tokens, num_tokens, num_bytes = self.read(int(index))
        t = torch.from_numpy(tokens.astype(np.int64))
        labels = t[1:].clone()
        labels[num_tokens - 1:] = IGNORE_INDEX
        return {"input_ids": t[:-1], "labels": labels, "num_bytes": num_bytes}

    def close(self) -> None:
        if os.getpid() == self._pid:
            for fd in self._fds.values():
                os.close(fd)
        self._fds = OrderedDict()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fds"] = OrderedDict()  # descriptors never travel to another process
        state["_pid"] = -1
        return state

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def verify_shards(shard_dir: str | Path, splits=SPLITS, manifest: dict | None = None) -> None:
    """Check every shard of `splits` against the manifest's sha256; DataError names the file."""
    shard_dir = Path(shard_dir)
    m = manifest or read_manifest(shard_dir)
    for split in splits:
        for s in m["splits"].get(split, {}).get("shards", []):
            path = shard_dir / s["name"]
            if not path.is_file():
                raise DataError(f"{path}: missing shard (listed in {shard_dir / 'manifest.json'})")
            digest = sha256_file(path)
            if digest != s["sha256"]:
                raise DataError(f"{path}: sha256 {digest[:16]}... does not match the manifest's "
                                f"{s['sha256'][:16]}... (corrupt or replaced shard)")


# ---------------------------------------------------------------------------------- samplers
class TrainBatchSampler:
    """Infinite batches of sample indices for one DP rank, starting at `consumed_samples`."""

    def __init__(self, num_samples: int, micro_batch_size: int, dp_rank: int, dp_world: int,
                 seed: int, consumed_samples: int = 0):
        self.n, self.B, self.rank, self.world = num_samples, micro_batch_size, dp_rank, dp_world
        self.seed, self.start = seed, consumed_samples
        self._perms: dict[int, IndexPermutation] = {}

    def _perm(self, epoch: int) -> IndexPermutation:
        if epoch not in self._perms:
            self._perms = {epoch: IndexPermutation(self.n, self.seed, epoch)}
        return self._perms[epoch]

    def positions(self, consumed: int) -> np.ndarray:
        return consumed + self.rank * self.B + np.arange(self.B, dtype=np.int64)

    def indices(self, consumed: int) -> list[int]:
        pos = self.positions(consumed)
        epochs, within = pos // self.n, pos % self.n
        out = np.empty(self.B, dtype=np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._perm(int(e))(within[sel])
        return out.tolist()

    def __iter__(self) -> Iterator[list[int]]:
        consumed = self.start
        while True:
            yield self.indices(consumed)
            consumed += self.B * self.world


class EvalBatchSampler:
    """One pass in stored order; every rank gets ceil(N / G) batches, padded with None."""

    def __init__(self, num_samples: int, micro_batch_size: int, dp_rank: int, dp_world: int):
        self.n, self.B, self.rank, self.world = num_samples, micro_batch_size, dp_rank, dp_world

    def __len__(self) -> int:
        G = self.B * self.world
        return (self.n + G - 1) // G

    def __iter__(self) -> Iterator[list]:
        G = self.B * self.world
        for b in range(len(self)):
            start = b * G + self.rank * self.B
            yield [i if i < self.n else None for i in range(start, start + self.B)]


# ----------------------------------------------------------------------------------- loader
class ShardLoader:
    """Iterable of batches for one DP rank; see the module docstring. Training: infinite, resumes
    from `consumed_samples`. Validation: each ``iter()`` is one full pass; ``len()`` batches."""

    def __init__(self, dataset: ShardDataset, micro_batch_size: int, *, dp_rank: int = 0,
                 dp_world: int = 1, seed: int = 0, num_workers: int = 0,
                 consumed_samples: int = 0, pin_memory: bool = False,
                 prefetch_factor: int | None = None):
        if micro_batch_size < 1 or not 0 <= dp_rank < dp_world:
            raise ValueError(f"bad micro_batch_size {micro_batch_size} / dp_rank {dp_rank} / "
                             f"dp_world {dp_world}")
        self.dataset, self.split = dataset, dataset.split
        self.micro_batch_size, self.dp_rank, self.dp_world = micro_batch_size, dp_rank, dp_world
        self.seed, self.num_workers = seed, num_workers
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.consumed_samples = int(consumed_samples)
        self.train = dataset.split == "train"
        if dataset.num_samples == 0:
            if self.train:
                raise DataError(f"{dataset.shard_dir}: the train split holds no samples")
            log.warning("%s: the %s split holds no samples", dataset.shard_dir, dataset.split)

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.dp_world

    @property
    def epoch(self) -> int:
        """Epoch of the next sample to be consumed (training)."""
        return self.consumed_samples // max(1, self.dataset.num_samples)

    def __len__(self) -> int:
        if self.train:
            raise TypeError("the training loader is infinite")
        return len(self._sampler())

    def _sampler(self):
        if self.train:
            return TrainBatchSampler(self.dataset.num_samples, self.micro_batch_size,
                                     self.dp_rank, self.dp_world, self.seed,
                                     self.consumed_samples)
        return EvalBatchSampler(self.dataset.num_samples, self.micro_batch_size, self.dp_rank,
                                self.dp_world)

    def __iter__(self) -> Iterator[dict]:
        kwargs = {}
        if self.num_workers > 0 and self.prefetch_factor is not None:
            kwargs["prefetch_factor"] = self.prefetch_factor
        loader = DataLoader(self.dataset, batch_sampler=self._sampler(),
                            num_workers=self.num_workers, pin_memory=self.pin_memory, **kwargs)
        batches = iter(loader)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except DataError as e:
                raise _unwrapped(e) from None
            if self.train:
                self.consumed_samples += self.global_batch_size
            yield batch

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "seed": self.seed,
                "split": self.split, "num_samples": self.dataset.num_samples,
                "fingerprint": self.dataset.fingerprint,
                "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state["consumed_samples"]`; the next ``iter()`` starts exactly there."""
        if state.get("order", "random-access") != "random-access":  # stream.py's state: another order
            raise DataError(f"{self.dataset.shard_dir}: loader state is for the {state['order']!r} order (streamed), "
                            "this loader reads in random-access order (a run keeps one data.access)")
        for key, mine in (("split", self.split), ("seed", self.seed),
                          ("fingerprint", self.dataset.fingerprint),
                          ("num_samples", self.dataset.num_samples)):
            if key in state and state[key] != mine:
                raise DataError(f"{self.dataset.shard_dir}: loader state is for {key} "
                                f"{state[key]!r}, this loader has {mine!r}")
        self.consumed_samples = int(state["consumed_samples"])


def _unwrapped(e: DataError) -> DataError:
    """A DataError raised in a DataLoader worker comes back as one whose message is torch's
    "Caught DataError in DataLoader worker process 0." plus the worker's traceback: the original."""
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    if len(lines) < 2 or not lines[0].startswith("Caught "):
        return e
    return DataError(lines[-1].split("DataError: ", 1)[-1])


def build_loader(shard_dir: str | Path, split: str = "train", micro_batch_size: int = 1,
                 seq_len: int | None = None, *, dp_rank: int = 0, dp_world: int = 1,
                 seed: int = 0, num_workers: int = 0, expected_tokenizer_id: str | None = None,
                 consumed_samples: int = 0, state: dict | None = None,
                 verify: bool | str = "auto", pin_memory: bool = False,
                 prefetch_factor: int | None = None, vocab_size: int | None = None) -> ShardLoader:
    """A `ShardLoader` over `shard_dir`'s `split` for DP rank `dp_rank` of `dp_world`.

    seq_len, when given, must equal the shards' seq_len; expected_tokenizer_id (from
    `megaxatl.data.tokenizer_id(<model tokenizer>)`) must equal the shards'; `state` (a
    `state_dict()`) or `consumed_samples` resumes a training loader; vocab_size (the model's)
    bounds the token ids further than the manifest's vocabulary.
    """
    dataset = ShardDataset(shard_dir, split, seq_len=seq_len,
                           expected_tokenizer_id=expected_tokenizer_id, verify=verify,
                           vocab_size=vocab_size)
    loader = ShardLoader(dataset, micro_batch_size, dp_rank=dp_rank, dp_world=dp_world,
                         seed=seed, num_workers=num_workers, consumed_samples=consumed_samples,
                         pin_memory=pin_memory, prefetch_factor=prefetch_factor)
    if state is not None:
        loader.load_state_dict(state)
    return loader
