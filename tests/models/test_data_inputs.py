"""Bad or unusual training data gets a clear error or the documented behaviour, never silent
garbage: token ids past the vocabulary anywhere in a ``.bin`` (found at start, not at the step whose
window covers them), files the dtype does not fit, uint32 tokens read as uint16, separators typed on
a command line, CRLF blank lines, the EOD byte inside text, hidden files, and a checkpoint written
before the final evaluation (an evaluation that fails loses no training)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from models import dataset
from models.cli import config_from_args
from models.dataset import DataConfig, TokenData, document_pieces, pack_text_documents, separator_from_flag
from models.tokenizer import build_parser as tokenize_parser
from models.train import Trainer
from tests.models.common import replace, train_config


def _bin(tmp_path, tokens, dtype="uint16", name="tokens.bin"):
    path = tmp_path / name
    np.asarray(tokens, dtype).tofile(path)
    return str(path)


def test_token_id_past_the_vocabulary_raises_at_start(tmp_path, rng):
    """One bad id somewhere in the file: before, the run trained until a window happened to hold it
    (or until the final evaluation, after which no checkpoint was written)."""
    tokens = rng.integers(0, 100, size=20_000)
    at = int(rng.integers(0, len(tokens)))
    tokens[at] = 300
    cfg = DataConfig(source="bin", path=_bin(tmp_path, tokens), seq_len=16, batch_size=2)
    with pytest.raises(ValueError, match=rf"token id 300 at position {at} of bin data .* is >= vocab_size=256"):
        TokenData(cfg, vocab_size=256)
    # the scan reads the file in chunks: the position is found past the first chunk too
    with pytest.raises(ValueError, match=rf"position {at} "):
        dataset.check_token_ids(np.memmap(cfg.path, np.uint16, mode="r"), 256, "x", chunk=1000)
    tokens[at] = 255
    data = TokenData(DataConfig(source="bin", path=_bin(tmp_path, tokens), seq_len=16, batch_size=2), 256)
    assert data.batch("train", 0)[0].shape == (1, 2, 16)


@pytest.mark.parametrize(
    "size,dtype,match",
    [
        (0, None, "is empty"),
        (7, None, r"holds 7 bytes, not a whole number of uint16 tokens"),
        (10, "uint32", r"holds 10 bytes, not a whole number of uint32 tokens"),
    ],
    ids=["empty", "odd-bytes", "uint32-odd"],
)
def test_bin_file_that_the_dtype_does_not_fit(tmp_path, size, dtype, match):
    path = tmp_path / "t.bin"
    path.write_bytes(b"\x01" * size)
    with pytest.raises(ValueError, match=match):
        TokenData(DataConfig(source="bin", path=str(path), bin_dtype=dtype), vocab_size=512)


def test_uint32_tokens_read_as_uint16_raise(tmp_path, rng):
    path = _bin(tmp_path, rng.integers(1, 200, size=5000), dtype="uint32")
    with pytest.raises(ValueError, match=r"looks like uint32 tokens; pass bin_dtype='uint32'"):
        TokenData(DataConfig(source="bin", path=path, seq_len=16), vocab_size=256)
    data = TokenData(DataConfig(source="bin", path=path, bin_dtype="uint32", seq_len=16), vocab_size=256)
    inputs, _ = data.batch("train", 0)
    assert inputs.min() >= 1  # no zero halves: the tokens themselves
    # told uint16 on purpose, the file is read as such
    TokenData(DataConfig(source="bin", path=path, bin_dtype="uint16", seq_len=16), vocab_size=256)


def test_missing_text_path_raises_naming_it(tmp_path):
    with pytest.raises(ValueError, match=r"text data not found: path=.*nowhere"):
        TokenData(DataConfig(source="text", path=str(tmp_path / "nowhere")), vocab_size=256)


def test_separator_typed_on_a_command_line_is_unescaped():
    """A shell passes '\\n\\n' as backslash-n twice; taken literally, the corpus was one document."""
    assert separator_from_flag(r"\n\n") == "\n\n"
    assert separator_from_flag(r"\x00--é") == "\x00--é"
    argv = ["--preset", "tiny", "--data.pack_documents", "true", "--data.doc_separator", r"\n\n"]
    assert config_from_args(argv).data.doc_separator == "\n\n"
    args = tokenize_parser().parse_args(["in", "--out", "o", "--vocab-size", "300", "--doc-separator", r"\n---\n"])
    assert args.doc_separator == "\n---\n"


def test_blank_lines_split_whatever_their_line_ends():
    raw = b"one\r\n\r\ntwo\n  \nthree\n\t\r\nfour\n\n\nfive"
    assert document_pieces(raw, b"\n\n") == [b"one", b"two", b"three", b"four", b"\nfive"]
    assert document_pieces(raw.decode(), "\n\n") == ["one", "two", "three", "four", "\nfive"]
    assert document_pieces(b"a--b----c", b"--") == [b"a", b"b", b"c"]  # any other separator: as given
    stream = pack_text_documents([b"ab\r\n\r\ncd"], b"\n\n", eod=0)
    np.testing.assert_array_equal(stream, [97, 98, 0, 99, 100, 0])


def test_end_of_document_byte_inside_text_raises():
    with pytest.raises(ValueError, match=r"byte 0 inside a document, which is the end-of-document token eod_token=0"):
        pack_text_documents([b"a\x00b\n\nc"], b"\n\n", eod=0)
    assert len(pack_text_documents([b"a\x00b\n\nc"], b"\n\n", eod=300)) == 6


def test_hidden_files_and_folders_are_not_text(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"visible")
    (tmp_path / ".hidden").write_bytes(b"secret")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "obj").write_bytes(b"object")
    assert dataset._read_files(str(tmp_path)) == [b"visible"]


def test_eod_token_that_disagrees_with_meta_raises(tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    _bin(folder, np.arange(1000) % 50, name="train.bin")
    (folder / "meta.json").write_text('{"vocab_size": 50, "dtype": "uint16", "eod_id": 0}')
    cfg = DataConfig(source="bin", path=str(folder), pack_documents=True, eod_token=7, seq_len=8)
    with pytest.raises(ValueError, match=r"eod_token=7 but .*meta.json says eod_id=0"):
        TokenData(cfg, vocab_size=64)
    assert TokenData(dataclasses.replace(cfg, eod_token=0), vocab_size=64).eod == 0


def test_checkpoint_is_written_before_the_final_evaluation(tmp_path, monkeypatch):
    """An evaluation that fails after the last step used to leave no checkpoint of the finished run."""
    config = train_config(steps=3, run=dict(ckpt_dir=str(tmp_path / "ckpt"), eval_batches=1))

    def failing_eval(self, params):
        raise RuntimeError("eval failed")

    monkeypatch.setattr(Trainer, "evaluate", failing_eval)
    with pytest.raises(RuntimeError, match="eval failed"):
        Trainer(config, devices=jax.devices()[:1], log=lambda *a: None).fit()
    manager = Trainer(config, devices=jax.devices()[:1], log=lambda *a: None).checkpoint_manager()
    assert manager.latest_step() == 3
    manager.close()
    monkeypatch.undo()
    resumed = Trainer(replace(config, "run", eval_batches=0), devices=jax.devices()[:1], log=lambda *a: None).fit()
    assert resumed["losses"] == {}  # nothing left to train: the finished run was saved


def test_end_of_document_text_inside_a_document_is_text(tmp_path):
    """lasp-tokenize: a document that mentions "<|endoftext|>" got a false document end there."""
    from models.tokenizer import EOD_TOKEN, tokenize

    (tmp_path / "in").mkdir()
    docs = [f"document {i} says {EOD_TOKEN} in its text" if i % 2 else f"plain document {i}" for i in range(6)]
    (tmp_path / "in" / "a.txt").write_text("\n\n".join(docs))
    meta = tokenize(
        [str(tmp_path / "in")],
        str(tmp_path / "out"),
        vocab_size=300,
        val_fraction=0.3,
        workers=1,
        doc_separator="\n\n",
        progress=False,
    )
    ids = np.concatenate([np.fromfile(tmp_path / "out" / f"{s}.bin", np.uint16) for s in ("train", "val")])
    assert meta["train_documents"] + meta["val_documents"] == len(docs)
    assert int((ids == meta["eod_id"]).sum()) == len(docs)
