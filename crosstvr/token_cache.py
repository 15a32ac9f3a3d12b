"""A cache of what the frozen parts of CrossTVR compute for each video: stage-2 vision tokens and stage-1 embeddings.

Stage 2 trains with the vision tower frozen (and stage 1 fixed), so the tokens V_t of every video are computed once
and read back instead of decoding and encoding the video at every step. The cache is a folder of shards (see
`crosstvr.video_store`: tokens in fp16, memory-mapped on read) and a manifest:

    cache/
      plan.json                 what is being built: videos in order, shard size, fingerprints
      shard-00000.safetensors   the first `shard_size` videos
      ...
      manifest.json             written last: the cache is complete

Building is resumable (finished shards are kept; every file is written under a temporary name and renamed, so a killed
build never leaves a shard that loads wrong) and shows progress. The fingerprints record the model (configuration and
the weights of every module the cached values depend on) and the frame sampling (processor settings, centre sampling);
opening the cache with a different model or processor raises [`TokenCacheMismatchError`].
"""

import json
import logging
import os

import torch
from tqdm.auto import tqdm

from .modeling_crosstvr import CrossTVRModel
from .processing_crosstvr import CrossTVRProcessor, VideoDecodeError
from .video_store import (
    ShardReader,
    encode_videos,
    model_fingerprint,
    processor_fingerprint,
    write_json_atomically,
    write_shard,
)


logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
# What the cached values depend on: the stage-1 video path (the similarity head included) and the stage-2 tower (not
# the fine module, which stage 2 trains, so that ablations of the fine module share one cache).
CACHED_MODULES = ("vision_model", "visual_projection", "temporal_aggregator", "similarity_head", "fine_vision_model")
CACHED_CONFIG_KEYS = (
    "vision_config",
    "fine_vision_config",
    "temporal_config",
    "projection_dim",
    "temporal_aggregator",
    "token_shift_layers",
    "token_shift_fold_div",
    "coarse_num_selected_patches",
    "share_vision_tower",
    # How the similarity head stores a video (its shape, and CRET's local features).
    "similarity_head",
    "cret_num_centers",
    "cret_num_heads",
    "cret_local_weight",
)


class TokenCacheMismatchError(ValueError):
    """The cache was built with another model, processor or video list."""


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def build_token_cache(
    model: CrossTVRModel,
    processor: CrossTVRProcessor,
    video_paths: list[str],
    cache_dir: str | os.PathLike,
    shard_size: int = 256,
    batch_size: int = 16,
    num_workers: int = 0,
    progress: bool = True,
) -> "TokenCache":
    """
    Compute and store the vision tokens and stage-1 embeddings of `video_paths` (in that order), resuming a build that
    was interrupted. Raises [`TokenCacheMismatchError`] if `cache_dir` holds a build of other videos or another model,
    and [`VideoDecodeError`] naming the file if a video cannot be decoded.
    """
    cache_dir = os.fspath(cache_dir)
    os.makedirs(cache_dir, exist_ok=True)
    plan = {
        "format_version": FORMAT_VERSION,
        "videos": list(video_paths),
        "shard_size": shard_size,
        "model": model_fingerprint(model, CACHED_MODULES, CACHED_CONFIG_KEYS),
        "processor": processor_fingerprint(processor),
    }
    plan_path = os.path.join(cache_dir, "plan.json")
    if os.path.exists(plan_path):
        with open(plan_path, encoding="utf-8") as file:
            if json.load(file) != plan:
                raise TokenCacheMismatchError(
                    f"{cache_dir} holds a token cache of other videos, another model or other frame sampling; delete "
                    "it or choose another folder to build this one"
                )
    else:
        write_json_atomically(plan_path, plan)

    starts = range(0, len(video_paths), shard_size)
    todo = [(index, start) for index, start in enumerate(starts) if not os.path.exists(os.path.join(cache_dir, _shard_name(index)))]
    if len(todo) < len(starts):
        logger.info("resuming the token cache in %s: %d of %d shards are done", cache_dir, len(starts) - len(todo), len(starts))
    bar = tqdm(
        total=sum(min(shard_size, len(video_paths) - start) for _, start in todo),
        desc="caching vision tokens",
        unit="video",
        disable=not progress,
    )
    for index, start in todo:
        batches = []
        for batch in encode_videos(model, processor, video_paths[start : start + shard_size], batch_size, num_workers):
            if batch.errors:
                path, reason = next(iter(batch.errors.items()))
                raise VideoDecodeError(f"{reason} (while caching the tokens of {path})")
            batches.append(batch)
            bar.update(len(batch.paths))
        write_shard(os.path.join(cache_dir, _shard_name(index)), batches, metadata={"first_video": str(start)})
    bar.close()
    write_json_atomically(
        os.path.join(cache_dir, "manifest.json"),
        {
            **plan,
            "shards": [
                {"file": _shard_name(index), "start": start, "stop": min(start + shard_size, len(video_paths))}
                for index, start in enumerate(starts)
            ],
        },
    )
    return TokenCache(cache_dir)


class TokenCache:
    """
    Read access to a complete token cache: `cache[i]` gives the cached values of video i (in build order), read
    memory-mapped from the shards; `cache.index` maps a video path to i. Use [`TokenCache.check`] to make sure it
    matches a model and processor.
    """

    def __init__(self, cache_dir: str | os.PathLike):
        self.cache_dir = os.fspath(cache_dir)
        manifest_path = os.path.join(self.cache_dir, "manifest.json")
        if not os.path.exists(manifest_path):
            raise FileNotFoundError(
                f"{self.cache_dir} has no manifest.json: the token cache is missing or its build did not finish "
                "(build_token_cache resumes it)"
            )
        with open(manifest_path, encoding="utf-8") as file:
            self.manifest = json.load(file)
        self.videos = self.manifest["videos"]
        self.index = {path: i for i, path in enumerate(self.videos)}
        self._shards = [(entry["start"], entry["stop"], entry["file"]) for entry in self.manifest["shards"]]
        self._reader = ShardReader(self.cache_dir)

    def __len__(self) -> int:
        return len(self.videos)

    def check(self, model: CrossTVRModel, processor: CrossTVRProcessor) -> "TokenCache":
        """Raise [`TokenCacheMismatchError`] unless the cache was built with this model and frame sampling."""
        if self.manifest["processor"] != processor_fingerprint(processor):
            raise TokenCacheMismatchError(
                f"the token cache in {self.cache_dir} was built with other frame sampling or preprocessing "
                f"({self.manifest['processor']}); rebuild it"
            )
        if self.manifest["model"] != model_fingerprint(model, CACHED_MODULES, CACHED_CONFIG_KEYS):
            raise TokenCacheMismatchError(
                f"the token cache in {self.cache_dir} was built with another model (configuration or stage-1 / "
                "vision-tower weights differ); rebuild it for this model"
            )
        return self

    def video_embeds(self) -> torch.Tensor:
        """The stage-1 embeddings of every cached video, `(videos, projection_dim)`, in build order."""
        return torch.cat([self._reader.tensor(file_name, "video_embeds") for _, _, file_name in self._shards])

    def __getitem__(self, video: int) -> dict[str, torch.Tensor]:
        for start, stop, file_name in self._shards:
            if start <= video < stop:
                return self._reader.row(file_name, video - start)
        raise IndexError(f"video {video} is not in the token cache ({len(self)} videos)")
