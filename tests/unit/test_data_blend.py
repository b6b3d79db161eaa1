"""Blends: samples follow the weights in every prefix, small and odd weights are refused or left out
with a reason, each dataset's held-out part joins the evaluation's blend when it has a sample."""

import math

import numpy as np
import pytest
from unique_tokens import SEQ, make_dataset

from megatron_lite.data.blend import blend_schedule
from megatron_lite.data.gpt_dataset import GPTDataset, NoHeldOutSamplesError, held_out_warnings
from megatron_lite.data.indexed import IndexedDatasetBuilder
from megatron_lite.errors import UserError


def _blend(tmp_path, weights, n_sets=3):
    prefixes = [make_dataset(tmp_path / f"d{k}", seed=k, base=k * 100_000)[0] for k in range(n_sets)]
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
    other = make_dataset(tmp_path / "b", seed=1)[0]
    with pytest.raises(UserError, match=r"data.weights gives dataset .*b a weight > 0.*never be sampled"):
        GPTDataset([one[0], other], [1.0, 1e-7], SEQ, seed=0)
    GPTDataset([one[0], other], [1.0, 0.0], SEQ, seed=0)  # 0 leaves it out on purpose
    ds = GPTDataset([one[0], other], [1.0, 1e-4], SEQ, seed=0)  # small but above 1/65536: sampled
    assert any(ds.locate(i)[0] == 1 for i in range(65536))


def test_a_weight_below_a_billionth_is_refused_with_the_share_that_would_be_sampled(one, tmp_path):
    """1e-10 is within 1e-9 of 0/1, so the blend period is 1 sample: the fix names 1/65536, not 1/1."""
    other = make_dataset(tmp_path / "b", seed=1)[0]
    with pytest.raises(UserError) as err:
        GPTDataset([one[0], other], [1.0, 1e-10], SEQ, seed=0)
    assert "share of the blend (1e-10) rounds to no sample in each period of 1 samples" in str(err.value)
    assert str(err.value).endswith(
        "give it at least 1/65536 of the total weight, or weight 0 to leave it out on purpose"
    )


def test_weights_whose_sum_overflows_are_refused(one, tmp_path):
    """Each share would be w / inf = 0: the blend would fail on a NaN instead of naming the weights."""
    other = make_dataset(tmp_path / "b", seed=1)[0]
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


def test_one_dataset_listed_twice_is_refused(one, tmp_path):
    """Both entries would serve the same samples in the same order: every sample twice in a row."""
    alias = tmp_path / "alias"
    alias.mkdir()
    for ext in (".bin", ".idx"):
        (alias / ("a" + ext)).symlink_to(one[0] + ext)
    for prefixes in ([one[0], one[0]], [one[0], str(alias / "a")]):
        with pytest.raises(UserError, match="data.weights"):
            GPTDataset(prefixes, [1.0, 3.0], SEQ, seed=0)
    other = make_dataset(tmp_path / "b", seed=1)[0]
    GPTDataset([one[0], other], [1.0, 3.0], SEQ, seed=0)


@pytest.mark.parametrize("weights", [None, [1.0, 1.0], [0.9, 0.1], [1.0, 0.0], [1, math.sqrt(2)]])
def test_distinct_samples_end_where_a_dataset_first_repeats(one, tmp_path, weights):
    """An evaluation longer than this repeats samples: in a blend the dataset that runs out first for
    its share sets it, long before the sum of the epochs (here about twice ``small``'s, at 1:1)."""
    from megatron_lite.config import Config
    from megatron_lite.training.preflight import eval_warning, repeat_warning

    small = make_dataset(tmp_path / "small", n_docs=4, seed=5, base=100_000, max_len=30)[0]
    ds = GPTDataset([one[0], small], weights, SEQ, seed=0)
    first_repeat = next(i for i in range(10**6) if ds.locate(i)[1] >= ds.samples_per_epoch[ds.locate(i)[0]])
    assert ds.distinct_samples == first_repeat
    assert ds.first_repeat == (first_repeat, ds.prefixes[ds.locate(first_repeat)[0]])
    if weights == [1.0, 1.0]:
        # slots alternate one, small: small's sample S is global sample 2 S + 1
        assert first_repeat == 2 * ds.samples_per_epoch[1] + 1 < sum(ds.samples_per_epoch)
        cfg = Config()
        cfg.train.global_batch_size, cfg.train.eval_iters = 1, first_repeat + 1
        assert f"serves {first_repeat} before it repeats one" in eval_warning(cfg, ds)
        cfg.train.eval_iters = first_repeat
        assert eval_warning(cfg, ds) is None
        cfg.train.steps = first_repeat + 1  # one sample of small's second epoch: small is named
        assert f"reads dataset {small} (the first of data.path to run out" in repeat_warning(cfg, ds)
        cfg.train.steps = first_repeat
        assert repeat_warning(cfg, ds) is None
