"""Lazy video decoding for the caption datasets: decode and preprocess only the rows a batch asks for."""

import hashlib

import torch

from ..processing_crosstvr import CrossTVRProcessor, VideoDecodeError


def content_generator(seed: int, epoch: int, batch: dict[str, list]) -> torch.Generator:
    """
    A generator seeded by `seed`, `epoch` and a batch's content (its rows' video ids, captions and segments): the same
    draws for the same batch whichever DataLoader worker builds it, when a run is resumed, and wherever the dataset
    lies on disk (paths are not part of the content, so a run in another folder or clone samples the same frames).
    """
    content = [*batch["video_id"], *batch["caption"], *map(str, batch["start_time"]), *map(str, batch["end_time"])]
    digest = hashlib.sha256("\n".join([str(seed), str(epoch), *content]).encode()).hexdigest()
    return torch.Generator().manual_seed(int(digest[:15], 16))


class VideoTextTransform:
    """
    A `Dataset.with_transform` / `set_transform` callable that turns rows (`caption`, `video_path`, `start_time`,
    `end_time`, `video_index`) into model inputs with a [`CrossTVRProcessor`]: T uniformly sampled frames per video
    (random offsets within the segments with `sampling="random"`, for training; segment centres with `"center"`, for
    evaluation), frame masks for short videos, and both tokenizations of the caption.

    Random sampling draws from torch's global generator, which every DataLoader worker seeds differently; with a
    `seed`, it draws instead from a generator seeded by the seed, the epoch (`set_epoch`) and the batch's content
    ([`content_generator`]), so that the frames of a batch do not depend on which worker decodes it, and a resumed run,
    or a run on a copy of the dataset elsewhere, reads the same frames. A
    video that cannot be decoded raises [`VideoDecodeError`] naming the file and the row's video id; load the dataset
    with `check_videos=True, on_bad_video="skip"` to drop such videos up front.

    Example:

    ```python
    >>> dataset = load_msrvtt("annotations/", "videos/")["train_9k"]
    >>> dataset = dataset.with_transform(VideoTextTransform(processor, sampling="random"))
    >>> batch = dataset[:8]  # pixel_values (8, T, 3, H, W), video_mask, input_ids, qformer_input_ids, video_index
    ```
    """

    def __init__(self, processor: CrossTVRProcessor, sampling: str = "center", seed: int | None = None):
        self.processor = processor
        self.sampling = sampling
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _generator(self, batch: dict[str, list]) -> torch.Generator | None:
        if self.seed is None or self.sampling != "random":
            return None
        return content_generator(self.seed, self.epoch, batch)

    def __call__(self, batch: dict[str, list]) -> dict[str, torch.Tensor]:
        try:
            inputs = self.processor(
                text=batch["caption"],
                videos=batch["video_path"],
                sampling=self.sampling,
                start_times=batch["start_time"],
                end_times=batch["end_time"],
                generator=self._generator(batch),
            )
        except (VideoDecodeError, FileNotFoundError) as error:
            raise type(error)(
                f"{error} (a row of video_id(s) {sorted(set(batch['video_id']))}); load the dataset with "
                "check_videos=True, on_bad_video='skip' to drop unreadable videos up front"
            ) from error
        inputs["video_index"] = torch.tensor(batch["video_index"], dtype=torch.long)
        return dict(inputs)


def rows_to_columns(rows: list[dict]) -> dict[str, list]:
    """A DataLoader's list of rows as one dict of columns."""
    return {key: [row[key] for row in rows] for key in rows[0]}


class VideoTextCollator(VideoTextTransform):
    """[`VideoTextTransform`] as a DataLoader `collate_fn` over plain rows: decoding runs in the DataLoader's worker
    processes."""

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        return super().__call__(rows_to_columns(rows))


def unique_videos(dataset):
    """The first row of every distinct video of a split (in `video_index` order): what evaluation encodes once. A
    transform set on `dataset` is kept."""
    first_rows = {}
    for row, video_index in enumerate(dataset.with_format(None)["video_index"]):
        first_rows.setdefault(video_index, row)
    return dataset.select([first_rows[index] for index in sorted(first_rows)])
