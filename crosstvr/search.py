"""Text search over a folder of videos with the two-stage model: the library side of `crosstvr demo`.

Videos are decoded one by one (a file that cannot be decoded is skipped and reported, never fatal unless nothing
could be read), encoded in batches, ranked by stage 1 and re-ranked by stage 2.
"""

import logging
import os
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .modeling_crosstvr import CrossTVRModel
from .processing_crosstvr import CrossTVRProcessor, VideoDecodeError


logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov")


@dataclass
class SearchHit:
    rank: int
    path: str
    score: float
    coarse_score: float
    reranked: bool


@dataclass
class SearchResult:
    query: str
    hits: list[SearchHit]


@dataclass
class EncodedVideos:
    """Stage-1 embeddings and stage-2 tokens of the readable videos of a library, and why the others were skipped."""

    paths: list[str]
    video_embeds: torch.Tensor  # (videos, projection_dim)
    vision_tokens: torch.Tensor  # (videos, frames, tokens, width)
    video_mask: torch.Tensor  # (videos, frames)
    skipped: dict[str, str] = field(default_factory=dict)


def find_videos(directory: str | os.PathLike) -> list[str]:
    """All video files (by extension: mp4, avi, mkv, webm, mov) under `directory`, recursively, sorted."""
    if not os.path.isdir(directory):
        raise NotADirectoryError(f"video folder {os.fspath(directory)!r} does not exist")
    return sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(directory)
        for name in names
        if name.lower().endswith(VIDEO_EXTENSIONS)
    )


def load_model(model_name_or_path: str | None = None) -> tuple[CrossTVRModel, CrossTVRProcessor]:
    """A saved CrossTVR checkpoint (local folder or Hub id) with its processor, or the embedded default when None."""
    if model_name_or_path is None:
        from .default_model import build_default_model

        return build_default_model()
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(model_name_or_path)
    return model.eval(), AutoProcessor.from_pretrained(model_name_or_path)


@torch.no_grad()
def encode_videos(
    model: CrossTVRModel, processor: CrossTVRProcessor, video_paths: list[str], batch_size: int = 8
) -> EncodedVideos:
    """Decode and encode `video_paths`; files that cannot be decoded are skipped and listed in `skipped`."""
    pixel_values, video_masks, readable, skipped = [], [], [], {}
    for path in tqdm(video_paths, desc="decoding", unit="video", disable=len(video_paths) < 2):
        try:
            inputs = processor(videos=[path])
        except (VideoDecodeError, FileNotFoundError) as error:
            skipped[path] = str(error)
            logger.warning("skipping %s", error)
            continue
        pixel_values.append(inputs["pixel_values"])
        video_masks.append(inputs["video_mask"])
        readable.append(path)
    if not readable:
        raise ValueError(f"none of the {len(video_paths)} videos could be decoded: {skipped}")

    video_embeds, vision_tokens = [], []
    for start in range(0, len(readable), batch_size):
        video = model.encode_video(
            torch.cat(pixel_values[start : start + batch_size]).to(model.device),
            torch.cat(video_masks[start : start + batch_size]).to(model.device),
        )
        video_embeds.append(video.video_embeds)
        vision_tokens.append(video.vision_tokens)
    return EncodedVideos(readable, torch.cat(video_embeds), torch.cat(vision_tokens), torch.cat(video_masks), skipped)


@torch.no_grad()
def search_videos(
    model: CrossTVRModel,
    processor: CrossTVRProcessor,
    videos: EncodedVideos,
    query: str,
    top_k_rerank: int | None = None,
) -> SearchResult:
    """Rank encoded videos for `query`: stage-1 similarity for all, stage-2 re-ranking of the top `top_k_rerank`."""
    text = processor(text=[query]).to(model.device)
    similarity = model.get_text_features(text["input_ids"], text["attention_mask"]) @ videos.video_embeds.t()
    reranked = model.rerank_text_to_video(
        similarity,
        text["qformer_input_ids"],
        text["qformer_attention_mask"],
        videos.vision_tokens,
        videos.video_mask,
        top_k=top_k_rerank,
    )
    top_k = reranked.top_k_indices.shape[1]
    fused = dict(zip(reranked.top_k_indices[0].tolist(), reranked.fused_scores[0].tolist()))
    hits = [
        SearchHit(
            rank=rank + 1,
            path=videos.paths[index],
            score=fused.get(index, similarity[0, index].item()),
            coarse_score=similarity[0, index].item(),
            reranked=rank < top_k,
        )
        for rank, index in enumerate(reranked.ranking[0].tolist())
    ]
    return SearchResult(query=query, hits=hits)
