"""Locked data, tokenizers and token caches (docs/architecture.md, "Scoring contract")."""

from prism_ray.data.dataset import SPLITS, LockedDataset, open_dataset
from prism_ray.data.preparation import PrepareSummary, SplitRule, prepare
from prism_ray.data.token_cache import TokenStream, build_token_cache, is_cached, load_token_stream
from prism_ray.data.tokenizers import TOKENIZER_NAMES, Tokenizer, get_tokenizer

__all__ = [
    "SPLITS", "TOKENIZER_NAMES", "LockedDataset", "PrepareSummary", "SplitRule", "TokenStream", "Tokenizer",
    "build_token_cache", "get_tokenizer", "is_cached", "load_token_stream", "open_dataset", "prepare",
]
