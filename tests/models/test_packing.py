"""Packed documents: the loss and its gradients over a packed row equal each document run alone.

Rows hold documents separated by the end-of-document token (0 here). ``lm_loss(..., eod_token=0)``
gives the token mixers segment ids and drops the target after each EOD; the oracle runs every
document as its own row (padded at the end, padding and the EOD's target not counted) without any
segment ids. Boundaries sit mid-row, exactly at the sp=2 shard edge, and a row starts with an EOD
(a one-token document).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.dataset import DataConfig, TokenData, pack_text_documents
from models.layers import LaspContext
from models.model import LanguageModel, document_ids, lm_loss
from models.sharding import build_mesh
from models.train import Trainer, check_config
from tests.helpers import rel_err
from tests.models.common import large_weights, small_hybrid, small_model, train_config

EOD = 0
GRAD_TOL = 3e-4  # norm-wise, per gradient leaf (see the test)
T = 16
# content lengths of the documents in each row (each followed by an EOD; the last one is cut by the row end)
ROWS = [
    [2, 4, 1, 20],  # EODs at 2, 7 (so a document starts at 8, the sp=2 shard edge) and 9
    [-1, 3, 0, 5, 20],  # starts with an EOD (the tail of a previous document), an empty document
]


def _packed_rows(rng):
    """inputs, targets ``[2, T]`` and the (row, start, stop) of every document piece."""
    inputs, targets, pieces = [], [], []
    for r, lengths in enumerate(ROWS):
        stream = []
        for n in lengths:
            stream += list(rng.integers(1, 256, max(n, 0))) + [EOD]
        stream = np.asarray(stream[: T + 1])
        inputs.append(stream[:T])
        targets.append(stream[1:])
        start = 0
        for t in range(T):
            if stream[t] == EOD or t == T - 1:
                pieces.append((r, start, t + 1))
                start = t + 1
    return np.stack(inputs).astype(np.int32), np.stack(targets).astype(np.int32), pieces


def _documents_alone(inputs, targets, pieces, rng):
    """Every piece as its own row at position 0, random padding after it (not counted)."""
    x = rng.integers(1, 256, (len(pieces), T)).astype(np.int32)
    y = np.full((len(pieces), T), -1, np.int32)
    for i, (r, a, b) in enumerate(pieces):
        x[i, : b - a] = inputs[r, a:b]
        y[i, : b - a] = np.where(inputs[r, a:b] == EOD, -1, targets[r, a:b])  # no target after an EOD
    return x, y


def _loss_sum(model_def, params, tokens, targets, ctx, eod):
    loss, count = lm_loss(nnx.merge(model_def, params), tokens, targets, ctx, eod_token=eod)
    return loss * count, count


# delta-rule models run the op's token scan: the chunked XLA path's gradient compiles ~10x slower on
# the CPU, and what is checked here (documents through the convolution, the sharded op, the loss) is the same
IMPL = {"gdn": "reference", "gla": "reference"}
PACKED_CASES = [
    ("tnl", False, 1, "allgather"),
    ("linear_transformer", False, 1, "allgather"),
    ("linear_llama3", False, 1, "allgather"),
    ("tnl", False, 2, "allgather"),
    ("tnl", True, 1, "allgather"),
    ("linear_llama3", True, 2, "allgather"),
    ("tnl", True, 4, "ring"),
    ("gdn", True, 2, "allgather"),  # short convolutions and the delta rule across a boundary at the shard edge
    ("gla", False, 2, "allgather"),  # per-channel decays (GLA): the shard decay resets at a document boundary
]


@pytest.mark.parametrize(
    "family, hybrid, sp, softmax_strategy",
    PACKED_CASES,
    ids=[
        "tnl-lrpe",
        "linear_transformer",
        "linear_llama3",
        "tnl-lrpe-sp2",
        "tnl-hybrid",
        "linear_llama3-hybrid-sp2-allgather",
        "tnl-hybrid-sp4-ring",
        "gdn-hybrid-sp2-allgather",
        "gla-sp2",
    ],
)
def test_packed_loss_and_grads_equal_documents_alone(rng, family, hybrid, sp, softmax_strategy):
    """Hybrids too: their softmax layers mask documents (segment_ids) under every softmax strategy."""
    config = small_hybrid(family) if hybrid else small_model(family)
    model = large_weights(LanguageModel(config, rngs=nnx.Rngs(int(rng.integers(1 << 30)))))
    model_def, params = nnx.split(model)
    inputs, targets, pieces = _packed_rows(rng)
    alone_x, alone_y = _documents_alone(inputs, targets, pieces, rng)
    ctx = LaspContext(impl=IMPL.get(family, "auto"))
    if sp > 1:
        mesh = build_mesh(1, sp, jax.devices()[:sp])
        ctx = dataclasses.replace(ctx, mesh=mesh, batch_axis="dp", softmax_strategy=softmax_strategy)

    grad = jax.jit(jax.value_and_grad(_loss_sum, argnums=1, has_aux=True), static_argnums=(0, 4, 5))
    (got, got_count), got_grads = grad(model_def, params, jnp.asarray(inputs), jnp.asarray(targets), ctx, EOD)
    (want, want_count), want_grads = grad(model_def, params, jnp.asarray(alone_x), jnp.asarray(alone_y), ctx, None)
    assert int(got_count) == int(want_count) == int(np.sum(inputs != EOD))
    np.testing.assert_allclose(float(got), float(want), rtol=2e-5)
    for path, a, b in zip(
        jax.tree_util.tree_leaves_with_path(got_grads), jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)
    ):
        # float32 sums in a different order (rows of 16 vs many short rows), amplified by the ×4 weights. An
        # elementwise bound (GRAD_TOL of the leaf's largest entry) had a heavy tail over seeds: 15 seeds per family
        # at most 3.2e-5 (median ~3e-6), CI seeds 1.2e-4 (linear_llama3, no decay: 4 elements of one column); the
        # norm-wise error of the leaf does not hang on one cancelling entry. A state leaking
        # across a boundary moves the gradients far more (asserted below)
        err = rel_err(a, b)
        assert err <= GRAD_TOL, (str(path[0]), err)
    # the check can fail: without segment ids the packed row's gradients differ from the documents alone
    _, crossing_grads = grad(
        model_def, params, jnp.asarray(inputs), jnp.asarray(np.where(inputs == EOD, -1, targets)), ctx, None
    )
    # the gradients carry the margin: the loss alone can move little (gdn-hybrid, seed 310742026: 7.4e-5
    # relative, where this test asked 5× its 2e-5 tolerance and failed in a CI-like run)
    moved = [rel_err(a, b) for a, b in zip(jax.tree.leaves(crossing_grads), jax.tree.leaves(want_grads))]
    assert max(moved) > 10 * GRAD_TOL, moved


def test_document_ids():
    tokens = jnp.asarray([[5, 0, 7, 7, 0, 0, 3], [0, 1, 2, 3, 4, 5, 6]])
    np.testing.assert_array_equal(document_ids(tokens, 0), [[0, 0, 1, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]])


def test_packed_text_and_bin_data(tmp_path):
    stream = pack_text_documents([b"ab\n\ncd", b"\n\nxyz\n\n"], b"\n\n", EOD)
    np.testing.assert_array_equal(stream, list(b"ab") + [0] + list(b"cd") + [0] + list(b"xyz") + [0])
    data = TokenData(DataConfig(source="text", pack_documents=True, batch_size=2, seq_len=64), 256)
    inputs, targets = data.batch("train", 0)
    assert (inputs == EOD).any() and np.all(inputs[..., 1:] == targets[..., :-1])
    assert data.tokens[-1] == EOD and np.sum(data.tokens == EOD) > 20  # the corpus's paragraphs
    path = tmp_path / "tokens.bin"
    np.asarray([3, 4, 9, 5, 9] * 40, np.uint16).tofile(path)
    cfg = DataConfig(source="bin", path=str(path), pack_documents=True, eod_token=9, seq_len=8, batch_size=2)
    assert cfg.eod == 9 and TokenData(cfg, 16).batch("train", 1)[0].shape == (1, 2, 8)
    with pytest.raises(ValueError, match="eod_token=9 must be < vocab_size=8"):
        TokenData(cfg, 8)
    with pytest.raises(ValueError, match="needs eod_token"):
        DataConfig(source="bin", path=str(path), pack_documents=True)
    with pytest.raises(ValueError, match="pack_documents needs source='text' or 'bin'"):
        DataConfig(source="synthetic", pack_documents=True)
    assert DataConfig(source="text", eod_token=3).eod is None  # not packing: no EOD handling
    hybrid = train_config("tnl", model=small_hybrid("tnl"), data=dict(pack_documents=True))
    assert check_config(hybrid, 1) == (1, 1)  # hybrids train on packed rows (document masks in softmax layers)


@pytest.mark.parametrize("hybrid", [False, True], ids=["tnl", "tnl-hybrid"])
def test_packed_training_sp2_equals_one_device(hybrid):
    model = small_hybrid("tnl") if hybrid else None
    data = dict(pack_documents=True, seq_len=64)
    config = train_config("tnl", steps=4, sp=2, model=model, data=data)
    runs = [
        Trainer(c, devices=jax.devices()[:n], log=lambda *a: None).fit()["losses"]
        for c, n in ((config, 2), (train_config("tnl", steps=4, model=model, data=data), 1))
    ]
    np.testing.assert_allclose([runs[0][s] for s in range(1, 5)], [runs[1][s] for s in range(1, 5)], rtol=0, atol=5e-5)
