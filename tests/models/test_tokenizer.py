"""lasp-tokenize → lasp-train (dp 2 × sp 4) → lasp-generate on real text: a few of Python's own modules."""

from __future__ import annotations

import json
import os
import sysconfig

import numpy as np
import pytest

from models.cli import config_from_args, generate_main
from models.dataset import DataConfig, TokenData
from models.tokenizer import load_tokenizer, split_documents, tokenize
from models.tokenizer import main as tokenize_main
from models.train import main as train_main

STDLIB_FILES = ("textwrap.py", "shlex.py", "bisect.py", "heapq.py", "colorsys.py", "fnmatch.py", "queue.py")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The stdlib files copied to a folder, with a binary file that is skipped."""
    folder = tmp_path_factory.mktemp("corpus")
    for name in STDLIB_FILES:
        with open(os.path.join(sysconfig.get_paths()["stdlib"], name), encoding="utf-8") as fh:
            (folder / name).write_text(fh.read(), encoding="utf-8")
    (folder / "sub").mkdir()
    (folder / "sub" / "blob.bin").write_bytes(b"\xff\xfe\x00binary")
    return folder


def test_tokenize_train_generate(corpus, tmp_path, capsys):
    out, ckpt = tmp_path / "tok", tmp_path / "ckpt"
    args = [str(corpus), "--out", str(out), "--vocab-size", "384", "--val-fraction", "0.3", "--workers", "2"]
    assert tokenize_main(args + ["--no-progress"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["vocab_size"] == 384 and meta["dtype"] == "uint16" and meta["files"] == len(STDLIB_FILES) + 1
    assert meta["train_documents"] + meta["val_documents"] == len(STDLIB_FILES)  # the binary file is skipped
    tokenizer = load_tokenizer(str(out))
    texts = {(corpus / n).read_text(encoding="utf-8") for n in STDLIB_FILES}
    for split in ("train", "val"):
        ids = np.fromfile(out / f"{split}.bin", np.uint16)
        assert len(ids) == meta[f"{split}_tokens"] and ids[-1] == meta["eod_id"]
        docs = np.split(ids, np.flatnonzero(ids == meta["eod_id"]) + 1)[:-1]  # every document ends with eod
        assert len(docs) == meta[f"{split}_documents"]
        for doc in docs:  # byte-level BPE: each document decodes to its file exactly
            assert tokenizer.decode(doc[:-1].tolist()) in texts

    train = ["--preset", "tiny", "--data.source", "bin", "--data.path", str(out), "--data.pack_documents", "true"]
    train += ["--model.d_model", "32", "--model.n_layers", "1", "--model.n_heads", "2", "--model.ffn_dim", "64"]
    train += ["--dp", "2", "--sp", "4", "--batch-size", "4", "--seq-len", "32", "--steps", "12", "--lr", "1e-2"]
    train += ["--warmup-steps", "2", "--log-every", "4", "--eval-batches", "0", "--progress", "false"]
    train += ["--ckpt-dir", str(ckpt), "--metrics", str(tmp_path / "m.jsonl"), "--tensorboard", str(tmp_path / "tb")]
    config = config_from_args(train)
    assert config.model.vocab_size == 384  # from meta.json
    assert config_from_args(train + ["--model.vocab_size", "512"]).model.vocab_size == 512
    assert train_main(train) == 0
    records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.3, losses  # from about ln(384) = 5.95
    assert (ckpt / "12").is_dir() and (ckpt / "tokenizer.json").exists()
    events = b"".join(p.read_bytes() for p in (tmp_path / "tb").iterdir())
    assert b"train/loss" in events and b"train/tokens_per_s" in events  # (evaluation on val.bin: the test below)
    capsys.readouterr()

    assert generate_main(["--ckpt-dir", str(ckpt), "--prompt", "def ", "--max-new-tokens", "12", "--sp", "4"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("def ") and len(printed) > len("def ") + 4  # decoded text, not token ids


def test_tokenize_with_given_tokenizer_and_errors(corpus, tmp_path):
    first = tokenize([str(corpus)], str(tmp_path / "a"), vocab_size=300, workers=1, extensions=(".py",), progress=False)
    again = tokenize(
        [str(corpus)], str(tmp_path / "b"), tokenizer_path=str(tmp_path / "a"), workers=1, extensions=(".py",)
    )
    assert again == first  # the same tokenizer gives the same files
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # a lasp-tokenize folder: train on train.bin, evaluate on val.bin
    data = TokenData(DataConfig(source="bin", path=str(tmp_path / "a"), seq_len=16, batch_size=2), 300)
    assert len(data.train_tokens) == first["train_tokens"] and len(data.eval_tokens) == first["val_tokens"]
    val = np.fromfile(tmp_path / "a" / "val.bin", np.uint16)
    x, y = data.batch("eval", 0)
    np.testing.assert_array_equal(x[0, 0], val[:16])
    with pytest.raises(ValueError, match="says dtype"):
        TokenData(DataConfig(source="bin", path=str(tmp_path / "a"), bin_dtype="uint32"), 300)
    with pytest.raises(ValueError, match="more than the model's vocab_size"):
        TokenData(DataConfig(source="bin", path=str(tmp_path / "a")), 256)
    with pytest.raises(ValueError, match="exactly one"):
        tokenize([str(corpus)], str(tmp_path / "c"))
    with pytest.raises(ValueError, match="input not found"):
        tokenize([str(tmp_path / "missing")], str(tmp_path / "c"), vocab_size=300)
    train, val = split_documents([str(i) for i in range(10)], 0.2, seed=1)
    assert len(val) == 2 and sorted(train + val, key=int) == [str(i) for i in range(10)]
