"""Datasets whose every token is unique (dataset k holds ids ``k*100_000 + position``), so a sample
tells which dataset, document and position it came from; shared by the dataset and blend tests."""

import numpy as np

from megatron_lite.data.indexed import IndexedDatasetBuilder

SEQ = 16


def make_dataset(path, n_docs=40, seed=0, base=0, max_len=90):
    """A dataset of ``n_docs`` documents of random length (some empty) with unique token ids:
    (its prefix, its documents' token arrays)."""
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
