"""``lasp-tokenize``: text files → ``train.bin``, ``val.bin``, ``tokenizer.json`` and ``meta.json``.

A byte-level BPE (GPT-2 style: every byte is a base token, so any text round-trips) is trained with
Hugging Face ``tokenizers`` on the training documents (``--vocab-size N``), or an existing
``tokenizer.json`` is used (``--tokenizer FILE``). Every input file is one document (or, with
``--doc-separator``, each piece between separators); documents go to ``val.bin`` or ``train.bin``
by a seeded draw (``--val-fraction``), and each ends with the end-of-document token, so
``--data.pack_documents true`` finds every boundary (``models.dataset``, notes/design.md §2 on
documents across shards). Tokens are written as uint16 when the vocabulary has fewer than 65,536
entries, else uint32.

Encoding runs in worker processes (``--workers``, default every core), batches of documents at a
time, with a progress bar. ``lasp-train --data.source bin --data.path DIR`` reads the directory;
the trainer copies ``tokenizer.json`` beside its checkpoints, and ``lasp-generate`` encodes and
decodes with it (``load_tokenizer``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import sys
import time
import warnings
from collections.abc import Iterator

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from models.dataset import META_FILE, TOKENIZER_FILE, document_pieces, separator_from_flag

EOD_TOKEN = "<|endoftext|>"
# end-of-document tokens of common tokenizers, tried in order for a given tokenizer.json
KNOWN_EOD_TOKENS = (EOD_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "<|im_end|>")
BATCH_DOCUMENTS = 64  # documents per worker task


def document_files(inputs: list[str], extensions: tuple[str, ...] = ()) -> list[str]:
    """Every file of ``inputs`` (files and folders, walked recursively, sorted), filtered by extension."""
    files = []
    for path in inputs:
        if os.path.isdir(path):
            found = [os.path.join(d, f) for d, dirs, fs in os.walk(path) for f in fs if not f.startswith(".")]
            files += sorted(found)
        elif os.path.exists(path):
            files.append(path)
        else:
            raise ValueError(f"input not found: {path!r}")
    if extensions:
        files = [f for f in files if f.endswith(extensions)]
    if not files:
        raise ValueError(f"no input files in {inputs} (extensions: {extensions or 'any'})")
    return files


def read_documents(files: list[str], separator: str | None = None) -> Iterator[str]:
    """The UTF-8 text of each file (or each non-blank piece between ``separator``s; ``"\\n\\n"``: blank
    lines, also ``\\r\\n`` ones, as ``models.dataset.document_pieces``); undecodable files are skipped
    with a warning that names them."""
    for name in files:
        with open(name, "rb") as fh:
            raw = fh.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            warnings.warn(f"skipped {name}: not UTF-8 ({err.reason} at byte {err.start})", stacklevel=2)
            continue
        yield from document_pieces(text, separator) if separator else ([text] if text.strip() else [])


def train_bpe(documents: Iterator[str], vocab_size: int, *, show_progress: bool = True) -> Tokenizer:
    """A byte-level BPE with ``vocab_size`` entries (256 bytes + merges + ``EOD_TOKEN``)."""
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be >= 257 (256 bytes and the end-of-document token), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(documents, trainer)
    return tokenizer


def load_tokenizer(path: str) -> Tokenizer:
    """A ``tokenizer.json`` (a file, or a directory holding one: lasp-tokenize output or a checkpoint)."""
    if os.path.isdir(path):
        path = os.path.join(path, TOKENIZER_FILE)
    if not os.path.exists(path):
        raise ValueError(f"tokenizer not found: {path!r}")
    return Tokenizer.from_file(path)


def eod_id(tokenizer: Tokenizer, token: str | None = None) -> int:
    """The id of ``token`` or, when None, of the first of ``KNOWN_EOD_TOKENS`` in the vocabulary."""
    for name in (token,) if token else KNOWN_EOD_TOKENS:
        index = tokenizer.token_to_id(name)
        if index is not None:
            return index
    raise ValueError(
        f"the tokenizer has no end-of-document token {token or KNOWN_EOD_TOKENS}: pass --eod-token with its text"
    )


def token_dtype(vocab_size: int) -> str:
    """uint16 below 65,536 tokens of vocabulary, else uint32."""
    return "uint16" if vocab_size < 2**16 else "uint32"


# ---- worker processes: each loads the tokenizer once, then encodes batches of documents ----
_WORKER: dict = {}


def _init_worker(tokenizer_json: str, eod: int, dtype: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer.encode_special_tokens = True  # "<|endoftext|>" in a document is text, not a document end
    _WORKER.update(tokenizer=tokenizer, eod=eod, dtype=dtype)


def _encode_batch(documents: list[str]) -> np.ndarray:
    """The documents' tokens, each followed by the end-of-document id, as one array."""
    encodings = _WORKER["tokenizer"].encode_batch(documents, add_special_tokens=False)
    ids = [np.append(np.asarray(e.ids, np.int64), _WORKER["eod"]) for e in encodings]
    return np.concatenate(ids).astype(_WORKER["dtype"]) if ids else np.zeros(0, _WORKER["dtype"])


def _batches(documents: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(documents), size):
        yield documents[i : i + size]


@contextlib.contextmanager
def encoder_pool(tokenizer: Tokenizer, *, eod: int, dtype: str, workers: int):
    """A ``map`` of ``_encode_batch`` over ``workers`` processes (this process when ``workers <= 1``).

    The processes come from a fork server that imports this module once (a clean process: this
    one may hold jax's threads), so each worker starts without importing anything again."""
    init = (tokenizer.to_str(), eod, dtype)
    if workers <= 1:
        _init_worker(*init)
        yield lambda batches: map(_encode_batch, batches)
        return
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    with concurrent.futures.ProcessPoolExecutor(workers, context, _init_worker, init) as pool:
        yield lambda batches: pool.map(_encode_batch, batches)


def encode_to_file(
    documents: list[str], path: str, encode_map, *, workers: int, label: str, progress: bool = True
) -> int:
    """Write the documents' tokens (each ending with the EOD id) to ``path`` in order; returns the token count.

    Batches of at most ``BATCH_DOCUMENTS``, at least four per worker when there are enough documents."""
    bar = _Bar(len(documents), label, enabled=progress)
    size = min(BATCH_DOCUMENTS, max(1, len(documents) // (4 * workers)))
    count = 0
    with open(path, "wb") as out:
        for batch, ids in zip(_batches(documents, size), encode_map(_batches(documents, size)), strict=True):
            ids.tofile(out)
            count += len(ids)
            bar.advance(len(batch))
    bar.close()
    return count


class _Bar:
    """Documents done / total on one line of stderr."""

    def __init__(self, total: int, label: str, *, enabled: bool = True):
        self.total, self.label, self.done, self.t0 = total, label, 0, time.perf_counter()
        self.tty, self.enabled = sys.stderr.isatty(), enabled

    def advance(self, n: int) -> None:
        self.done += n
        if self.tty and self.enabled:
            rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
            print(f"\r{self.label}: {self.done}/{self.total} documents ({rate:.0f}/s)", end="", file=sys.stderr)

    def close(self) -> None:
        if not self.enabled:
            return
        seconds = time.perf_counter() - self.t0
        print(f"\r{self.label}: {self.done}/{self.total} documents in {seconds:.1f} s", file=sys.stderr)


def split_documents(documents: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, val): a seeded draw of ``round(val_fraction · n)`` documents (at least one when > 0) for val."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = max(1, round(val_fraction * len(documents))) if val_fraction > 0 else 0
    if n_val >= len(documents):
        raise ValueError(f"{len(documents)} documents leave none for training with val_fraction={val_fraction}")
    is_val = np.zeros(len(documents), bool)
    is_val[np.random.default_rng(seed).choice(len(documents), n_val, replace=False)] = True
    return [d for d, v in zip(documents, is_val) if not v], [d for d, v in zip(documents, is_val) if v]


def tokenize(
    inputs: list[str],
    out: str,
    *,
    vocab_size: int | None = None,
    tokenizer_path: str | None = None,
    val_fraction: float = 0.01,
    workers: int | None = None,
    seed: int = 0,
    extensions: tuple[str, ...] = (),
    doc_separator: str | None = None,
    eod_token: str | None = None,
    progress: bool = True,
) -> dict:
    """Tokenize ``inputs`` into the directory ``out``; returns the ``meta.json`` it wrote."""
    if (vocab_size is None) == (tokenizer_path is None):
        raise ValueError("give exactly one of vocab_size (train a byte-level BPE) and tokenizer (a tokenizer.json)")
    files = document_files(inputs, extensions)
    documents = list(read_documents(files, doc_separator))
    if len(documents) < 2:
        raise ValueError(f"found {len(documents)} UTF-8 documents in {len(files)} files: need at least 2")
    train_docs, val_docs = split_documents(documents, val_fraction, seed)
    if tokenizer_path is None:
        tokenizer = train_bpe(iter(train_docs), vocab_size, show_progress=progress)
    else:
        tokenizer = load_tokenizer(tokenizer_path)
    eod = eod_id(tokenizer, eod_token)
    vocab = tokenizer.get_vocab_size()
    dtype = token_dtype(vocab)
    os.makedirs(out, exist_ok=True)
    tokenizer.save(os.path.join(out, TOKENIZER_FILE))
    workers = min(workers or os.cpu_count() or 1, len(documents))
    with encoder_pool(tokenizer, eod=eod, dtype=dtype, workers=workers) as encode_map:
        kw = dict(workers=workers, progress=progress)
        n_train = encode_to_file(train_docs, os.path.join(out, "train.bin"), encode_map, label="train", **kw)
        n_val = encode_to_file(val_docs, os.path.join(out, "val.bin"), encode_map, label="val", **kw)
    meta = {
        "vocab_size": vocab,
        "dtype": dtype,
        "eod_id": eod,
        "eod_token": tokenizer.id_to_token(eod),
        "train_tokens": n_train,
        "val_tokens": n_val,
        "train_documents": len(train_docs),
        "val_documents": len(val_docs),
        "files": len(files),
        "tokenizer": TOKENIZER_FILE,
    }
    with open(os.path.join(out, META_FILE), "w") as fh:
        json.dump(meta, fh, indent=2)
    return meta


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lasp-tokenize",
        description="Tokenize text files and folders into DIR/train.bin, val.bin, tokenizer.json and meta.json "
        "for lasp-train --data.source bin --data.path DIR.",
        allow_abbrev=False,
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="text files and folders (walked recursively)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--vocab-size", type=int, metavar="N", help="train a byte-level BPE of N tokens")
    which.add_argument("--tokenizer", metavar="FILE", help="use this tokenizer.json instead of training one")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents for val.bin")
    p.add_argument("--workers", type=int, default=None, help="encoding processes (default: every core)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val draw")
    p.add_argument("--ext", default="", help="comma-separated file endings to keep, e.g. .py,.txt (default: all)")
    p.add_argument(
        "--doc-separator",
        default=None,
        type=separator_from_flag,
        help="split files into documents on this string (backslash escapes: '\\n\\n' is a blank line)",
    )
    p.add_argument("--eod-token", default=None, help=f"end-of-document token text (default: {EOD_TOKEN} or known)")
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    return p


def main(argv: list[str] | None = None) -> int:
    """``lasp-tokenize``; prints ``meta.json``."""
    args = build_parser().parse_args(argv)
    try:
        meta = tokenize(
            args.inputs,
            args.out,
            vocab_size=args.vocab_size,
            tokenizer_path=args.tokenizer,
            val_fraction=args.val_fraction,
            workers=args.workers,
            seed=args.seed,
            extensions=tuple(e for e in args.ext.split(",") if e),
            doc_separator=args.doc_separator,
            eod_token=args.eod_token,
            progress=not args.no_progress,
        )
    except ValueError as e:
        print(f"lasp-tokenize: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(meta, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
