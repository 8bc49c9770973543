"""Training data: rows from JSONL, JSON, CSV, Parquet, datasets folders or shards (`readers`, `columnar`),
checked in their shapes (`rows`), tokenized with the chat template's masks (`chat`, `formats`) into SFT
examples, preference pairs (`preference`) or classification examples (`classification`), then padded or
packed into batches (`batching`). `load_dataset` then `batches_for_epoch` is the whole SFT path."""
from .batching import Batch, batches_for_epoch, epoch_order, pack, pack_rows, pad_batch
from .chat import BUILTIN_TEMPLATES, read_chat_template, use_chat_template
from .classification import ClassificationExample, load_classification_dataset
from .formats import (
    FORMATS,
    IGNORE_INDEX,
    KIND,
    ROLES,
    Example,
    check_row,
    detect_format,
    format_example,
    load_dataset,
    split_eval,
)
from .preference import PreferenceExample, format_pair, load_preference_dataset
from .readers import DataError, Row, iter_jsonl, read_jsonl, read_jsonl_numbered, read_rows
from .rows import canonical, parse_columns, read_canonical

__all__ = [
    "BUILTIN_TEMPLATES", "Batch", "ClassificationExample", "DataError", "Example", "FORMATS", "IGNORE_INDEX",
    "KIND", "PreferenceExample", "ROLES", "Row", "batches_for_epoch", "canonical", "check_row", "detect_format",
    "epoch_order", "format_example", "format_pair", "iter_jsonl", "load_classification_dataset", "load_dataset",
    "load_preference_dataset", "pack", "pack_rows", "pad_batch", "parse_columns", "read_canonical",
    "read_chat_template", "read_jsonl", "read_jsonl_numbered", "read_rows", "split_eval", "use_chat_template",
]
