"""Packed samples are deterministic, cover the split, respect blend weights; the loader is layout-free.

Every token in these datasets is unique (dataset k holds ids ``k*100_000 + position``), so a sample
tells which dataset, document and position it came from.
"""

import math

import numpy as np
import pytest

from megatron_lite.data.blend import blend_schedule
from megatron_lite.data.gpt_dataset import (
    SPLITS,
    GPTDataset,
    NoHeldOutSamplesError,
    PretrainingLoader,
    held_out_warnings,
    split_documents,
)
from megatron_lite.data.indexed import IndexedDatasetBuilder
from megatron_lite.errors import UserError

SEQ = 16


def _make(path, n_docs=40, seed=0, base=0, max_len=90):
    """A dataset of ``n_docs`` documents of random length (some empty) with unique token ids."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, max_len, n_docs)
    docs, next_id = [], base
    with IndexedDatasetBuilder(path, np.int32) as builder:
        for size in sizes:
            doc = np.arange(next_id, next_id + size)
            builder.add_document(doc)
            docs.append(doc)
            next_id += size
    return str(path), docs


@pytest.fixture
def one(tmp_path):
    return _make(tmp_path / "a")


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
    other = _make(tmp_path / "b", seed=1, base=100_000)[0]
    for split in SPLITS:
        alone = GPTDataset([one[0]], None, SEQ, seed=0, split=split, valid_fraction=0.2)
        first = GPTDataset([one[0], other], [1.0, 0.0], SEQ, seed=0, split=split, valid_fraction=0.2)
        second = GPTDataset([other, one[0]], [0.0, 3.0], SEQ, seed=0, split=split, valid_fraction=0.2)
        for i in range(2 * alone.samples_per_epoch[0]):
            assert np.array_equal(first[i], alone[i]) and np.array_equal(second[i], alone[i])


def _blend(tmp_path, weights, n_sets=3):
    prefixes = [_make(tmp_path / f"d{k}", seed=k, base=k * 100_000)[0] for k in range(n_sets)]
    return GPTDataset(prefixes, weights, SEQ, seed=0)


@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [1, 2, 3], [1, math.sqrt(2), math.pi], [0.7, 0.0, 0.3]])
def test_blend_tracks_weights_in_every_prefix(tmp_path, weights):
    ds = _blend(tmp_path, weights)
    w = np.array(weights, dtype=float) / sum(weights)
    counts = np.zeros(3)
    for n in range(1, 1501):
        counts[int(ds[n - 1][0]) // 100_000] += 1
        assert np.abs(counts - w * n).max() <= 1.0, (n, counts, w * n)


def test_blend_without_weights_follows_tokens(tmp_path):
    ds = _blend(tmp_path, None)
    assert ds.weights == [n / sum(ds.num_tokens) for n in ds.num_tokens]  # one correctly rounded division each


def test_blend_schedule_is_periodic_with_exact_quotas():
    slot_dataset, slot_local, quota = blend_schedule([0.5, 0.25, 0.25])
    # Quotas p = [2, 1, 1] of q = 4; due times (4c + 3) / p among the datasets behind their share:
    # n=1: all behind, due [1.5, 3, 3] -> 0; n=2: 1 and 2 behind, tie -> 1; n=3: due [3.5, -, 3] -> 2.
    assert quota.tolist() == [2, 1, 1] and slot_dataset.tolist() == [0, 1, 2, 0]
    assert slot_local.tolist() == [0, 0, 0, 1]


def test_blend_stays_within_one_sample_with_many_skewed_weights():
    # Megatron's "furthest below weight * n" rule drifts to 1.05 samples on these weights.
    weights = np.array([0.0842972, 0.30084866, 0.55435025, 0.02409645, 0.00279793, 0.03360951])
    slot_dataset, _, quota = blend_schedule(weights)
    q = slot_dataset.size  # 65536: these weights are not small fractions, so they are rounded to p / q
    assert np.abs(quota / q - weights / weights.sum()).max() <= 0.5 / q
    n = np.arange(1, q + 1)[:, None]
    counts = np.cumsum(slot_dataset[:, None] == np.arange(weights.size), axis=0)
    assert np.abs(counts - n * quota / q).max() < 1.0
    assert (counts[-1] == quota).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"seq_len": 0}, "seq_len"),
        ({"weights": [1.0, 2.0]}, "2 blend weights given for 1 datasets"),
        ({"weights": [-1.0]}, r"data.weights\) must be finite and non-negative, got \[-1.0\]; give data.weights"),
        ({"weights": [float("nan")]}, "non-negative"),
        ({"weights": [0.0]}, "must not all be zero.*give at least one dataset a positive weight"),
        ({"seq_len": 10_000}, "fewer than seq_len"),
        ({"split": "test"}, "split must be one of"),
        ({"split": "valid", "valid_fraction": 0.0}, "fewer than seq_len"),
    ],
)
def test_bad_arguments_are_user_errors(one, kwargs, match):
    args = {"prefixes": [one[0]], "weights": None, "seq_len": SEQ, "seed": 0, **kwargs}
    with pytest.raises(UserError, match=match):
        GPTDataset(**args)


def test_a_weight_too_small_to_sample_is_refused(one, tmp_path):
    """A share under 1/65536 rounds to a quota of 0: the dataset would silently never be sampled."""
    other = _make(tmp_path / "b", seed=1)[0]
    with pytest.raises(UserError, match=r"data.weights gives dataset .*b a weight > 0.*never be sampled"):
        GPTDataset([one[0], other], [1.0, 1e-7], SEQ, seed=0)
    GPTDataset([one[0], other], [1.0, 0.0], SEQ, seed=0)  # 0 leaves it out on purpose
    ds = GPTDataset([one[0], other], [1.0, 1e-4], SEQ, seed=0)  # small but above 1/65536: sampled
    assert any(ds.locate(i)[0] == 1 for i in range(65536))


def test_a_weight_below_a_billionth_is_refused_with_the_share_that_would_be_sampled(one, tmp_path):
    """1e-10 is within 1e-9 of 0/1, so the blend period is 1 sample: the fix names 1/65536, not 1/1."""
    other = _make(tmp_path / "b", seed=1)[0]
    with pytest.raises(UserError) as err:
        GPTDataset([one[0], other], [1.0, 1e-10], SEQ, seed=0)
    assert "share of the blend (1e-10) rounds to no sample in each period of 1 samples" in str(err.value)
    assert str(err.value).endswith(
        "give it at least 1/65536 of the total weight, or weight 0 to leave it out on purpose"
    )


def test_weights_whose_sum_overflows_are_refused(one, tmp_path):
    """Each share would be w / inf = 0: the blend would fail on a NaN instead of naming the weights."""
    other = _make(tmp_path / "b", seed=1)[0]
    with pytest.raises(UserError, match=r"weights \(data.weights\) \[1e\+308, 1e\+308\] add up to more than a float"):
        GPTDataset([one[0], other], [1e308, 1e308], SEQ, seed=0)
    assert GPTDataset([one[0], other], [1e307, 1e307], SEQ, seed=0).weights == [0.5, 0.5]


def _tiny(path, sizes):
    with IndexedDatasetBuilder(path, np.uint16) as builder:
        for size in sizes:
            builder.add_document(np.arange(size))
    return str(path)


def test_a_dataset_of_weight_0_may_be_smaller_than_one_sample(one, tmp_path):
    """Weight 0 leaves a dataset out (as the too-small-weight error advises): it is never sampled, so its
    size does not matter; with a weight > 0 it is refused as before."""
    tiny = _tiny(tmp_path / "tiny", [3, 0, 2])
    for split in ("train", "valid"):
        ds = GPTDataset([one[0], tiny], [1.0, 0.0], SEQ, seed=0, split=split, valid_fraction=0.1)
        alone = GPTDataset([one[0]], None, SEQ, seed=0, split=split, valid_fraction=0.1)
        assert ds.samples_per_epoch[1] == 0
        assert all(np.array_equal(ds[i], alone[i]) for i in range(3 * alone.samples_per_epoch[0]))
    with pytest.raises(UserError, match=r"tiny has 5 tokens in 2 documents of its 'train' split"):
        GPTDataset([one[0], tiny], [1.0, 1e-3], SEQ, seed=0, valid_fraction=0.1)


def test_a_blends_dataset_without_a_held_out_sample_is_left_out_of_the_evaluation(one, tmp_path):
    """As Megatron builds each dataset's valid split and blends those that exist: a dataset whose held-out
    documents are shorter than one sample is named in ``left_out`` and the valid blend is the others'."""
    short = _tiny(tmp_path / "short", [5] * 10)  # 45 tokens to train on, 5 held out: less than SEQ + 1
    alone = GPTDataset([one[0]], None, SEQ, seed=0, split="valid", valid_fraction=0.1)
    for weights in (None, [1.0, 3.0]):
        ds = GPTDataset([one[0], short], weights, SEQ, seed=0, split="valid", valid_fraction=0.1)
        assert ds.weights == [1.0, 0.0] and ds.left_out == [
            f"dataset {short} has 5 tokens in 1 documents of its 'valid' split (valid_fraction=0.1), fewer than "
            "seq_len+1 = 17; hold out more of it (a larger data.valid_fraction) or use a shorter model.seq_len"
        ]
        assert all(np.array_equal(ds[i], alone[i]) for i in range(2 * alone.samples_per_epoch[0]))
        train = GPTDataset([one[0], short], weights, SEQ, seed=0, valid_fraction=0.1)
        assert train.left_out == [] and train.weights[1] > 0
    with pytest.raises(UserError, match=r"short has 5 tokens in 1 documents of its 'train' split"):
        GPTDataset([one[0], short], None, SEQ, seed=0, valid_fraction=0.99)  # train still needs a sample


def test_a_valid_split_without_any_sample_names_every_dataset(tmp_path):
    short, single = _tiny(tmp_path / "short", [5] * 10), _tiny(tmp_path / "single", [400])
    with pytest.raises(NoHeldOutSamplesError) as err:
        GPTDataset([short, single], [1.0, 1.0], SEQ, seed=0, split="valid", valid_fraction=0.1)
    assert str(err.value).startswith(
        f"no dataset of data.path serves a held-out sample: dataset {short} has 5 tokens in 1 documents of its "
        f"'valid' split (valid_fraction=0.1), fewer than seq_len+1 = 17; hold out more of it (a larger "
        f"data.valid_fraction) or use a shorter model.seq_len; dataset {single} holds a single document, so it "
        "has no held-out split (split the text into documents, e.g. JSONL lines)"
    )


def test_the_run_evaluates_on_the_datasets_with_a_held_out_sample(one, tmp_path, tok):
    from megatron_lite.config import Config
    from megatron_lite.training.build import build_data

    single = _tiny(tmp_path / "single", [40])
    cfg = Config()
    cfg.data.path, cfg.data.tokenizer, cfg.data.valid_fraction = [one[0], single], str(tok.path), 0.1
    cfg.model.seq_len = SEQ
    for weights in ([1.0, 0.0], [1.0, 1.0]):  # left out by its weight, or for want of a held-out sample
        cfg.data.weights = weights
        data = build_data(cfg, cfg.data.path, tok.path)
        assert data.valid.weights == [1.0, 0.0]
        assert data.warnings == (
            []
            if weights[1] == 0
            else [
                f"{data.valid.left_out[0]}; the evaluation blends "
                "the other datasets of data.path, by their weights, without it"
            ]
        )
    cfg.data.path, cfg.data.weights = [single], None
    data = build_data(cfg, cfg.data.path, tok.path)
    assert data.valid is None and data.warnings == [
        f"no dataset of data.path serves a held-out sample: dataset {single} holds a single document, so it has "
        "no held-out split (split the text into documents, e.g. JSONL lines): training without evaluation "
        "(or set data.valid_fraction=0 to say so)"
    ]


def test_a_document_held_out_only_because_one_must_be_is_named_with_its_share(one, tmp_path, tok):
    """5 documents at valid_fraction 0.05 would hold out none; one is held out anyway: 20% of the tokens."""
    from megatron_lite.config import Config
    from megatron_lite.training.build import build_data

    few = _tiny(tmp_path / "few", [100] * 5)
    cfg = Config()
    cfg.data.path, cfg.data.tokenizer, cfg.data.valid_fraction = [one[0], few], str(tok.path), 0.05
    cfg.model.seq_len = SEQ
    data = build_data(cfg, cfg.data.path, tok.path)
    assert (
        data.warnings
        == held_out_warnings(data.valid, 0.05)
        == [
            f"dataset {few} has 5 documents, too few for data.valid_fraction=0.05 to hold out any, so one is held out "
            "for evaluation: 20.0% of its tokens are never trained on (split its text into more documents, e.g. JSONL "
            "lines, to hold out less)"
        ]
    )  # not the 40 documents of `one`, of which round(40 * 0.05) = 2 are held out as asked
    unsampled = GPTDataset([one[0], few], [1.0, 0.0], SEQ, seed=0, split="valid", valid_fraction=0.05)
    assert held_out_warnings(unsampled, 0.05) == []


def test_one_dataset_listed_twice_is_refused_naming_both_spellings(one, tmp_path):
    """Two entries of one dataset (here through links) would serve each sample twice in a row."""
    alias = tmp_path / "alias"
    for ext in (".bin", ".idx"):
        (tmp_path / f"alias{ext}").symlink_to(one[0] + ext)
    with pytest.raises(UserError) as err:
        GPTDataset([one[0], str(alias)], None, SEQ, seed=0)
    assert str(err.value) == (
        f"data.path lists the dataset {one[0]} twice (also as {alias}): both entries would serve the same samples "
        "in the same order, so the run would see each sample twice in a row; list it once and give it more weight "
        "in data.weights"
    )


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


def test_one_dataset_listed_twice_is_refused(one, tmp_path):
    """Both entries would serve the same samples in the same order: every sample twice in a row."""
    alias = tmp_path / "alias"
    alias.mkdir()
    for ext in (".bin", ".idx"):
        (alias / ("a" + ext)).symlink_to(one[0] + ext)
    for prefixes in ([one[0], one[0]], [one[0], str(alias / "a")]):
        with pytest.raises(UserError, match="data.weights"):
            GPTDataset(prefixes, [1.0, 3.0], SEQ, seed=0)
    other = _make(tmp_path / "b", seed=1)[0]
    GPTDataset([one[0], other], [1.0, 3.0], SEQ, seed=0)


@pytest.mark.parametrize("weights", [None, [1.0, 1.0], [0.9, 0.1], [1.0, 0.0], [1, math.sqrt(2)]])
def test_distinct_samples_end_where_a_dataset_first_repeats(one, tmp_path, weights):
    """An evaluation longer than this repeats samples: in a blend the dataset that runs out first for
    its share sets it, long before the sum of the epochs (here about twice ``small``'s, at 1:1)."""
    from megatron_lite.config import Config
    from megatron_lite.training.preflight import eval_warning

    small = _make(tmp_path / "small", n_docs=4, seed=5, base=100_000, max_len=30)[0]
    ds = GPTDataset([one[0], small], weights, SEQ, seed=0)
    first_repeat = next(i for i in range(10**6) if ds.locate(i)[1] >= ds.samples_per_epoch[ds.locate(i)[0]])
    assert ds.distinct_samples == first_repeat
    if weights == [1.0, 1.0]:
        # slots alternate one, small: small's sample S is global sample 2 S + 1
        assert first_repeat == 2 * ds.samples_per_epoch[1] + 1 < sum(ds.samples_per_epoch)
        cfg = Config()
        cfg.train.global_batch_size, cfg.train.eval_iters = 1, first_repeat + 1
        assert f"serves {first_repeat} before it repeats one" in eval_warning(cfg, ds)
        cfg.train.eval_iters = first_repeat
        assert eval_warning(cfg, ds) is None
