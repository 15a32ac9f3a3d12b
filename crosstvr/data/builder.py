"""What the five benchmark loaders share: finding the video files, reporting bad input, and Arrow storage.

A loader parses its annotation format (`crosstvr.data.annotations`) into caption records; this module turns them into
a `datasets.DatasetDict` with one row per (video, caption) pair, after matching every row to a video file and, on
request, checking that every video decodes. Problems are collected, not raised one at a time, and handled by a
policy: `on_bad_video="error"` (default) raises one error listing them all; `"skip"` drops the affected rows and logs
the same list as a warning. The result is written to an Arrow cache (atomically) and returned memory-mapped, so the
next call with unchanged files loads in well under a second.
"""

import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass

from .annotations import (
    Annotations,
    CaptionRecord,
    parse_didemo,
    parse_lsmdc,
    parse_msrvtt,
    parse_msvd,
    parse_vatex,
)


logger = logging.getLogger(__name__)

# Bump when the rows a loader produces change, so that old caches are not reused.
CACHE_VERSION = 1
BAD_VIDEO_POLICIES = ("error", "skip")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".3gp", ".flv", ".ogv")


@dataclass(frozen=True)
class DatasetFormat:
    name: str
    parse: Callable[[str, tuple[str, ...]], Annotations]
    splits: tuple[str, ...]


FORMATS = {
    "msrvtt": DatasetFormat("MSR-VTT", parse_msrvtt, ("train_9k", "train_7k", "test_1k")),
    "msvd": DatasetFormat("MSVD", parse_msvd, ("train", "val", "test")),
    "vatex": DatasetFormat("VATEX", parse_vatex, ("train", "val", "test")),
    "lsmdc": DatasetFormat("LSMDC", parse_lsmdc, ("train", "val", "test")),
    "didemo": DatasetFormat("DiDeMo", parse_didemo, ("train", "val", "test")),
}


@dataclass(frozen=True)
class Problem:
    """Something wrong with one video of one split.

    `kind` is `"missing_video"` (rows name a video with no file), `"unreadable_video"` (the file does not decode, is
    empty or has no frames; found with `check_videos=True`) or `"uncaptioned_video"` (a split list names a video that
    no caption describes).
    """

    split: str
    video_id: str
    kind: str
    detail: str


class DatasetIntegrityError(ValueError):
    """The annotations reference videos that are missing or unreadable; `problems` lists them all."""

    def __init__(self, message: str, problems: list[Problem]):
        super().__init__(message)
        self.problems = problems


def _features():
    from datasets import Features, Value

    return Features(
        {
            "video_id": Value("string"),
            "video_path": Value("string"),
            "caption": Value("string"),
            "video_index": Value("int32"),
            "start_time": Value("float32"),
            "end_time": Value("float32"),
        }
    )


def _strip_extension(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


def index_video_files(videos_dir: str) -> dict[str, str]:
    """Video files under `videos_dir` (recursively) by file name and by file name without its extension."""
    if not os.path.isdir(videos_dir):
        raise NotADirectoryError(f"videos folder {videos_dir!r} does not exist")
    files = {}
    for root, directories, names in os.walk(videos_dir):
        directories.sort()
        for name in sorted(names):
            if name.lower().endswith(VIDEO_EXTENSIONS):
                path = os.path.join(root, name)
                files.setdefault(name, path)
                files.setdefault(_strip_extension(name), path)
    return files


def resolve_video(video_id: str, files: dict[str, str]) -> str | None:
    """The file of `video_id`: by exact name, by name without extension, or (a name whose file was re-encoded to
    another container) by stem."""
    return files.get(video_id) or files.get(_strip_extension(video_id))


def probe_video(path: str) -> str | None:
    """None when the video opens and its first frame decodes; otherwise why not."""
    from ..processing_crosstvr import VideoDecodeError, read_video

    if os.path.getsize(path) == 0:
        return "the file is empty"
    try:
        read_video(path, num_frames=1)
    except (VideoDecodeError, ValueError) as error:
        return str(error)
    return None


def _format_problems(dataset: str, problems: list[Problem], limit: int = 10) -> str:
    lines = [f"{dataset}: {len(problems)} problem(s) with the annotations or videos:"]
    for kind, count in Counter(problem.kind for problem in problems).items():
        examples = [p for p in problems if p.kind == kind][:limit]
        listed = ", ".join(f"{p.video_id} ({p.split})" for p in examples)
        lines.append(f"  {count} {kind}: {listed}{', ...' if count > limit else ''}")
        lines.append(f"    e.g. {examples[0].detail}")
    return "\n".join(lines)


def _fingerprint(name, annotations_dir, videos_dir, files, splits, on_bad_video, check_videos) -> str:
    digest = hashlib.sha256()
    state = {
        "version": CACHE_VERSION,
        "name": name,
        "splits": splits,
        "on_bad_video": on_bad_video,
        "check_videos": check_videos,
        "annotations_dir": os.path.abspath(annotations_dir),
        "videos_dir": os.path.abspath(videos_dir),
    }
    digest.update(json.dumps(state, sort_keys=True).encode())
    annotation_files = sorted(
        (entry for entry in os.scandir(annotations_dir) if entry.is_file(follow_symlinks=True)),
        key=lambda entry: entry.name,
    )
    for entry in annotation_files:
        stat = entry.stat()
        digest.update(f"{entry.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    for path in sorted(set(files.values())):
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def _rows(records: list[CaptionRecord], paths: dict[str, str]) -> dict[str, list]:
    video_index = {}
    for record in records:
        video_index.setdefault(record.video_id, len(video_index))
    return {
        "video_id": [r.video_id for r in records],
        "video_path": [paths[r.video_id] for r in records],
        "caption": [r.caption for r in records],
        "video_index": [video_index[r.video_id] for r in records],
        "start_time": [r.start_time for r in records],
        "end_time": [r.end_time for r in records],
    }


def load_retrieval_dataset(
    name: str,
    annotations_dir: str | os.PathLike,
    videos_dir: str | os.PathLike,
    splits: list[str] | tuple[str, ...] | None = None,
    on_bad_video: str = "error",
    check_videos: bool = False,
    cache_dir: str | os.PathLike | None = None,
):
    """
    Load a text-video retrieval benchmark stored in its official layout (annotation files + a folder of videos).

    Args:
        name: `"msrvtt"`, `"msvd"`, `"vatex"`, `"lsmdc"` or `"didemo"`.
        annotations_dir: the folder with the annotation files (see `crosstvr.data.annotations`).
        videos_dir: the folder with the videos, searched recursively; a video is found by file name, or by file name
            without extension.
        splits: the splits to load (default: all of the format's; MSR-VTT has `train_9k`, `train_7k`, `test_1k`,
            the others `train`, `val`, `test`).
        on_bad_video: `"error"` raises [`DatasetIntegrityError`] listing every missing (and, with `check_videos`,
            unreadable) video; `"skip"` drops their rows and logs the same list as a warning.
        check_videos: decode the first frame of every referenced video while loading (cached with the dataset), so
            that unreadable files are handled by `on_bad_video` instead of failing later in a data-loader worker.
        cache_dir: where the Arrow files go (default: `$HF_DATASETS_CACHE/crosstvr`).

    Returns:
        `datasets.DatasetDict` with one row per (video, caption) pair: `video_id`, `video_path`, `caption`,
        `video_index` (the video's position among the split's distinct videos, for multi-caption evaluation),
        `start_time` and `end_time` (seconds, or None for the whole video). Decode frames lazily with
        [`crosstvr.data.VideoTextTransform`].
    """
    import datasets
    import pyarrow

    if name not in FORMATS:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(FORMATS)}")
    if on_bad_video not in BAD_VIDEO_POLICIES:
        raise ValueError(f"on_bad_video={on_bad_video!r} is not one of {BAD_VIDEO_POLICIES}")
    dataset_format = FORMATS[name]
    splits = tuple(dataset_format.splits if splits is None else splits)
    unknown = [split for split in splits if split not in dataset_format.splits]
    if unknown:
        raise ValueError(f"{dataset_format.name} has no split(s) {unknown}; it has {list(dataset_format.splits)}")
    annotations_dir, videos_dir = os.fspath(annotations_dir), os.fspath(videos_dir)
    if not os.path.isdir(annotations_dir):
        raise NotADirectoryError(f"annotations folder {annotations_dir!r} does not exist")
    files = index_video_files(videos_dir)

    cache_root = os.fspath(cache_dir) if cache_dir is not None else os.path.join(datasets.config.HF_DATASETS_CACHE, "crosstvr")
    fingerprint = _fingerprint(name, annotations_dir, videos_dir, files, splits, on_bad_video, check_videos)
    cache_path = os.path.join(cache_root, f"{name}-{fingerprint}")
    if os.path.isdir(cache_path):
        with open(os.path.join(cache_path, "problems.json"), encoding="utf-8") as file:
            problems = [Problem(**problem) for problem in json.load(file)]
        if problems:
            logger.warning("%s (rows dropped; cached)", _format_problems(dataset_format.name, problems))
        return datasets.load_from_disk(cache_path)

    annotations = dataset_format.parse(annotations_dir, splits)
    problems = [
        Problem(split, video_id, "uncaptioned_video", f"{video_id} is listed for {split} but no caption describes it")
        for split, video_ids in annotations.uncaptioned.items()
        for video_id in video_ids
    ]
    paths = {}
    for split, records in annotations.records.items():
        for video_id in dict.fromkeys(record.video_id for record in records):
            path = resolve_video(video_id, files)
            if path is None:
                detail = f"no video file named {video_id}[.ext] under {videos_dir}"
                problems.append(Problem(split, video_id, "missing_video", detail))
            else:
                paths[video_id] = path
    if check_videos:
        from tqdm.auto import tqdm

        unreadable = {}
        for video_id, path in tqdm(sorted(paths.items()), desc=f"checking {dataset_format.name} videos", unit="video"):
            reason = probe_video(path)
            if reason is not None:
                unreadable[video_id] = reason
        for split, records in annotations.records.items():
            for video_id in dict.fromkeys(record.video_id for record in records):
                if video_id in unreadable:
                    problems.append(Problem(split, video_id, "unreadable_video", unreadable[video_id]))
        for video_id in unreadable:
            del paths[video_id]

    if problems:
        message = _format_problems(dataset_format.name, problems)
        if on_bad_video == "error":
            raise DatasetIntegrityError(
                f"{message}\nFix the files, or pass on_bad_video='skip' to drop the affected rows.", problems
            )
        logger.warning("%s (rows dropped)", message)

    features = _features()
    info = datasets.DatasetInfo(description=f"{dataset_format.name} text-video retrieval", features=features)
    dataset_dict = datasets.DatasetDict(
        {
            # Columns as Arrow arrays: pyarrow converts them at C speed (given Python lists, from_dict encodes every
            # value in Python, twice as slow on MSR-VTT's 180,000 rows).
            split: datasets.Dataset.from_dict(
                {
                    name: pyarrow.array(values, type=features[name].pa_type)
                    for name, values in _rows([record for record in records if record.video_id in paths], paths).items()
                },
                features=features,
                info=info.copy(),
                split=split,
            )
            for split, records in annotations.records.items()
        }
    )
    # Write next to the final place and rename, so that an interrupted run never leaves a cache that loads wrong.
    staging = f"{cache_path}.partial-{os.getpid()}"
    dataset_dict.save_to_disk(staging)
    with open(os.path.join(staging, "problems.json"), "w", encoding="utf-8") as file:
        json.dump([asdict(problem) for problem in problems], file)
    try:
        os.replace(staging, cache_path)
    except OSError:  # another process finished the same cache first
        shutil.rmtree(staging, ignore_errors=True)
    return datasets.load_from_disk(cache_path)
