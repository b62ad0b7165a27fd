"""Datasets: reading and validating records (:mod:`.formats`), tokenizing with loss masks (:mod:`.prepare`)."""

from .formats import RawDataset, load_raw_dataset
from .prepare import DataStats, tokenize_dataset

__all__ = ["DataStats", "RawDataset", "load_raw_dataset", "tokenize_dataset"]
