"""Datasets: reading and validating records (:mod:`.formats`), tokenizing with loss masks (:mod:`.prepare`),
packing examples into rows (:mod:`.packing`)."""

from .formats import RawDataset, load_raw_dataset
from .packing import PackedCollator, PackingStats, check_packing_support, pack_dataset, packing_problem
from .prepare import DataStats, tokenize_dataset

__all__ = [
    "DataStats",
    "PackedCollator",
    "PackingStats",
    "RawDataset",
    "check_packing_support",
    "load_raw_dataset",
    "pack_dataset",
    "packing_problem",
    "tokenize_dataset",
]
