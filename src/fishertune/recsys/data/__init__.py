"""The recommender lab's data layer: readers, a dataset registry, preprocessing, evaluation splits and
a processed-data cache.

Typical use::

    from fishertune.recsys.data import DataConfig, load_split
    split, data_hash = load_split(DataConfig(name="ml-1m", min_rating=4, min_user_interactions=5,
                                             split={"protocol": "held_out_users", "n_valid_users": 600,
                                                    "n_test_users": 600}))
"""

from fishertune.recsys.data.cache import (clean_cache, config_hash, data_files, dataset_stats, file_digest,
                                          load_interactions, load_split, read_raw, split_interactions)
from fishertune.recsys.data.config import ColumnsConfig, DataConfig, SplitConfig
from fishertune.recsys.data.preprocess import EmptyDataError, filter_interactions, reindex
from fishertune.recsys.data.readers import (CrossDomainData, DataFormatError, deduplicate, negatives_matrix,
                                            read_cross_domain, read_movielens_1m, read_movielens_100k,
                                            read_negatives, read_sequences, read_table)
from fishertune.recsys.data.registry import (ChecksumError, DatasetSpec, cdr_domain_interactions,
                                             ensure_dataset, get_dataset, list_datasets, load_cross_domain,
                                             load_dataset, load_negatives, register_dataset, register_file,
                                             verify_dataset)
from fishertune.recsys.data.splits import PROTOCOLS, held_out_users, holdout, leave_one_out, make_split, temporal
from fishertune.recsys.data.types import IdMap, Interactions, Split

__all__ = [
    "IdMap", "Interactions", "Split",
    "DataConfig", "SplitConfig", "ColumnsConfig",
    "load_split", "clean_cache", "dataset_stats", "load_interactions", "read_raw", "split_interactions",
    "config_hash", "data_files", "file_digest",
    "read_movielens_100k", "read_movielens_1m", "read_table", "read_sequences", "read_negatives",
    "negatives_matrix", "read_cross_domain", "CrossDomainData", "deduplicate", "DataFormatError",
    "DatasetSpec", "register_dataset", "register_file", "get_dataset", "list_datasets", "ensure_dataset",
    "load_dataset", "load_cross_domain", "load_negatives", "cdr_domain_interactions", "verify_dataset",
    "ChecksumError",
    "filter_interactions", "reindex", "EmptyDataError",
    "PROTOCOLS", "leave_one_out", "holdout", "temporal", "held_out_users", "make_split",
]
