"""Retrieval evaluation: metrics (also as an `evaluate` module), DSL and QB-Norm, two-stage evaluation of a split."""

from .evaluator import (
    EncodedSplit,
    RetrievalEvaluation,
    encode_split,
    encode_texts,
    evaluate_retrieval,
    rerank_depth_sweep,
    rerank_text_to_video,
    rerank_video_to_text,
)
from .metrics import METRIC_PATH, compute_retrieval_metrics, load_retrieval_metric
from .postprocessing import dual_softmax, querybank_normalize


__all__ = [
    "METRIC_PATH",
    "EncodedSplit",
    "RetrievalEvaluation",
    "compute_retrieval_metrics",
    "dual_softmax",
    "encode_split",
    "encode_texts",
    "evaluate_retrieval",
    "load_retrieval_metric",
    "querybank_normalize",
    "rerank_depth_sweep",
    "rerank_text_to_video",
    "rerank_video_to_text",
]
