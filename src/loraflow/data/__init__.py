"""Training data: read and check tables, tokenize them with loss masks, and batch them.

The path from a file to batches is flat steps, each usable on its own, one module each:

1. `tables`: `load_training_data` reads the train (and eval) file once and checks it before any
   model is loaded (`load_examples`, `read_table`), with a seeded eval split (`split_examples`);
2. `tokenize`: `[bos] + prompt + completion + [eos]` with the loss on the completion only, or
   `[bos] + text + [eos]` for plain text (`tokenize_examples`); conversations through `chat`
   (`tokenize_conversation`: loss masks from the chat template's own rendering);
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
from loraflow.data.chat import resolve_chat_template, tokenize_conversation
from loraflow.data.conversations import check_conversations
from loraflow.data.tables import (
    FORMATS,
    IGNORE_INDEX,
    SAMPLE_DATA,
    Columns,
    Table,
    TrainingData,
    check_examples,
    columns_of,
    load_examples,
    load_training_data,
    read_table,
    resolve_data,
    split_examples,
)
from loraflow.data.tokenize import TokenizedExamples, tokenize_examples, tokenize_table

__all__ = [
    "FORMATS", "IGNORE_INDEX", "SAMPLE_DATA", "Columns", "EpochBatchSampler", "Table", "TokenizedExamples",
    "TrainingData", "check_conversations", "check_examples", "collate_packed", "collate_padded", "columns_of",
    "length_grouped_batches", "load_examples", "load_training_data", "make_dataloader",
    "pack_examples", "read_table", "resolve_chat_template", "resolve_data", "split_batch", "split_examples",
    "tokenize_conversation", "tokenize_examples", "tokenize_table",
]
