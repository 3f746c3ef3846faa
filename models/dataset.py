"""Token sources and deterministic, sharded batches for training and evaluation.

Every batch is a pure function of ``(seed, step)``: a restart from a checkpoint at step s sees
exactly the batches an uninterrupted run would, and each process of a multi-host job builds only
the rows and columns its devices hold (``jax.make_array_from_callback``).

Sources:
- ``synthetic``: rows of a random block of 2–16 tokens repeated (a copy task a model can learn,
  handy for throughput and smoke tests);
- ``text``: UTF-8 files read as bytes (vocabulary 256); the embedded corpus when no path is given;
- ``bin``: a flat pre-tokenized memmap of uint16 or uint32 tokens (nanoGPT/Megatron style): a
  ``.bin`` file, or a directory written by ``lasp-tokenize`` (``models.tokenizer``) holding
  ``train.bin``, ``val.bin``, ``tokenizer.json`` and ``meta.json`` (the dtype, the vocabulary size
  and the end-of-document id are read from ``meta.json``).

A single array is split into train (first ``1 − eval_fraction``) and eval (the rest) regions; a
``lasp-tokenize`` directory trains on ``train.bin`` and evaluates on ``val.bin``.
Train windows start at uniformly random offsets; eval windows are fixed and evenly spaced.

Packed documents (``pack_documents=True``): the token stream is a sequence of documents, each
followed by the end-of-document token ``eod_token``. For ``text`` the documents are the pieces of
each file split on ``doc_separator`` (the default ``"\\n\\n"`` means blank lines: also ``\\r\\n`` ones and
lines of spaces or tabs; the separator itself is dropped; ``separator_from_flag`` reads ``\\n`` escapes
from the command line) and
``eod_token`` defaults to 0 (the NUL byte, absent from text); a ``bin`` file must already hold
them with its own EOD id (``eod_token`` is required, or read from a directory's ``meta.json``).
Windows still cut the stream anywhere; the model (``models.model.lm_loss``) turns the EOD tokens
of each input row into ``segment_ids`` for the token mixers and drops the one target per boundary
that would predict across it.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import re
from dataclasses import dataclass
from typing import Literal

import jax
import numpy as np

SOURCES = ("synthetic", "text", "bin")
BIN_DTYPES = ("uint16", "uint32")
META_FILE = "meta.json"  # written by lasp-tokenize beside train.bin, val.bin and tokenizer.json
TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class DataConfig:
    """Where the tokens come from and how batches are cut from them."""

    source: Literal["synthetic", "text", "bin"] = "text"  # token source (see the module docstring)
    path: str | None = None  # text: file or folder (None: the embedded corpus); bin: a .bin or a lasp-tokenize folder
    bin_dtype: Literal["uint16", "uint32"] | None = None  # bin token dtype; None: meta.json's, else uint16
    batch_size: int = 8  # rows per optimizer step (all micro-batches together)
    seq_len: int = 256  # tokens per row
    grad_accum: int = 1  # micro-batches per step (gradient accumulation)
    seed: int = 0  # seed of the train windows' offsets
    eval_fraction: float = 0.05  # share of a single array held out for evaluation (lasp-tokenize: val.bin)
    pack_documents: bool = False  # documents + EOD tokens; attention and loss never cross them
    eod_token: int | None = None  # end-of-document id; text default 0, required for bin
    doc_separator: str = "\n\n"  # text: documents are the pieces between separators (and files)

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"data source must be one of {SOURCES}, got source={self.source!r}")
        if self.bin_dtype is not None and self.bin_dtype not in BIN_DTYPES:
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
            raise ValueError(
                "source='bin' needs path= a .bin file of uint16/uint32 tokens or a lasp-tokenize directory"
            )
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got eval_fraction={self.eval_fraction}")
        if self.pack_documents:
            if self.source == "synthetic":
                raise ValueError("pack_documents needs source='text' or 'bin' (synthetic rows have no documents)")
            if self.source == "bin" and self.eod_token is None and os.path.isfile(self.path):
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
    """The bytes of the file ``path``, or of every file under the folder (hidden files and folders
    skipped, as ``lasp-tokenize`` does), or the embedded corpus for None."""
    if path is None:
        return [default_corpus_bytes()]
    if not os.path.exists(path):
        raise ValueError(f"text data not found: path={path!r}")
    files = [path]
    if os.path.isdir(path):
        files = []
        for folder, dirs, names in os.walk(path):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            files += [os.path.join(folder, n) for n in names if not n.startswith(".")]
        files.sort()
    chunks = []
    for name in files:
        with open(name, "rb") as fh:
            chunks.append(fh.read())
    return chunks


BLANK_LINES = "\n\n"  # the default separator: a blank line, also \r\n and lines of spaces / tabs
_BLANK_LINE_RE = r"\r?\n[ \t]*\r?\n"


def separator_from_flag(text: str) -> str:
    """A separator typed on a command line: backslash escapes (``\\n``, ``\\t``, ``\\r``, ``\\x00``)
    become the characters (a shell passes ``'\\n\\n'`` as four characters, not a blank line)."""
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


def document_pieces(raw, separator):
    """The non-blank pieces of ``raw`` (str or bytes) between ``separator``s; ``BLANK_LINES`` splits
    on blank lines whatever their line ends (``\\r\\n``) and spaces."""
    if separator == BLANK_LINES or separator == BLANK_LINES.encode():
        pattern = _BLANK_LINE_RE if isinstance(raw, str) else _BLANK_LINE_RE.encode()
        pieces = re.split(pattern, raw)
    else:
        pieces = raw.split(separator)
    return [p for p in pieces if p.strip()]


def _read_text(path: str | None) -> np.ndarray:
    return np.frombuffer(b"\n".join(_read_files(path)), np.uint8)


def pack_text_documents(files: list[bytes], separator: bytes, eod: int) -> np.ndarray:
    """Byte tokens of every non-empty document (file pieces between separators), each followed by ``eod``."""
    docs = [d for raw in files for d in document_pieces(raw, separator)]
    if not docs:
        raise ValueError("pack_documents found no documents in the text")
    if eod < 256 and any(bytes([eod]) in d for d in docs):
        raise ValueError(
            f"the text holds byte {eod} inside a document, which is the end-of-document token eod_token={eod}: "
            "it would end documents there; pick an eod_token >= 256 (vocab_size must exceed it)"
        )
    stream = np.empty(sum(len(d) + 1 for d in docs), np.int32)
    at = 0
    for d in docs:
        stream[at : at + len(d)] = np.frombuffer(d, np.uint8)
        stream[at + len(d)] = eod
        at += len(d) + 1
    return stream


def read_meta(directory: str) -> dict:
    """The ``meta.json`` of a ``lasp-tokenize`` directory (``vocab_size``, ``dtype``, ``eod_id``, counts)."""
    path = os.path.join(directory, META_FILE)
    if not os.path.exists(path):
        raise ValueError(f"{directory!r} is a directory without {META_FILE}: expected the output of lasp-tokenize")
    with open(path) as fh:
        return json.load(fh)


def _memmap(path: str, dtype: str, flag: str) -> np.ndarray:
    """``path`` as a read-only array of ``dtype`` tokens; an empty file or a size that is not a whole
    number of tokens raises, naming the file and ``flag`` (the option that sets the dtype)."""
    size, itemsize = os.path.getsize(path), np.dtype(dtype).itemsize
    if size == 0:
        raise ValueError(f"bin data {path!r} is empty")
    if size % itemsize:
        raise ValueError(
            f"bin data {path!r} holds {size} bytes, not a whole number of {dtype} tokens ({itemsize} bytes each): "
            f"is {flag} right?"
        )
    return np.memmap(path, dtype=dtype, mode="r")


def _looks_like_uint32(tokens: np.ndarray) -> bool:
    """uint32 tokens below 65,536 read as uint16 (little-endian): every second value is 0."""
    head = np.asarray(tokens[: 1 << 20])
    return len(head) >= 64 and not head[1::2].any() and bool(head[0::2].any())


def _bin_arrays(config: DataConfig) -> tuple[np.ndarray, np.ndarray | None, dict | None]:
    """(train tokens, eval tokens or None, meta or None) of a ``bin`` source, memory-mapped."""
    if not os.path.exists(config.path):
        raise ValueError(f"bin data not found: path={config.path!r}")
    if not os.path.isdir(config.path):
        tokens = _memmap(config.path, config.bin_dtype or "uint16", "bin_dtype (--data.bin_dtype)")
        if config.bin_dtype is None and _looks_like_uint32(tokens):
            raise ValueError(
                f"bin data {config.path!r} read as uint16 (the default) has 0 at every odd position: it looks "
                "like uint32 tokens; pass bin_dtype='uint32' (--data.bin_dtype uint32), or bin_dtype='uint16' "
                "to read it as uint16 anyway"
            )
        return tokens, None, None
    meta = read_meta(config.path)
    if config.bin_dtype is not None and config.bin_dtype != meta["dtype"]:
        raise ValueError(f"bin_dtype={config.bin_dtype!r} but {config.path}/{META_FILE} says dtype={meta['dtype']!r}")
    train, val = (os.path.join(config.path, name) for name in ("train.bin", "val.bin"))
    flag = f"the dtype of {META_FILE}"
    if not os.path.exists(val) or os.path.getsize(val) == 0:
        return _memmap(train, meta["dtype"], flag), None, meta
    return _memmap(train, meta["dtype"], flag), _memmap(val, meta["dtype"], flag), meta


def check_token_ids(tokens: np.ndarray, vocab_size: int, where: str, *, chunk: int = 1 << 24) -> None:
    """Raise if any id in ``tokens`` is ``>= vocab_size``, naming ``where`` and the first such position
    (read in chunks: a memory-mapped file is scanned once, not loaded)."""
    for start in range(0, len(tokens), chunk):
        part = np.asarray(tokens[start : start + chunk])
        top = int(part.max(initial=0))
        if top >= vocab_size:
            at = start + int(np.argmax(part >= vocab_size))
            raise ValueError(
                f"token id {int(part[at - start])} at position {at} of {where} is >= vocab_size={vocab_size} "
                "(--model.vocab_size): the embedding has no row for it"
            )


class TokenData:
    """Deterministic train/eval batches ``(inputs, targets)`` of shape ``[A, B/A, T]`` (A = grad_accum).

    ``eod``: the end-of-document id the model packs on (None unless ``pack_documents``); ``meta``:
    the ``meta.json`` of a ``lasp-tokenize`` directory (else None).
    """

    def __init__(self, config: DataConfig, vocab_size: int):
        self.config = config
        self.vocab_size = vocab_size
        self.eod = config.eod
        self.meta: dict | None = None
        tokens, eval_tokens = None, None
        if config.source == "text":
            if vocab_size < 256:
                raise ValueError(f"text data is byte-level and needs vocab_size >= 256, got vocab_size={vocab_size}")
            if config.pack_documents:
                if config.eod >= vocab_size:
                    raise ValueError(f"eod_token={config.eod} must be < vocab_size={vocab_size}")
                files = _read_files(config.path)
                tokens = pack_text_documents(files, config.doc_separator.encode(), config.eod)
            else:
                tokens = _read_text(config.path)
        elif config.source == "bin":
            tokens, eval_tokens, self.meta = _bin_arrays(config)
            if config.pack_documents and self.eod is None:
                if self.meta is None or "eod_id" not in self.meta:
                    raise ValueError("pack_documents with source='bin' needs eod_token= the id that ends each document")
                self.eod = int(self.meta["eod_id"])
            if self.meta is not None and self.meta["vocab_size"] > vocab_size:
                raise ValueError(
                    f"{config.path}/{META_FILE} has vocab_size={self.meta['vocab_size']}, more than the model's "
                    f"vocab_size={vocab_size}"
                )
            if config.pack_documents and self.eod >= vocab_size:
                raise ValueError(f"eod_token={self.eod} must be < vocab_size={vocab_size}")
            meta_eod = None if self.meta is None else self.meta.get("eod_id")
            if config.eod_token is not None and meta_eod is not None and config.eod_token != meta_eod:
                raise ValueError(f"eod_token={config.eod_token} but {config.path}/{META_FILE} says eod_id={meta_eod}")
            if self.meta is None:  # a lasp-tokenize directory's ids are below its vocab_size, checked above
                check_token_ids(tokens, vocab_size, f"bin data {config.path!r}")
        self.tokens = tokens  # the whole stream of a single array (a lasp-tokenize directory: train.bin)
        self.train_tokens = self.eval_tokens = None
        if tokens is not None:
            held_out = f"eval_fraction={config.eval_fraction}" if eval_tokens is None else "val.bin"
            if eval_tokens is None:
                n_train = int(len(tokens) * (1 - config.eval_fraction))
                tokens, eval_tokens = tokens[:n_train], tokens[n_train:]
            self.train_tokens, self.eval_tokens = tokens, eval_tokens
            need = config.seq_len + 1
            if len(tokens) < need or len(eval_tokens) < need:
                raise ValueError(
                    f"{config.source} data has {len(tokens)} train and {len(eval_tokens)} eval tokens: too few for "
                    f"seq_len={config.seq_len} (each split needs at least seq_len + 1 tokens; eval tokens from "
                    f"{held_out})"
                )

    # ---- row contents, a pure function of (split, step, row) ----
    def _starts(self, split: str, step: int, rows: np.ndarray) -> np.ndarray:
        t = self.config.seq_len + 1
        if split == "train":
            rng = np.random.default_rng([self.config.seed, step])
            return rng.integers(0, len(self.train_tokens) - t + 1, size=self.config.batch_size)[rows]
        n_windows = max(1, (len(self.eval_tokens) - t) // t + 1)
        return ((step * self.config.batch_size + rows) % n_windows) * t

    def _synthetic(self, split: str, step: int, row: int, cols: slice) -> np.ndarray:
        rng = np.random.default_rng([self.config.seed, 1 if split == "eval" else 0, step, row])
        period = int(rng.integers(2, 17))
        block = rng.integers(0, self.vocab_size, size=period)
        return block[np.arange(cols.start, cols.stop) % period]

    def window(self, split: str, step: int, rows: np.ndarray, cols: slice) -> np.ndarray:
        """Tokens ``[len(rows), cols]`` of the ``seq_len + 1`` windows of the given rows (int32)."""
        if self.train_tokens is None:
            out = np.stack([self._synthetic(split, step, int(r), cols) for r in rows])
        else:
            tokens = self.train_tokens if split == "train" else self.eval_tokens
            starts = self._starts(split, step, rows)
            out = np.stack([np.asarray(tokens[s + cols.start : s + cols.stop]) for s in starts])
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
