"""Training data: JSONL rows -> token ids + loss mask (chat, alpaca, completion, text) -> padded or packed
batches. `load_dataset` then `batches_for_epoch` is the whole path a recipe needs."""
from .batching import Batch, batches_for_epoch, epoch_order, pack, pack_rows, pad_batch
from .formats import (
    FORMATS,
    IGNORE_INDEX,
    ROLES,
    Example,
    check_row,
    detect_format,
    format_example,
    load_dataset,
    split_eval,
)
from .readers import DataError, iter_jsonl, read_jsonl, read_jsonl_numbered

__all__ = [
    "Batch", "DataError", "Example", "FORMATS", "IGNORE_INDEX", "ROLES",
    "batches_for_epoch", "check_row", "detect_format", "epoch_order", "format_example", "iter_jsonl",
    "load_dataset", "pack", "pack_rows", "pad_batch", "read_jsonl", "read_jsonl_numbered", "split_eval",
]
