"""Packed samples are deterministic and cover the split; the loader is layout-free (blends:
test_data_blend.py). Every token is unique (``unique_tokens``): a sample tells where it came from."""

import numpy as np
import pytest
from unique_tokens import SEQ, make_dataset

from megatron_lite.data.gpt_dataset import (
    SPLITS,
    GPTDataset,
    PretrainingLoader,
    split_documents,
)
from megatron_lite.errors import UserError


def _tokens_of(docs, ids):
    return np.concatenate([docs[i] for i in ids]) if len(ids) else np.zeros(0, np.int64)


def test_samples_have_seq_len_plus_one_tokens(one):
    ds = GPTDataset([one[0]], None, SEQ, seed=1)
    for i in [0, 1, 7, ds.samples_per_epoch[0], 10**9]:
        sample = ds[i]
        assert sample.dtype == np.int64 and sample.shape == (SEQ + 1,)


def test_same_seed_same_samples_other_seed_differs(one):
    a = GPTDataset([one[0]], None, SEQ, seed=1)
    b = GPTDataset([one[0]], None, SEQ, seed=1)
    c = GPTDataset([one[0]], None, SEQ, seed=2)
    idx = [*range(30), 5000, 10**12]
    assert all(np.array_equal(a[i], b[i]) for i in idx)
    assert not all(np.array_equal(a[i], c[i]) for i in idx)


def test_the_valid_split_serves_the_same_samples_for_every_seed(one, tmp_path):
    """train.seed orders the training samples only: evaluations of runs with other seeds read the same
    held-out samples, and share one cached index of them (its key holds the seed that built it)."""
    cache = tmp_path / "index"
    train, valid = [], []
    for seed in (1, 2):
        kw = {"valid_fraction": 0.2, "index_cache": cache}
        train.append(GPTDataset([one[0]], None, SEQ, seed=seed, split="train", **kw))
        valid.append(GPTDataset([one[0]], None, SEQ, seed=seed, split="valid", **kw))
    spe = valid[0].samples_per_epoch[0]
    assert spe > 1 and all(np.array_equal(valid[0][i], valid[1][i]) for i in range(3 * spe))
    assert not all(np.array_equal(train[0][i], train[1][i]) for i in range(30))
    assert len(list(cache.glob("valid-e*.json"))) == 3  # epochs 0, 1, 2, built once for both seeds
    assert len(list(cache.glob("train-e0-*.json"))) == 2


def test_epoch_covers_split_tokens_once(one):
    prefix, docs = one
    ds = GPTDataset([prefix], None, SEQ, seed=3)
    spe = ds.samples_per_epoch[0]
    train = _tokens_of(docs, split_documents(np.array([len(d) for d in docs]), "train", 0.01))
    assert ds.num_tokens == [train.size] and spe == (train.size - 1) // SEQ
    for epoch in range(2):
        samples = np.stack([ds[epoch * spe + j] for j in range(spe)])
        inputs = samples[:, :-1].ravel()
        # Every input token is a train token, none repeats, and only the epoch's tail is left out.
        assert np.isin(inputs, train).all()
        assert np.unique(inputs).size == inputs.size == spe * SEQ
        assert train.size - inputs.size <= SEQ


def test_windows_follow_documents_in_order(one):
    prefix, docs = one
    ds = GPTDataset([prefix], None, SEQ, seed=3)
    doc_of = {int(t): i for i, d in enumerate(docs) for t in d}
    for i in range(20):
        sample = ds[i]
        steps = np.diff(sample)
        # Inside a document ids increase by one; a jump is always a move to another document's start.
        for k in np.flatnonzero(steps != 1):
            nxt = int(sample[k + 1])
            assert docs[doc_of[nxt]][0] == nxt


def test_epochs_reshuffle(one):
    ds = GPTDataset([one[0]], None, SEQ, seed=3)
    spe = ds.samples_per_epoch[0]
    first = [ds[j][0] for j in range(spe)]
    second = [ds[spe + j][0] for j in range(spe)]
    assert first != second


def test_train_valid_disjoint(one):
    prefix, docs = one
    sizes = np.array([len(d) for d in docs])
    train_ids, valid_ids = split_documents(sizes, "train", 0.1), split_documents(sizes, "valid", 0.1)
    assert len(valid_ids) == 4 and not set(train_ids) & set(valid_ids)
    assert sorted([*train_ids, *valid_ids]) == list(range(len(docs)))
    assert len(split_documents(sizes, "valid", 0.001)) == 1  # at least one document
    assert len(split_documents(sizes, "train", 0.999)) == 1  # train keeps one: round(40 * 0.999) = 40
    assert len(split_documents(sizes[:1], "valid", 0.5)) == 0  # a single document stays in train
    train = GPTDataset([prefix], None, SEQ, seed=0, split="train", valid_fraction=0.1)
    valid = GPTDataset([prefix], None, SEQ, seed=0, split="valid", valid_fraction=0.1)
    seen_train = np.concatenate([train[i] for i in range(train.samples_per_epoch[0])])
    seen_valid = np.concatenate([valid[i] for i in range(valid.samples_per_epoch[0])])
    assert np.isin(seen_valid, _tokens_of(docs, valid_ids)).all()
    assert not np.isin(seen_train, seen_valid).any()


def test_each_datasets_split_and_order_stay_when_the_blend_changes(one, tmp_path):
    """Which documents are held out, and each dataset's own sample order, depend on that dataset alone:
    not on its place in data.path nor on the weights (a weight of 0 shows one dataset's stream)."""
    other = make_dataset(tmp_path / "b", seed=1, base=100_000)[0]
    for split in SPLITS:
        alone = GPTDataset([one[0]], None, SEQ, seed=0, split=split, valid_fraction=0.2)
        first = GPTDataset([one[0], other], [1.0, 0.0], SEQ, seed=0, split=split, valid_fraction=0.2)
        second = GPTDataset([other, one[0]], [0.0, 3.0], SEQ, seed=0, split=split, valid_fraction=0.2)
        for i in range(2 * alone.samples_per_epoch[0]):
            assert np.array_equal(first[i], alone[i]) and np.array_equal(second[i], alone[i])


def test_missing_dataset_is_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        GPTDataset([str(tmp_path / "nope")], None, SEQ, seed=0)


def _step_union(ds, mb, G, dp, step):  # noqa: N803 - G as in the docs: global batch size
    samples = []
    for rank in range(dp):
        loader = PretrainingLoader(ds, mb, G, dp_rank=rank, dp_size=dp, consumed_samples=step * G)
        batches = loader.next_step()
        assert len(batches) == G // (mb * dp)
        for j, batch in enumerate(batches):
            assert batch.shape == (mb, SEQ + 1) and str(batch.dtype) == "torch.int64"
            for t in range(mb):
                samples.append((j * mb * dp + rank * mb + t, batch[t].numpy()))
    return [s for _, s in sorted(samples, key=lambda x: x[0])]


def test_loader_union_is_the_same_for_every_dp(one):
    ds = GPTDataset([one[0]], None, SEQ, seed=0)
    G, mb = 16, 2
    for step in range(2):
        expected = [ds[i] for i in range(step * G, (step + 1) * G)]
        for dp in (1, 2, 4):
            got = _step_union(ds, mb, G, dp, step)
            assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True)), dp


def test_loader_resume_continues_exactly(one):
    ds = GPTDataset([one[0]], None, SEQ, seed=0)
    a = PretrainingLoader(ds, 2, 8, dp_rank=1, dp_size=2)
    for _ in range(3):
        a.next_step()
    state = a.state_dict()
    assert state == {"consumed_samples": 24}
    b = PretrainingLoader(ds, 2, 8, dp_rank=1, dp_size=2)
    with pytest.raises(UserError, match=r"^consumed_samples in a loader state must be >= 0, got -8$"):
        b.load_state_dict({"consumed_samples": -8})
    b.load_state_dict(state)
    for _ in range(2):
        for x, y in zip(a.next_step(), b.next_step(), strict=True):
            assert x.equal(y)


def test_a_resume_in_another_dp_past_the_end_of_an_epoch_reads_what_the_run_would_have(tmp_path):
    """A dataset of a few samples, read several epochs over: a loader resumed at any step, in any dp,
    serves the samples the uninterrupted one-rank run serves from there."""
    ds = GPTDataset([make_dataset(tmp_path / "few", n_docs=6, seed=3)[0]], None, SEQ, seed=0)
    G, mb, steps = 8, 2, 4
    assert steps * G > 2 * ds.samples_per_epoch[0]  # past the end of the second epoch
    straight = PretrainingLoader(ds, mb, G)
    want = [np.concatenate([b.numpy() for b in straight.next_step()]) for _ in range(steps)]
    for dp in (2, 4):
        for step in range(1, steps):
            got = _step_union(ds, mb, G, dp, step)  # a loader built at consumed_samples = step x G
            assert np.array_equal(np.stack(got), want[step]), (dp, step)


def test_loader_rejects_indivisible_batch(one):
    ds = GPTDataset([one[0]], None, SEQ, seed=0)
    with pytest.raises(UserError, match=r"global_batch_size 10 .* 2 x 4 = 8"):
        PretrainingLoader(ds, 2, 10, dp_size=4)
    with pytest.raises(UserError, match="dp_rank 4"):
        PretrainingLoader(ds, 2, 8, dp_rank=4, dp_size=4)
    with pytest.raises(
        UserError, match=r"micro_batch_size \(0\), global_batch_size \(8\) and dp \(1\) must be positive"
    ):
        PretrainingLoader(ds, 0, 8)
    with pytest.raises(UserError, match=r"^consumed_samples must be >= 0, got -1$"):
        PretrainingLoader(ds, 2, 8, consumed_samples=-1)
