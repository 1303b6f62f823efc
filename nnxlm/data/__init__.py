"""Data: document sources, tokenizers and the grain pipeline that packs them into batches."""

from nnxlm.data.mixture import Mixture
from nnxlm.data.pipeline import ShardedBatches, make_dataset, unigram_entropy
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
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "UNK_ID",
    "JsonlFiles",
    "Mixture",
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
