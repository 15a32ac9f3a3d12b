"""A cache of what the frozen parts of CrossTVR compute for each video: stage-2 vision tokens and stage-1 embeddings.

Stage 2 trains with the vision tower frozen (and stage 1 fixed), so the tokens V_t of every video are computed once
and read back instead of decoding and encoding the video at every step. The cache is a folder of safetensors shards
(tokens in fp16, memory-mapped on read) and a manifest:

    cache/
      plan.json            what is being built: videos in order, shard size, fingerprints
      shard-00000.safetensors   vision_tokens (n, T, N, D) fp16, video_embeds (n, P) fp32, video_mask (n, T) int8
      ...
      manifest.json        written last: the cache is complete

Building is resumable (finished shards are kept; every file is written to a temporary name and renamed, so a killed
build never leaves a shard that loads wrong) and shows progress. The fingerprints record the model (configuration and
the weights of every module the cached values depend on) and the frame sampling (processor settings, centre sampling);
opening the cache with a different model or processor raises [`TokenCacheMismatchError`].
"""

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler
from tqdm.auto import tqdm

from .modeling_crosstvr import CrossTVRModel
from .processing_crosstvr import CrossTVRProcessor


logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
# Modules whose weights change the cached values: the stage-1 video path and the stage-2 tower.
CACHED_MODULES = ("vision_model", "visual_projection", "temporal_aggregator", "fine_vision_model")


class TokenCacheMismatchError(ValueError):
    """The cache was built with another model, processor or video list."""


def _write_json_atomically(path: str, payload) -> None:
    with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(path), suffix=".partial", delete=False) as file:
        json.dump(payload, file, indent=1)
    os.replace(file.name, path)


def model_fingerprint(model: CrossTVRModel) -> str:
    """SHA-256 of the configuration and of the weights the cached values depend on."""
    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    state = model.state_dict()
    for name in sorted(state):
        if name.split(".")[0] in CACHED_MODULES:
            tensor = state[name].detach().to("cpu").contiguous()
            digest.update(name.encode())
            if tensor.numel():
                digest.update(tensor.view(torch.uint8).numpy())
    return digest.hexdigest()


def processor_fingerprint(processor: CrossTVRProcessor) -> dict:
    """The settings that decide which frames are read and how they are preprocessed (centre sampling)."""
    image_processor = processor.image_processor.to_dict()
    relevant = ("size", "crop_size", "do_resize", "do_center_crop", "do_normalize", "image_mean", "image_std", "resample")
    settings = {
        "num_frames": processor.num_frames,
        "sampling": "center",
        "image_processor": {key: image_processor.get(key) for key in relevant},
    }
    return json.loads(json.dumps(settings))  # as the manifest stores it (tuples become lists)


@dataclass
class _Shard:
    index: int
    start: int
    stop: int

    @property
    def file_name(self) -> str:
        return f"shard-{self.index:05d}.safetensors"


class _Videos(Dataset):
    def __init__(self, paths: list[str], processor: CrossTVRProcessor):
        self.paths, self.processor = paths, processor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, indices: list[int]) -> dict:
        return dict(self.processor(videos=[self.paths[i] for i in indices], sampling="center"))


@torch.no_grad()
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
    was interrupted. Raises [`TokenCacheMismatchError`] if `cache_dir` holds a build of other videos or another model.
    """
    cache_dir = os.fspath(cache_dir)
    os.makedirs(cache_dir, exist_ok=True)
    plan = {
        "format_version": FORMAT_VERSION,
        "videos": list(video_paths),
        "shard_size": shard_size,
        "model": model_fingerprint(model),
        "processor": processor_fingerprint(processor),
    }
    plan_path = os.path.join(cache_dir, "plan.json")
    if os.path.exists(plan_path):
        with open(plan_path, encoding="utf-8") as file:
            existing = json.load(file)
        if existing != plan:
            raise TokenCacheMismatchError(
                f"{cache_dir} holds a token cache of other videos, another model or other frame sampling; delete it "
                "or choose another folder to build this one"
            )
    else:
        _write_json_atomically(plan_path, plan)

    shards = [
        _Shard(index, start, min(start + shard_size, len(video_paths)))
        for index, start in enumerate(range(0, len(video_paths), shard_size))
    ]
    todo = [shard for shard in shards if not os.path.exists(os.path.join(cache_dir, shard.file_name))]
    if len(todo) < len(shards):
        logger.info("resuming the token cache in %s: %d of %d shards are done", cache_dir, len(shards) - len(todo), len(shards))
    model.eval()
    bar = tqdm(total=sum(s.stop - s.start for s in todo), desc="caching vision tokens", unit="video", disable=not progress)
    for shard in todo:
        videos = _Videos(video_paths[shard.start : shard.stop], processor)
        loader = DataLoader(
            videos,
            sampler=BatchSampler(SequentialSampler(videos), batch_size, drop_last=False),
            batch_size=None,
            num_workers=num_workers,
        )
        vision_tokens, video_embeds, video_masks = [], [], []
        for batch in loader:
            video = model.encode_video(batch["pixel_values"].to(model.device), batch["video_mask"].to(model.device))
            vision_tokens.append(video.vision_tokens.to("cpu", torch.float16))
            video_embeds.append(video.video_embeds.to("cpu", torch.float32))
            video_masks.append(batch["video_mask"].to(torch.int8))
            bar.update(len(batch["video_mask"]))
        staging = os.path.join(cache_dir, f".{shard.file_name}.partial")
        save_file(
            {
                "vision_tokens": torch.cat(vision_tokens).contiguous(),
                "video_embeds": torch.cat(video_embeds).contiguous(),
                "video_mask": torch.cat(video_masks).contiguous(),
            },
            staging,
        )
        os.replace(staging, os.path.join(cache_dir, shard.file_name))
    bar.close()
    _write_json_atomically(
        os.path.join(cache_dir, "manifest.json"),
        {**plan, "shards": [{"file": s.file_name, "start": s.start, "stop": s.stop} for s in shards]},
    )
    return TokenCache(cache_dir)


class TokenCache:
    """
    Read access to a complete token cache: `cache[i]` gives the cached values of video i (in build order) as tensors
    that are memory-mapped from the shards. Use [`TokenCache.check`] to make sure it matches a model and processor.
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
        self._open = {}

    def __len__(self) -> int:
        return len(self.videos)

    def check(self, model: CrossTVRModel, processor: CrossTVRProcessor) -> "TokenCache":
        """Raise [`TokenCacheMismatchError`] unless the cache was built with this model and frame sampling."""
        if self.manifest["processor"] != processor_fingerprint(processor):
            raise TokenCacheMismatchError(
                f"the token cache in {self.cache_dir} was built with other frame sampling or preprocessing "
                f"({self.manifest['processor']}); rebuild it"
            )
        if self.manifest["model"] != model_fingerprint(model):
            raise TokenCacheMismatchError(
                f"the token cache in {self.cache_dir} was built with another model (configuration or stage-1 / "
                "vision-tower weights differ); rebuild it for this model"
            )
        return self

    def _tensors(self, file_name: str):
        # Opened lazily, so that every DataLoader worker maps the shards itself.
        if file_name not in self._open:
            self._open[file_name] = safe_open(os.path.join(self.cache_dir, file_name), framework="pt")
        return self._open[file_name]

    def __getitem__(self, video: int) -> dict[str, torch.Tensor]:
        for start, stop, file_name in self._shards:
            if start <= video < stop:
                tensors = self._tensors(file_name)
                row = video - start
                return {
                    "vision_tokens": tensors.get_slice("vision_tokens")[row : row + 1][0],
                    "video_embeds": tensors.get_slice("video_embeds")[row : row + 1][0],
                    "video_mask": tensors.get_slice("video_mask")[row : row + 1][0].long(),
                }
        raise IndexError(f"video {video} is not in the token cache ({len(self)} videos)")

    def __getstate__(self):
        return {**self.__dict__, "_open": {}}
