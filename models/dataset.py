"""Token sources and deterministic, sharded batches for training and evaluation.

Every batch is a pure function of ``(seed, step)``: a restart from a checkpoint at step s sees
exactly the batches an uninterrupted run would, and each process of a multi-host job builds only
the rows and columns its devices hold (``jax.make_array_from_callback``).

Sources:
- ``synthetic``: rows of a random block of 2–16 tokens repeated (a copy task a model can learn,
  handy for throughput and smoke tests);
- ``text``: UTF-8 files read as bytes (vocabulary 256); the embedded corpus when no path is given;
- ``bin``: a flat pre-tokenized memmap of uint16 or uint32 tokens (nanoGPT/Megatron style).

Array sources are split into train (first ``1 − eval_fraction``) and eval (the rest) regions.
Train windows start at uniformly random offsets; eval windows are fixed and evenly spaced.

Packed documents (``pack_documents=True``): the token stream is a sequence of documents, each
followed by the end-of-document token ``eod_token``. For ``text`` the documents are the pieces of
each file split on ``doc_separator`` (blank lines by default; the separator itself is dropped) and
``eod_token`` defaults to 0 (the NUL byte, absent from text); a ``bin`` file must already hold
them with its own EOD id (``eod_token`` is required). Windows still cut the stream anywhere; the
model (``models.model.lm_loss``) turns the EOD tokens of each input row into ``segment_ids`` for
the token mixers and drops the one target per boundary that would predict across it.
"""

from __future__ import annotations

import importlib.resources
import os
from dataclasses import dataclass

import jax
import numpy as np

SOURCES = ("synthetic", "text", "bin")
BIN_DTYPES = ("uint16", "uint32")


@dataclass(frozen=True)
class DataConfig:
    source: str = "text"  # "synthetic" | "text" | "bin"
    path: str | None = None  # text: file or directory (None: the embedded corpus); bin: the .bin file
    bin_dtype: str = "uint16"
    batch_size: int = 8  # rows per optimizer step (all micro-batches together)
    seq_len: int = 256
    grad_accum: int = 1
    seed: int = 0
    eval_fraction: float = 0.05
    pack_documents: bool = False  # documents + EOD tokens; attention and loss never cross them
    eod_token: int | None = None  # end-of-document id; text default 0, required for bin
    doc_separator: str = "\n\n"  # text: documents are the pieces between separators (and files)

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"data source must be one of {SOURCES}, got source={self.source!r}")
        if self.bin_dtype not in BIN_DTYPES:
            raise ValueError(f"bin_dtype must be one of {BIN_DTYPES}, got bin_dtype={self.bin_dtype!r}")
        for name in ("batch_size", "seq_len", "grad_accum"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {name}={getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                "batch_size must be a multiple of grad_accum: "
                f"batch_size={self.batch_size}, grad_accum={self.grad_accum}"
            )
        if self.source == "bin" and not self.path:
            raise ValueError("source='bin' needs path= a .bin file of uint16/uint32 tokens")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got eval_fraction={self.eval_fraction}")
        if self.pack_documents:
            if self.source == "synthetic":
                raise ValueError("pack_documents needs source='text' or 'bin' (synthetic rows have no documents)")
            if self.source == "bin" and self.eod_token is None:
                raise ValueError("pack_documents with source='bin' needs eod_token= the id that ends each document")
            if self.source == "text" and not self.doc_separator:
                raise ValueError("pack_documents with source='text' needs a non-empty doc_separator")
        if self.eod_token is not None and self.eod_token < 0:
            raise ValueError(f"eod_token must be >= 0, got eod_token={self.eod_token}")

    @property
    def eod(self) -> int | None:
        """The end-of-document id when packing documents (text default 0), else None."""
        if not self.pack_documents:
            return None
        return 0 if self.eod_token is None else self.eod_token

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.grad_accum


def default_corpus_bytes() -> bytes:
    """The embedded default corpus (models/data/corpus.txt)."""
    return importlib.resources.files("models.data").joinpath("corpus.txt").read_bytes()


def _read_files(path: str | None) -> list[bytes]:
    if path is None:
        return [default_corpus_bytes()]
    files = [path]
    if os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    chunks = []
    for name in files:
        with open(name, "rb") as fh:
            chunks.append(fh.read())
    return chunks


def _read_text(path: str | None) -> np.ndarray:
    return np.frombuffer(b"\n".join(_read_files(path)), np.uint8)


def pack_text_documents(files: list[bytes], separator: bytes, eod: int) -> np.ndarray:
    """Byte tokens of every non-empty document (file pieces between separators), each followed by ``eod``."""
    docs = [d for raw in files for d in raw.split(separator) if d.strip()]
    if not docs:
        raise ValueError("pack_documents found no documents in the text")
    stream = np.empty(sum(len(d) + 1 for d in docs), np.int32)
    at = 0
    for d in docs:
        stream[at : at + len(d)] = np.frombuffer(d, np.uint8)
        stream[at + len(d)] = eod
        at += len(d) + 1
    return stream


class TokenData:
    """Deterministic train/eval batches ``(inputs, targets)`` of shape ``[A, B/A, T]`` (A = grad_accum)."""

    def __init__(self, config: DataConfig, vocab_size: int):
        self.config = config
        self.vocab_size = vocab_size
        self.tokens: np.ndarray | None = None
        if config.source == "text":
            if vocab_size < 256:
                raise ValueError(f"text data is byte-level and needs vocab_size >= 256, got vocab_size={vocab_size}")
            if config.pack_documents:
                if config.eod >= vocab_size:
                    raise ValueError(f"eod_token={config.eod} must be < vocab_size={vocab_size}")
                files = _read_files(config.path)
                self.tokens = pack_text_documents(files, config.doc_separator.encode(), config.eod)
            else:
                self.tokens = _read_text(config.path)
        elif config.source == "bin":
            if not os.path.exists(config.path):
                raise ValueError(f"bin data file not found: path={config.path!r}")
            self.tokens = np.memmap(config.path, dtype=config.bin_dtype, mode="r")
            if config.pack_documents and config.eod >= vocab_size:
                raise ValueError(f"eod_token={config.eod} must be < vocab_size={vocab_size}")
        if self.tokens is not None:
            n = len(self.tokens)
            self.n_train = int(n * (1 - config.eval_fraction))
            need = config.seq_len + 1
            if self.n_train < need or n - self.n_train < need:
                raise ValueError(
                    f"{config.source} data has {n} tokens: too few for seq_len={config.seq_len} with "
                    f"eval_fraction={config.eval_fraction} (each split needs at least seq_len + 1 tokens)"
                )

    # ---- row contents, a pure function of (split, step, row) ----
    def _starts(self, split: str, step: int, rows: np.ndarray) -> np.ndarray:
        t = self.config.seq_len + 1
        if split == "train":
            rng = np.random.default_rng([self.config.seed, step])
            return rng.integers(0, self.n_train - t + 1, size=self.config.batch_size)[rows]
        n_eval = len(self.tokens) - self.n_train
        n_windows = max(1, (n_eval - t) // t + 1)
        return self.n_train + ((step * self.config.batch_size + rows) % n_windows) * t

    def _synthetic(self, split: str, step: int, row: int, cols: slice) -> np.ndarray:
        rng = np.random.default_rng([self.config.seed, 1 if split == "eval" else 0, step, row])
        period = int(rng.integers(2, 17))
        block = rng.integers(0, self.vocab_size, size=period)
        return block[np.arange(cols.start, cols.stop) % period]

    def window(self, split: str, step: int, rows: np.ndarray, cols: slice) -> np.ndarray:
        """Tokens ``[len(rows), cols]`` of the ``seq_len + 1`` windows of the given rows (int32)."""
        if self.tokens is None:
            out = np.stack([self._synthetic(split, step, int(r), cols) for r in rows])
        else:
            starts = self._starts(split, step, rows)
            out = np.stack([np.asarray(self.tokens[s + cols.start : s + cols.stop]) for s in starts])
            top = int(out.max(initial=0))
            if top >= self.vocab_size:
                raise ValueError(f"token id {top} in {self.config.path} is >= vocab_size={self.vocab_size}")
        return out.astype(np.int32)

    def batch(self, split: str, step: int, sharding: jax.sharding.Sharding | None = None):
        """``(inputs, targets)`` int32 ``[A, B/A, T]``, built shard by shard on ``sharding``."""
        a, m, t = self.config.grad_accum, self.config.micro_batch, self.config.seq_len
        shape = (a, m, t)

        def block(index, shift):
            ia, ib, it = (slice(*s.indices(n)) for s, n in zip(index, shape, strict=True))
            rows = (np.arange(ia.start, ia.stop)[:, None] * m + np.arange(ib.start, ib.stop)[None, :]).reshape(-1)
            cols = slice(it.start + shift, it.stop + shift)
            return self.window(split, step, rows, cols).reshape(ia.stop - ia.start, ib.stop - ib.start, -1)

        if sharding is None:
            full = (slice(None),) * 3
            return block(full, 0), block(full, 1)
        inputs = jax.make_array_from_callback(shape, sharding, lambda idx: block(idx, 0))
        targets = jax.make_array_from_callback(shape, sharding, lambda idx: block(idx, 1))
        return inputs, targets
