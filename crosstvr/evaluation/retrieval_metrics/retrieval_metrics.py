# Copyright 2026 The crosstvr authors. Licensed under the Apache License, Version 2.0.
"""Text-video retrieval metrics (R@1, R@5, R@10, median and mean rank) in both directions, as an `evaluate` module.

Self-contained (numpy, datasets, evaluate), so that `evaluate.load(<this folder>)` works anywhere; the crosstvr
package imports `compute_retrieval_metrics` from here, so the module and the plain function are one implementation.
"""

import datasets
import evaluate
import numpy as np


_CITATION = """\
@article{luo2022clip4clip,
  title={CLIP4Clip: An empirical study of CLIP for end to end video clip retrieval and captioning},
  author={Luo, Huaishao and Ji, Lei and Zhong, Ming and Chen, Yang and Lei, Wen and Duan, Nan and Li, Tianrui},
  journal={Neurocomputing},
  volume={508},
  pages={293--304},
  year={2022}
}
"""

_DESCRIPTION = """\
Recall at 1, 5 and 10 (percent) and median / mean rank (1-indexed) of the ground-truth item, for text-to-video and
video-to-text retrieval, following the protocol of the CLIP4Clip family (CLIP4Clip's `metrics.py`: `compute_metrics`,
`tensor_text_to_video_metrics`, `tensor_video_to_text_sim`):

- text-to-video: every caption is a query; the rank of its video among all videos.
- video-to-text: every video is a query. A video's captions form one candidate, scored by the best of them: with
  scores s(v, t), G(v, u) = max over the captions t of video u of s(v, t); the rank of G(v, v) among G(v, .). With one
  caption per video (MSR-VTT 1k-A, LSMDC, DiDeMo) this is the plain rank in the transposed matrix; with several
  (MSVD, VATEX) it is CLIP4Clip's multi-sentence protocol.

Ties are broken deterministically by candidate index: rank = 1 + #{candidates scoring higher} + #{candidates of a
lower index scoring the same}. Without ties this is exactly CLIP4Clip's rank.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): one row per caption (text query): its scores against every video,
        shape (texts, videos).
    references (`list` of `int`): the index of each caption's video.
    video_to_text_scores (`list` of `list` of `float`, *optional*): scores of the video-to-text direction, shape
        (videos, texts), when they differ from the transpose of `predictions` (e.g. after re-ranking).
Returns:
    A flat `dict`: `t2v_R1`, `t2v_R5`, `t2v_R10`, `t2v_MdR`, `t2v_MnR` and the same with `v2t_`.
Examples:
    >>> metric = evaluate.load("path/to/retrieval_metrics")
    >>> metric.compute(predictions=[[0.9, 0.1], [0.2, 0.8]], references=[0, 1])["t2v_R1"]
    100.0
"""

RECALL_AT = (1, 5, 10)


def ground_truth_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """1-indexed rank of `scores[i, targets[i]]` in row i, ties broken by candidate index."""
    target_scores = scores[np.arange(len(targets)), targets][:, None]
    higher = (scores > target_scores).sum(axis=1)
    tied_before = ((scores == target_scores) & (np.arange(scores.shape[1])[None, :] < targets[:, None])).sum(axis=1)
    return 1 + higher + tied_before


def summarise_ranks(ranks: np.ndarray, prefix: str) -> dict:
    metrics = {f"{prefix}_R{k}": float(100.0 * np.mean(ranks <= k)) for k in RECALL_AT}
    metrics[f"{prefix}_MdR"] = float(np.median(ranks))
    metrics[f"{prefix}_MnR"] = float(np.mean(ranks))
    return metrics


def compute_retrieval_metrics(text_to_video_scores, text_to_video_index=None, video_to_text_scores=None) -> dict:
    """
    Retrieval metrics of a (texts x videos) score matrix; see the module description for the protocol.

    Args:
        text_to_video_scores: `(texts, videos)` scores (any monotone similarity; higher is better).
        text_to_video_index: `(texts,)` the video of each text; default: text i describes video i (square matrix).
        video_to_text_scores: `(videos, texts)` scores of the other direction; default: the transpose.
    """
    scores = np.asarray(text_to_video_scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"text_to_video_scores must be a (texts, videos) matrix, got shape {scores.shape}")
    num_texts, num_videos = scores.shape
    if text_to_video_index is None:
        if num_texts != num_videos:
            raise ValueError(
                f"a {num_texts} x {num_videos} score matrix needs text_to_video_index (the video of every text)"
            )
        text_to_video_index = np.arange(num_texts)
    targets = np.asarray(text_to_video_index, dtype=np.int64)
    if targets.shape != (num_texts,) or targets.min() < 0 or targets.max() >= num_videos:
        raise ValueError(f"text_to_video_index must hold {num_texts} video indices in [0, {num_videos})")
    missing = np.setdiff1d(np.arange(num_videos), targets)
    if missing.size:
        raise ValueError(f"videos {missing[:10].tolist()} have no caption; every video needs at least one")
    reverse = scores.T if video_to_text_scores is None else np.asarray(video_to_text_scores, dtype=np.float64)
    if reverse.shape != (num_videos, num_texts):
        raise ValueError(f"video_to_text_scores must be shaped (videos, texts) = {(num_videos, num_texts)}")
    if np.isnan(scores).any() or np.isnan(reverse).any():
        raise ValueError("scores contain NaN")

    # G[v, u]: the best score video v gives to any caption of video u.
    caption_groups = np.full((num_videos, num_videos), -np.inf)
    np.maximum.at(caption_groups.T, targets, reverse.T)
    return {
        **summarise_ranks(ground_truth_ranks(scores, targets), "t2v"),
        **summarise_ranks(ground_truth_ranks(caption_groups, np.arange(num_videos)), "v2t"),
    }


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RetrievalMetrics(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                # float64, as the function computes: float32 features would merge near ties the function separates.
                {"predictions": datasets.Sequence(datasets.Value("float64")), "references": datasets.Value("int64")}
            ),
            reference_urls=["https://github.com/ArrowLuo/CLIP4Clip/blob/master/metrics.py"],
        )

    def _compute(self, predictions, references, video_to_text_scores=None):
        return compute_retrieval_metrics(predictions, references, video_to_text_scores)
