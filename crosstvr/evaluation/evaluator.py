"""Two-stage retrieval evaluation of a split: encode once, rank with stage 1, re-rank the top K with stage 2.

Every video of the split is decoded and encoded once (stage-1 embedding and frozen stage-2 tokens, kept on the CPU in
half precision); every caption is encoded once. The stage-1 similarity matrix (texts x videos) is small; stage 2 runs
only on the top K candidates of each query, in batches of (text, video) pairs, in both directions.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

import torch
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler
from tqdm.auto import tqdm

from ..data.transforms import VideoTextTransform, unique_videos
from ..modeling_crosstvr import CrossTVRModel, CrossTVRRerankOutput, fuse_reranking
from ..processing_crosstvr import CrossTVRProcessor
from .metrics import compute_retrieval_metrics
from .postprocessing import dual_softmax, querybank_normalize


logger = logging.getLogger(__name__)

POST_PROCESSING = (None, "dsl", "qb_norm")


@dataclass
class EncodedSplit:
    """Everything retrieval needs about a split: its captions (texts) and its distinct videos."""

    text_embeds: torch.Tensor  # (texts, projection_dim)
    qformer_input_ids: torch.Tensor  # (texts, text_length)
    qformer_attention_mask: torch.Tensor  # (texts, text_length)
    text_to_video_index: torch.Tensor  # (texts,)
    video_embeds: torch.Tensor  # (videos, projection_dim), or (videos, frames, projection_dim): see get_video_features
    vision_tokens: torch.Tensor  # (videos, frames, tokens, width), float16 on the CPU
    video_mask: torch.Tensor  # (videos, frames)


@dataclass
class RetrievalEvaluation:
    """Metrics of stage 1 alone and of the two stages (None with `rerank=False`), and how they were obtained."""

    num_texts: int
    num_videos: int
    top_k: int | None
    fine_score_weight: float | None
    post_processing: str | None
    metrics: dict[str, dict[str, float] | None] = field(default_factory=dict)


def shard_bounds(length: int, num_shards: int, shard_index: int) -> slice:
    """The contiguous `shard_index`-th of `num_shards` near-equal parts of `range(length)`."""
    return slice(length * shard_index // num_shards, length * (shard_index + 1) // num_shards)


def _no_video_embeds(model: CrossTVRModel) -> torch.Tensor:
    """The stage-1 embeddings of no video, as the model's similarity head shapes them, so that shards concatenate."""
    return torch.empty(0, *model.similarity_head.video_shape(model.config.num_frames))


def concatenate_splits(parts: list[EncodedSplit]) -> EncodedSplit:
    """The split whose texts and videos are those of `parts`, in order (shards encoded by several processes)."""
    return EncodedSplit(**{f.name: torch.cat([getattr(part, f.name) for part in parts]) for f in fields(EncodedSplit)})


@torch.no_grad()
def encode_texts(
    model: CrossTVRModel, processor: CrossTVRProcessor, captions: list[str], batch_size: int = 256, progress=True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage-1 embeddings (on the CPU) and Q-Former tokens of `captions`."""
    if not captions:
        empty = torch.empty(0, dtype=torch.long)
        return torch.empty(0, model.similarity_head.text_dim), empty, empty
    embeds, qformer_ids, qformer_masks = [], [], []
    for start in tqdm(range(0, len(captions), batch_size), desc="encoding texts", disable=not progress):
        text = processor(text=captions[start : start + batch_size])
        embeds.append(
            model.get_text_features(text["input_ids"].to(model.device), text["attention_mask"].to(model.device))
            .to("cpu", torch.float32)  # half-precision towers: stage-1 scores in float32, as for the videos
        )
        qformer_ids.append(text["qformer_input_ids"])
        qformer_masks.append(text["qformer_attention_mask"])
    return torch.cat(embeds), torch.cat(qformer_ids), torch.cat(qformer_masks)


@torch.no_grad()
def encode_split(
    model: CrossTVRModel,
    processor: CrossTVRProcessor,
    dataset,
    batch_size: int = 16,
    num_workers: int = 0,
    progress: bool = True,
    num_shards: int = 1,
    shard_index: int = 0,
) -> EncodedSplit:
    """Encode the captions and the distinct videos of a split (rows as `crosstvr.data` loads them); with
    `num_shards`, only the `shard_index`-th contiguous part of the captions and of the videos (see
    [`concatenate_splits`])."""
    plain = dataset.with_format(None)
    texts = shard_bounds(len(plain), num_shards, shard_index)
    text_embeds, qformer_ids, qformer_mask = encode_texts(model, processor, plain["caption"][texts], progress=progress)
    videos = unique_videos(plain)
    videos = videos.select(range(len(videos))[shard_bounds(len(videos), num_shards, shard_index)])
    videos = videos.with_transform(VideoTextTransform(processor, sampling="center"))
    loader = DataLoader(
        videos,
        sampler=BatchSampler(SequentialSampler(videos), batch_size, drop_last=False),
        batch_size=None,
        num_workers=num_workers,
    )
    video_embeds, vision_tokens, video_masks = [], [], []
    for batch in tqdm(loader, desc="encoding videos", disable=not progress):
        video = model.encode_video(batch["pixel_values"].to(model.device), batch["video_mask"].to(model.device))
        video_embeds.append(video.video_embeds.to("cpu", torch.float32))
        vision_tokens.append(video.vision_tokens.to("cpu", torch.float16))
        video_masks.append(batch["video_mask"])
    return EncodedSplit(
        text_embeds=text_embeds,
        qformer_input_ids=qformer_ids,
        qformer_attention_mask=qformer_mask,
        text_to_video_index=torch.tensor(plain["video_index"][texts], dtype=torch.long),
        # A shard without videos (fewer videos than processes) gives empty tensors, which concatenation skips.
        video_embeds=torch.cat(video_embeds) if video_embeds else _no_video_embeds(model),
        vision_tokens=torch.cat(vision_tokens) if vision_tokens else torch.empty(0, dtype=torch.float16),
        video_mask=torch.cat(video_masks) if video_masks else torch.empty(0, dtype=torch.long),
    )


def _concatenate(outputs: list[CrossTVRRerankOutput]) -> CrossTVRRerankOutput:
    return CrossTVRRerankOutput(**{key: torch.cat([output[key] for output in outputs]) for key in outputs[0].keys()})


@torch.no_grad()
def rerank_text_to_video(
    model: CrossTVRModel,
    encoded: EncodedSplit,
    similarity: torch.Tensor,
    top_k: int | None = None,
    fine_score_weight: float | None = None,
    queries_per_call: int = 64,
    pair_batch_size: int = 32,
    progress: bool = True,
    coarse_scores: torch.Tensor | None = None,
) -> CrossTVRRerankOutput:
    """Every text's stage-1 top K re-ranked (see [`CrossTVRModel.rerank_text_to_video`]), in batches of texts;
    `similarity` is the `(texts, videos)` stage-1 matrix (and `coarse_scores`, when given, the cosine it was
    post-processed from)."""
    return _concatenate(
        [
            model.rerank_text_to_video(
                similarity[start : start + queries_per_call],
                encoded.qformer_input_ids[start : start + queries_per_call],
                encoded.qformer_attention_mask[start : start + queries_per_call],
                encoded.vision_tokens,
                encoded.video_mask,
                top_k=top_k,
                fine_score_weight=fine_score_weight,
                batch_size=pair_batch_size,
                coarse_scores=None if coarse_scores is None else coarse_scores[start : start + queries_per_call],
            )
            for start in tqdm(
                range(0, similarity.shape[0], queries_per_call), desc="re-ranking text-to-video", disable=not progress
            )
        ]
    )


@torch.no_grad()
def rerank_video_to_text(
    model: CrossTVRModel,
    encoded: EncodedSplit,
    similarity: torch.Tensor,
    top_k: int | None = None,
    fine_score_weight: float | None = None,
    queries_per_call: int = 64,
    pair_batch_size: int = 32,
    progress: bool = True,
    coarse_scores: torch.Tensor | None = None,
) -> CrossTVRRerankOutput:
    """Every video's stage-1 top K texts re-ranked likewise, in batches of videos; `similarity` is still the
    `(texts, videos)` stage-1 matrix, the output has one row per video."""
    return _concatenate(
        [
            model.rerank_video_to_text(
                similarity[:, start : start + queries_per_call],
                encoded.qformer_input_ids,
                encoded.qformer_attention_mask,
                encoded.vision_tokens[start : start + queries_per_call],
                encoded.video_mask[start : start + queries_per_call],
                top_k=top_k,
                fine_score_weight=fine_score_weight,
                batch_size=pair_batch_size,
                coarse_scores=None if coarse_scores is None else coarse_scores[:, start : start + queries_per_call],
            )
            for start in tqdm(
                range(0, similarity.shape[1], queries_per_call), desc="re-ranking video-to-text", disable=not progress
            )
        ]
    )


@torch.no_grad()
def rerank_depth_sweep(
    model: CrossTVRModel,
    encoded: EncodedSplit,
    similarity: torch.Tensor,
    depths: list[int],
    fine_score_weight: float | None = None,
    pair_batch_size: int = 32,
    progress: bool = True,
) -> dict[int, dict[str, float]]:
    """
    Two-stage metrics at every re-ranking depth K in `depths`. Stage 2 scores the top max(depths) candidates of every
    query once; each depth fuses a prefix of those scores (see [`fuse_reranking`]).
    """
    weight = model.config.fine_score_weight if fine_score_weight is None else fine_score_weight
    kwargs = {"top_k": max(depths), "pair_batch_size": pair_batch_size, "progress": progress}
    text_to_video = rerank_text_to_video(model, encoded, similarity, **kwargs)
    video_to_text = rerank_video_to_text(model, encoded, similarity, **kwargs)
    orders = [
        matrix.sort(dim=1, descending=True, stable=True).indices for matrix in (similarity, similarity.t())
    ]
    index = encoded.text_to_video_index.numpy()
    sweep = {}
    for depth in depths:
        t2v = fuse_reranking(similarity, orders[0], text_to_video.fine_scores[:, :depth], weight)
        v2t = fuse_reranking(similarity.t(), orders[1], video_to_text.fine_scores[:, :depth], weight)
        sweep[depth] = compute_retrieval_metrics(t2v.logits.numpy(), index, v2t.logits.numpy())
    return sweep


@torch.no_grad()
def evaluate_retrieval(
    model: CrossTVRModel,
    processor: CrossTVRProcessor,
    dataset,
    rerank: bool = True,
    top_k: int | None = None,
    fine_score_weight: float | None = None,
    post_processing: str | None = None,
    dsl_temperature: float = 0.01,
    querybank_captions: list[str] | None = None,
    qb_norm_beta: float = 20.0,
    qb_norm_k: int = 1,
    batch_size: int = 16,
    num_workers: int = 0,
    pair_batch_size: int = 32,
    progress: bool = True,
    encoded: EncodedSplit | None = None,
    num_shards: int = 1,
    shard_index: int = 0,
    gather: Callable[[object], list] | None = None,
) -> RetrievalEvaluation:
    """
    Evaluate `model` on one split: the metrics of stage 1 alone and, with `rerank=True`, of the two stages (top K of
    every query re-ranked by stage 2), both directions (see `crosstvr.evaluation.metrics`).

    Args:
        dataset: the split's rows as `crosstvr.data` loads them (one row per caption, with `video_index`).
        rerank: also re-rank with stage 2; `False` evaluates stage 1 only.
        top_k, fine_score_weight: K and w (default: the model config's).
        post_processing: `None`, `"dsl"` ([`dual_softmax`] with `dsl_temperature`) or `"qb_norm"`
            ([`querybank_normalize`] with `querybank_captions`, `qb_norm_beta`, `qb_norm_k`; text-to-video only).
        batch_size, num_workers: videos per encoding batch and decoding worker processes.
        pair_batch_size: (text, video) pairs per stage-2 call.
        encoded: the split as [`encode_split`] returned it for this model, to reuse instead of encoding again.
        num_shards, shard_index, gather: evaluation shared by `num_shards` processes (data-parallel training): each
            encodes and re-ranks its contiguous part of the texts and videos, and `gather(value)` returns the list of
            every process's `value` in process order (e.g. `accelerate.utils.gather_object([value])`). Every process
            gets the same result, equal to one process's.
    """
    if post_processing not in POST_PROCESSING:
        raise ValueError(f"post_processing={post_processing!r} is not one of {POST_PROCESSING}")
    if (post_processing == "qb_norm") != (querybank_captions is not None):
        raise ValueError("post_processing='qb_norm' needs querybank_captions (the bank), and only it uses them")
    gather = gather or (lambda value: [value])
    model.eval()
    if encoded is None:
        part = encode_split(model, processor, dataset, batch_size, num_workers, progress, num_shards, shard_index)
        encoded = concatenate_splits(gather(part))
    similarity = cosine = model.get_similarity(encoded.text_embeds, encoded.video_embeds)  # (texts, videos)
    # Both directions are ranked in a (texts, videos) matrix: rows for text-to-video, columns for video-to-text.
    video_to_text_similarity = similarity
    if post_processing == "dsl":
        similarity = dual_softmax(similarity, dsl_temperature, dim=0)
        video_to_text_similarity = dual_softmax(video_to_text_similarity, dsl_temperature, dim=1)
    # QB-Norm's bank holds text queries, so it re-weights text-to-video only; video-to-text keeps the plain matrix.
    if post_processing == "qb_norm":
        bank_embeds, _, _ = encode_texts(model, processor, list(querybank_captions), progress=progress)
        bank_similarity = model.get_similarity(bank_embeds, encoded.video_embeds)  # (bank, videos)
        similarity = querybank_normalize(similarity, bank_similarity, qb_norm_beta, qb_norm_k)

    index = encoded.text_to_video_index.numpy()
    metrics = {
        "stage1": compute_retrieval_metrics(similarity.numpy(), index, video_to_text_similarity.t().numpy()),
        "two_stage": None,
    }
    if rerank:
        rerank_kwargs = {
            "top_k": top_k,
            "fine_score_weight": fine_score_weight,
            "pair_batch_size": pair_batch_size,
            "progress": progress,
        }
        # Post-processing chooses the candidates; the fused score adds the fine score to the cosine.
        # This process re-ranks its part of the texts (rows) and of the videos (columns).
        texts = shard_bounds(similarity.shape[0], num_shards, shard_index)
        videos = shard_bounds(similarity.shape[1], num_shards, shard_index)
        text_part = replace(
            encoded,
            qformer_input_ids=encoded.qformer_input_ids[texts],
            qformer_attention_mask=encoded.qformer_attention_mask[texts],
        )
        video_part = replace(encoded, vision_tokens=encoded.vision_tokens[videos], video_mask=encoded.video_mask[videos])
        text_to_video = rerank_text_to_video(
            model,
            text_part,
            similarity[texts],
            **rerank_kwargs,
            coarse_scores=None if post_processing is None else cosine[texts],
        )
        video_to_text = rerank_video_to_text(
            model,
            video_part,
            video_to_text_similarity[:, videos],
            **rerank_kwargs,
            coarse_scores=None if post_processing is None else cosine[:, videos],
        )
        metrics["two_stage"] = compute_retrieval_metrics(
            torch.cat(gather(text_to_video.logits)).numpy(), index, torch.cat(gather(video_to_text.logits)).numpy()
        )
    return RetrievalEvaluation(
        num_texts=len(index),
        num_videos=len(encoded.video_embeds),
        top_k=min(model.config.rerank_top_k if top_k is None else top_k, len(encoded.video_embeds)) if rerank else None,
        fine_score_weight=(model.config.fine_score_weight if fine_score_weight is None else fine_score_weight)
        if rerank
        else None,
        post_processing=post_processing,
        metrics=metrics,
    )

