"""Retrieval metrics as a plain function; the same implementation is the `evaluate` module in `retrieval_metrics/`.

    >>> from crosstvr.evaluation import compute_retrieval_metrics, load_retrieval_metric
    >>> compute_retrieval_metrics(similarity, text_to_video_index)        # numpy / lists
    >>> load_retrieval_metric().compute(predictions=similarity, references=text_to_video_index)
"""

import os

from .retrieval_metrics.retrieval_metrics import RECALL_AT, compute_retrieval_metrics, ground_truth_ranks


METRIC_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "retrieval_metrics")


def load_retrieval_metric(**kwargs):
    """The metrics as an `evaluate` module: `evaluate.load` of the local folder `retrieval_metrics/`."""
    import evaluate

    return evaluate.load(METRIC_PATH, **kwargs)


__all__ = ["METRIC_PATH", "RECALL_AT", "compute_retrieval_metrics", "ground_truth_ranks", "load_retrieval_metric"]
