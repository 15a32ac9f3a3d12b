"""Post-processing of a (texts x videos) stage-1 similarity matrix at inference: DSL and QB-Norm.

Both are transductive re-weightings that reduce "hubness" (a few videos scoring high for every query). In two-stage
evaluation they are applied to the stage-1 similarity, so they change which K candidates stage 2 re-ranks and the
s_coarse term of the fused score; the candidates outside the top K keep the post-processed order.
"""

import torch


def dual_softmax(similarity: torch.Tensor, temperature: float = 0.01, dim: int = 0) -> torch.Tensor:
    r"""
    Dual softmax (DSL) at inference, as CAMoE (Cheng et al., 2021, arXiv:2109.04290) proposed and TS2-Net applies it:
    every score is weighted by a prior, the softmax of the scores along the *other* axis than the one being ranked.

        text-to-video (`dim=0`):  S'_{tv} = S_{tv} * softmax_{t'}(S_{t'v} / temperature)_t
        video-to-text (`dim=1`):  S'_{tv} = S_{tv} * softmax_{v'}(S_{tv'} / temperature)_v

    For text-to-video the prior says how much a text stands out among all texts for that video; for video-to-text,
    how much a video stands out among all videos for that text. (A prior over the ranked axis would rescale each
    query's row by positive constants and could not change any ranking.) `temperature` plays the part of CLIP's
    1 / logit_scale (TS2-Net applies the softmax to logit-scaled scores).

    Args:
        similarity: `(texts, videos)` stage-1 cosine similarities.
        dim: the axis of the prior: 0 (over texts) for text-to-video, 1 (over videos) for video-to-text.

    Returns:
        `(texts, videos)`, to be ranked along the other axis than `dim`.
    """
    return similarity * torch.softmax(similarity / temperature, dim=dim)


def querybank_normalize(
    similarity: torch.Tensor, bank_similarity: torch.Tensor, beta: float = 20.0, k: int = 1
) -> torch.Tensor:
    r"""
    Querybank normalisation with the dynamic inverted softmax (QB-Norm, Bogolin et al., CVPR 2022; the authors'
    `dynamic_inverted_softmax.py`). A bank of training queries B (e.g. training captions) scored against the same
    videos estimates how much each video attracts queries in general. Videos that are in the top `k` of some bank query
    form the activation set A; a test query whose best video lies in A is renormalised by the inverted softmax

        S'_{qv} = exp(beta S_{qv}) / sum_b exp(beta B_{bv}),

    the others are left alone. We return (1 / beta) log S'_{qv} = S_{qv} - (1 / beta) logsumexp_b(beta B_{bv}): the
    same ranking, computed stably, and in the units of a cosine so that it stays comparable with the stage-2 score in
    the fused sum. Text-to-video only: the bank holds text queries.

    Args:
        similarity: `(texts, videos)` stage-1 similarities of the test queries.
        bank_similarity: `(bank queries, videos)` stage-1 similarities of the query bank.
    """
    if bank_similarity.shape[1] != similarity.shape[1]:
        raise ValueError(
            f"the query bank is scored against {bank_similarity.shape[1]} videos, the test queries against "
            f"{similarity.shape[1]}: score the bank against the same videos"
        )
    active_videos = torch.zeros(similarity.shape[1], dtype=torch.bool, device=similarity.device)
    active_videos[bank_similarity.topk(min(k, bank_similarity.shape[1]), dim=1).indices.unique()] = True
    normalise = active_videos[similarity.argmax(dim=1)]  # (texts,)
    inverted = similarity - torch.logsumexp(beta * bank_similarity, dim=0, keepdim=True) / beta
    return torch.where(normalise.unsqueeze(1), inverted, similarity)
