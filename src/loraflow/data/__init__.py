"""Training data: read and check tables, tokenize them with loss masks, and batch them.

The path from a file to batches is flat steps, each usable on its own, one module each:

1. `tables`: `load_training_data` reads the train (and eval) file once and checks it before any
   model is loaded (`load_examples`, `read_table`), with a seeded eval split (`split_examples`);
2. `tokenize`: `[bos] + prompt + completion + [eos]` with the loss on the completion only, or
   `[bos] + text + [eos]` for plain text (`tokenize_examples`);
3. `batching`: length-grouped dynamic padding, or packing several examples per row with position
   ids that restart at 0, sharded across processes (`make_dataloader`).
"""

from loraflow.data.batching import (
    EpochBatchSampler,
    collate_packed,
    collate_padded,
    length_grouped_batches,
    make_dataloader,
    pack_examples,
    split_batch,
)
from loraflow.data.tables import (
    FORMATS,
    SAMPLE_DATA,
    Columns,
    Table,
    TrainingData,
    columns_of,
    load_examples,
    load_training_data,
    read_table,
    split_examples,
)
from loraflow.data.tokenize import IGNORE_INDEX, TokenizedExamples, describe, tokenize_examples, tokenize_table

__all__ = [
    "FORMATS", "IGNORE_INDEX", "SAMPLE_DATA", "Columns", "EpochBatchSampler", "Table", "TokenizedExamples",
    "TrainingData", "collate_packed", "collate_padded", "columns_of", "describe", "length_grouped_batches",
    "load_examples", "load_training_data", "make_dataloader", "pack_examples", "read_table", "split_batch",
    "split_examples", "tokenize_examples", "tokenize_table",
]
