"""Data: column schemas, normalisation, built-in data sets, user tables, seeded splits and masks.

Modules (one idea each):

- :mod:`ppl_vae.data.schema`: per-column likelihoods and their inference rules (the HH-VAEM reference code's);
- :mod:`ppl_vae.data.transforms`: the invertible :class:`Normaliser` (original <-> normalised domain);
- :mod:`ppl_vae.data.dataset`: :class:`TableDataset` and the validated user entry points
  :func:`from_dataframe` / :func:`from_csv`;
- :mod:`ppl_vae.data.registry`: the built-in data sets (:data:`DATASETS`, :func:`load_dataset`), read from the
  vendored files in ``ppl_vae/data/files`` (provenance in ``files/PROVENANCE.md``);
- :mod:`ppl_vae.data.tables`: :class:`TensorTable`, :class:`Split`, train-time missingness and the minibatch loader
  (Peis et al. 2022 §4 protocol).

Typical use::

    ds = load_dataset("boston")
    split = ds.splits(n_splits=10, seed=0)[0]
    batches = split.train.loader(batch_size=128, seed=0)      # train-time missingness on
    test_batch = split.test_input()                          # ~50% of x hidden, y unobserved
"""
from ppl_vae.data.dataset import TableDataset, from_csv, from_dataframe
from ppl_vae.data.registry import DATASETS, list_datasets, load_dataset
from ppl_vae.data.schema import LIKELIHOODS, Column, TableSchema, infer_schema
from ppl_vae.data.tables import Split, TensorTable, sample_train_mask
from ppl_vae.data.transforms import Normaliser

__all__ = ["LIKELIHOODS", "Column", "TableSchema", "infer_schema", "Normaliser", "TableDataset", "TensorTable",
           "Split", "load_dataset", "list_datasets", "from_dataframe", "from_csv", "sample_train_mask", "DATASETS"]
