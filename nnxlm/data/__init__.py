"""Data: document sources, tokenizers and the grain pipeline that packs them into batches."""

from nnxlm.data.array_record import ArrayRecordFiles
from nnxlm.data.hf_datasets import HFDataset
from nnxlm.data.mixture import Mixture
from nnxlm.data.parquet import ParquetFiles
from nnxlm.data.pipeline import ShardedBatches, make_dataset, unigram_entropy
from nnxlm.data.prepared import Prepared
from nnxlm.data.sources import JsonlFiles, PythonStdlib, Synthetic, TextFiles
from nnxlm.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    SentencePieceTokenizer,
    Tokenizer,
    find_tokenizer,
    load_tokenizer,
)

__all__ = [
    "ArrayRecordFiles",
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "UNK_ID",
    "HFDataset",
    "JsonlFiles",
    "Mixture",
    "ParquetFiles",
    "Prepared",
    "PythonStdlib",
    "SentencePieceTokenizer",
    "ShardedBatches",
    "Synthetic",
    "TextFiles",
    "Tokenizer",
    "find_tokenizer",
    "load_tokenizer",
    "make_dataset",
    "unigram_entropy",
]
