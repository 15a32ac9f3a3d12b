"""Storage shared by the token cache and the video index: encoding videos in batches, shards, fingerprints.

A shard is a safetensors file with the values the frozen parts of CrossTVR compute for a group of videos:

    vision_tokens        (n, T, N, D)  float16 or int8   stage-2 tokens (absent with token storage "none")
    vision_token_scales  (n, T, N)     float16           with int8 tokens: each token's scale (`quantize_tokens`)
    video_embeds         (n, P)        float32           stage-1 embeddings ((n, T, P) with the frame-level
                                                         similarity head "text_conditioned")
    video_mask           (n, T)        int8              real (1) and padding (0) frames

and, in its header metadata, whatever its writer needs to describe the rows. Shards are written to a temporary name and
renamed, so a file under a shard's name is always complete; they are read memory-mapped.
"""

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler

from .modeling_crosstvr import CrossTVRModel
from .processing_crosstvr import CrossTVRProcessor, VideoDecodeError


logger = logging.getLogger(__name__)

# How a shard keeps the stage-2 tokens: "float16" (0.92 MB a video for CLIP ViT-B/32 at 12 frames), "int8" with a
# scale per token (half of that), or "none" (no tokens: whoever needs them recomputes them from the video).
TOKEN_STORAGES = ("float16", "int8", "none")


def quantize_tokens(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    Symmetric int8 quantisation with one scale per token (per row of the last dimension):

        s_n = max_d |v_{n,d}| / 127,   q_{n,d} = round(v_{n,d} / s_n) in [-127, 127],   v_{n,d} ~ s_n q_{n,d}

    A scale per token rather than per channel: a token's scale depends on that token alone, so a video's codes do not
    depend on which videos were indexed before it (per-channel scales would be fixed from the library when the index
    is created, and clip a later video's larger values), and each token's error stays within s_n / 2 per channel,
    relative to its own norm. The scales are kept in float16.

    Args:
        tokens: `(..., D)` float tensor.

    Returns:
        `(q, s)`: `(..., D)` int8 and `(...)` float16.
    """
    scales = tokens.float().abs().amax(dim=-1) / 127  # (...)
    scales = scales.to(torch.float16).clamp_min(torch.finfo(torch.float16).tiny)
    quantized = (tokens.float() / scales.float().unsqueeze(-1)).round().clamp(-127, 127).to(torch.int8)
    return quantized, scales


def dequantize_tokens(quantized: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The inverse of [`quantize_tokens`] up to rounding: `s_n q_{n,d}` as float32."""
    return quantized.float() * scales.float().unsqueeze(-1)


def write_json_atomically(path: str, payload) -> None:
    """Write `payload` as JSON to a temporary file beside `path`, then rename it over `path`."""
    with tempfile.NamedTemporaryFile(
        "w", dir=os.path.dirname(os.path.abspath(path)), suffix=".partial", delete=False, encoding="utf-8"
    ) as file:
        json.dump(payload, file, indent=1)
    os.replace(file.name, path)


def model_fingerprint(
    model: CrossTVRModel,
    modules: tuple[str, ...] | None = None,
    config_keys: tuple[str, ...] | None = None,
    with_name_or_path: bool = False,
) -> str:
    """
    SHA-256 of the model's configuration and weights: of the configuration entries `config_keys` and the weights of
    the top-level `modules` when given, of everything otherwise. Where the model was loaded from (`_name_or_path`: a
    relative or absolute path, a Hub id) is not part of it; `with_name_or_path=True` gives the fingerprint of earlier
    versions, which included it.
    """
    config = model.config.to_dict()
    if config_keys is not None:
        config = {key: config.get(key) for key in config_keys}
    config.pop("transformers_version", None)
    if not with_name_or_path:
        config.pop("_name_or_path", None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    state = model.state_dict()
    # Weights are named as before the fine modules became sub-modules (`fine_module.` left out), so that indexes and
    # token caches built then still open.
    legacy_names = {name: name.removeprefix("fine_module.") for name in state}
    for name in sorted(state, key=legacy_names.get):
        if modules is None or name.split(".")[0] in modules:
            tensor = state[name].detach().to("cpu").reshape(-1).contiguous()
            digest.update(legacy_names[name].encode())
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
    return json.loads(json.dumps(settings))  # as a manifest stores it (tuples become lists)


class _DecodedVideos(Dataset):
    """Batches of videos decoded and preprocessed (centre frames); a file that cannot be read is reported, not
    raised, so that one bad file does not stop a DataLoader worker."""

    def __init__(self, paths: list[str], processor: CrossTVRProcessor):
        self.paths, self.processor = paths, processor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, indices: list[int]) -> dict:
        pixel_values, video_masks, paths, errors = [], [], [], {}
        for index in indices:
            path = self.paths[index]
            try:
                inputs = self.processor(videos=[path], sampling="center")
            except (VideoDecodeError, FileNotFoundError, ValueError) as error:
                errors[path] = str(error)
                continue
            pixel_values.append(inputs["pixel_values"])
            video_masks.append(inputs["video_mask"])
            paths.append(path)
        batch = {"paths": paths, "errors": errors}
        if paths:
            batch["pixel_values"], batch["video_mask"] = torch.cat(pixel_values), torch.cat(video_masks)
        return batch


@dataclass
class EncodedBatch:
    paths: list[str]
    vision_tokens: torch.Tensor | None  # (n, T, N, D) float16 or int8, CPU; None with token storage "none"
    video_embeds: torch.Tensor  # (n, P) or (n, T, P) float32, CPU
    video_mask: torch.Tensor  # (n, T) int8, CPU
    errors: dict[str, str]
    vision_token_scales: torch.Tensor | None = None  # (n, T, N) float16 with int8 tokens


@torch.no_grad()
def encode_videos(
    model: CrossTVRModel,
    processor: CrossTVRProcessor,
    paths: list[str],
    batch_size: int = 8,
    num_workers: int = 0,
    token_storage: str = "float16",
) -> Iterator[EncodedBatch]:
    """Decode `paths` in DataLoader workers (overlapping the encoding) and encode them in batches, in order, with the
    stage-2 tokens as `token_storage` says (one of `TOKEN_STORAGES`; "none" runs the stage-1 tower only)."""
    if token_storage not in TOKEN_STORAGES:
        raise ValueError(f"token_storage={token_storage!r} is not one of {TOKEN_STORAGES}")
    videos = _DecodedVideos(paths, processor)
    loader = DataLoader(
        videos,
        sampler=BatchSampler(SequentialSampler(videos), batch_size, drop_last=False),
        batch_size=None,
        num_workers=num_workers,
    )
    model.eval()
    for batch in loader:
        if not batch["paths"]:
            yield EncodedBatch([], None, torch.empty(0), torch.empty(0), batch["errors"])
            continue
        pixel_values, video_mask = batch["pixel_values"].to(model.device), batch["video_mask"].to(model.device)
        scales = None
        if token_storage == "none":
            video_embeds, tokens = model.get_video_features(pixel_values, video_mask), None
        else:
            video = model.encode_video(pixel_values, video_mask)
            video_embeds, tokens = video.video_embeds, video.vision_tokens.to("cpu", torch.float32)
            tokens, scales = quantize_tokens(tokens) if token_storage == "int8" else (tokens.half(), None)
        yield EncodedBatch(
            batch["paths"],
            tokens,
            video_embeds.to("cpu", torch.float32),
            batch["video_mask"].to(torch.int8),
            batch["errors"],
            scales,
        )


def write_shard(path: str, batches: list[EncodedBatch], metadata: dict[str, str]) -> None:
    """Concatenate encoded batches into one shard file at `path`, atomically, with `metadata` in its header."""
    batches = [batch for batch in batches if batch.paths]
    staging = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.partial")
    tensors = {}
    for key in ("vision_tokens", "vision_token_scales", "video_embeds", "video_mask"):
        values = [getattr(batch, key) for batch in batches]
        if values[0] is not None:
            tensors[key] = torch.cat(values).contiguous()
    save_file(tensors, staging, metadata=metadata)
    os.replace(staging, path)


class ShardReader:
    """Memory-mapped read access to shard files, opened on first use (so every DataLoader worker maps its own)."""

    def __init__(self, directory: str):
        self.directory = directory
        self._open = {}

    def _file(self, name: str):
        if name not in self._open:
            self._open[name] = safe_open(os.path.join(self.directory, name), framework="pt")
        return self._open[name]

    def metadata(self, name: str) -> dict[str, str]:
        return self._file(name).metadata() or {}

    def tensor(self, name: str, key: str) -> torch.Tensor:
        """A whole tensor of a shard (memory-mapped)."""
        return self._file(name).get_tensor(key)

    def value(self, name: str, key: str, row: int) -> torch.Tensor:
        """One video's value of `key` (reads that row only)."""
        return self._file(name).get_slice(key)[row : row + 1][0]

    def row(self, name: str, row: int) -> dict[str, torch.Tensor]:
        """The values of one video: `vision_tokens` (T, N, D; float16, or float32 dequantised from int8; absent when
        the shard keeps no tokens), `video_embeds` (P,) or (T, P), `video_mask` (T,) as long."""
        values = {
            "video_embeds": self.value(name, "video_embeds", row),
            "video_mask": self.value(name, "video_mask", row).long(),
        }
        keys = self._file(name).keys()
        if "vision_token_scales" in keys:
            values["vision_tokens"] = dequantize_tokens(
                self.value(name, "vision_tokens", row), self.value(name, "vision_token_scales", row)
            )
        elif "vision_tokens" in keys:
            values["vision_tokens"] = self.value(name, "vision_tokens", row)
        return values

    def close(self, name: str) -> None:
        self._open.pop(name, None)

    def __getstate__(self):
        return {**self.__dict__, "_open": {}}
