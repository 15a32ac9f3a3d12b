"""Parsers of the benchmark annotation formats distributed by the CLIP4Clip family of repositories.

One parser per format, all returning the same [`Annotations`]: caption records per split, and the listed videos that
have no caption. Everything else (finding video files, reporting problems, Arrow storage) is shared by
`crosstvr.data.builder`.

Formats (file names as distributed; where two names are given, either is accepted):

- MSR-VTT: `MSRVTT_data.json` (`{"videos": [...], "sentences": [{"video_id", "caption"}, ...]}`),
  `MSRVTT_train.9k.csv` / `msrvtt_train_9k.csv` and `MSRVTT_train.7k.csv` / `msrvtt_train_7k.csv` (column
  `video_id`; every caption of a listed video is a training row), `MSRVTT_JSFUSION_test.csv` (columns `key, vid_key,
  video_id, sentence`: the 1,000 test pairs of split 1k-A).
- MSVD: `raw-captions.pkl` (`{video_id: [[token, ...], ...]}`, read by a restricted unpickler) or an equivalent
  `raw-captions.json`, and `train_list.txt`, `val_list.txt`, `test_list.txt` (one video id per line).
- VATEX: the official `vatex_training_v1.0.json` and `vatex_validation_v1.0.json` (`[{"videoID", "enCap": [...]}]`)
  or the CLIP4Clip-family `ref_captions.json` (`{video_id: [caption, ...]}`); the HGR split as `val_list.txt` and
  `test_list.txt` (1,500 ids each, from the official validation set) and an optional `train_list.txt` (default: the
  whole official training set, 25,991 videos).
- LSMDC: `LSMDC16_annos_training.csv`, `LSMDC16_annos_val.csv`, `LSMDC16_challenge_1000_publictect.csv`, tab
  separated `CLIP_ID, START_ALIGNED, END_ALIGNED, START_EXTRACTED, END_EXTRACTED, SENTENCE` (the times locate the
  clip in its movie; the clip files are already cut, so they are not used).
- DiDeMo: `train_data.json`, `val_data.json`, `test_data.json` (`[{"video", "description", "times"}, ...]`) and,
  optionally, `train_list.txt`, `val_list.txt`, `test_list.txt`. As in the paper (and CLIP4Clip), all descriptions of
  a video are concatenated into one paragraph query over the first 31 s of the video (DiDeMo annotates the first
  30 s, in 5 s chunks).
"""

import csv
import json
import os
import pickle
from collections import defaultdict
from dataclasses import dataclass, field
from typing import NamedTuple


class CaptionRecord(NamedTuple):
    """One (video, caption) pair of a split. `video_id` is what the videos folder is searched for: a file stem, or a
    full file name (DiDeMo)."""

    video_id: str
    caption: str
    start_time: float | None = None
    end_time: float | None = None


@dataclass
class Annotations:
    """Caption records per split, in annotation order, and per split the listed videos without any caption."""

    records: dict[str, list[CaptionRecord]]
    uncaptioned: dict[str, list[str]] = field(default_factory=dict)


class AnnotationFormatError(ValueError):
    """An annotation file is missing or does not follow its format."""


def find_file(directory: str, dataset: str, *names: str) -> str:
    """The first of `names` present in `directory`, or an error saying which files the format needs."""
    for name in names:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise AnnotationFormatError(
        f"{dataset}: none of {', '.join(names)} is in {directory!r}; see `crosstvr.data.annotations` for the "
        "expected files (as distributed with CLIP4Clip)."
    )


def read_id_list(path: str) -> list[str]:
    """One id per line; blank lines are ignored."""
    with open(path, encoding="utf-8") as file:
        return [line.strip() for line in file if line.strip()]


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except json.JSONDecodeError as error:
        raise AnnotationFormatError(f"{path} is not valid JSON: {error}") from error


class _PlainDataUnpickler(pickle.Unpickler):
    """Admits only what pickle builds without importing anything: dicts, lists, tuples, strings and numbers."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: caption pickles may only hold plain dicts, lists and strings"
        )


def load_plain_pickle(path: str):
    """Read a pickle of plain containers and strings without ever running code from it (MSVD's raw-captions.pkl)."""
    with open(path, "rb") as file:
        try:
            return _PlainDataUnpickler(file).load()
        except pickle.UnpicklingError as error:
            raise AnnotationFormatError(f"{path}: {error}") from error


def _records_per_video(video_ids: list[str], captions: dict[str, list[str]]) -> tuple[list[CaptionRecord], list[str]]:
    """Every caption of every listed video, in list order, and the listed videos that have none."""
    records, uncaptioned = [], []
    for video_id in video_ids:
        video_captions = captions.get(video_id, [])
        if not video_captions:
            uncaptioned.append(video_id)
        records.extend(CaptionRecord(video_id, caption) for caption in video_captions)
    return records, uncaptioned


def _split_lists(directory: str, dataset: str, files: dict[str, tuple[str, ...]], splits) -> dict[str, list[str]]:
    return {split: read_id_list(find_file(directory, dataset, *files[split])) for split in splits}


def _build(per_split: dict[str, tuple[list[CaptionRecord], list[str]]]) -> Annotations:
    return Annotations(
        records={split: records for split, (records, _) in per_split.items()},
        uncaptioned={split: missing for split, (_, missing) in per_split.items() if missing},
    )


def parse_msrvtt(directory: str, splits: tuple[str, ...]) -> Annotations:
    path = find_file(directory, "MSR-VTT", "MSRVTT_data.json")
    data = _read_json(path)
    if not isinstance(data, dict) or "sentences" not in data:
        raise AnnotationFormatError(f"{path} has no 'sentences' list of {{'video_id', 'caption'}} entries")
    per_split = {}
    train_files = {
        "train_9k": ("MSRVTT_train.9k.csv", "msrvtt_train_9k.csv"),
        "train_7k": ("MSRVTT_train.7k.csv", "msrvtt_train_7k.csv"),
    }
    if any(split in train_files for split in splits):
        captions = defaultdict(list)
        for sentence in data["sentences"]:
            captions[sentence["video_id"]].append(sentence["caption"])
        for split in (s for s in splits if s in train_files):
            with open(find_file(directory, "MSR-VTT", *train_files[split]), encoding="utf-8", newline="") as file:
                video_ids = [row["video_id"] for row in csv.DictReader(file)]
            per_split[split] = _records_per_video(video_ids, captions)
    if "test_1k" in splits:
        with open(find_file(directory, "MSR-VTT", "MSRVTT_JSFUSION_test.csv"), encoding="utf-8", newline="") as file:
            per_split["test_1k"] = ([CaptionRecord(row["video_id"], row["sentence"]) for row in csv.DictReader(file)], [])
    return _build(per_split)


def parse_msvd(directory: str, splits: tuple[str, ...]) -> Annotations:
    try:
        raw = _read_json(find_file(directory, "MSVD", "raw-captions.json"))
    except AnnotationFormatError:
        raw = load_plain_pickle(find_file(directory, "MSVD", "raw-captions.pkl", "raw-captions.json"))
    if not isinstance(raw, dict):
        raise AnnotationFormatError(f"MSVD raw captions must map video ids to caption lists, got {type(raw).__name__}")
    # Captions are token lists in raw-captions.pkl; CLIP4Clip joins them with spaces.
    captions = {
        video_id: [caption if isinstance(caption, str) else " ".join(caption) for caption in video_captions]
        for video_id, video_captions in raw.items()
    }
    lists = _split_lists(
        directory, "MSVD", {s: (f"{s}_list.txt",) for s in ("train", "val", "test")}, splits
    )
    return _build({split: _records_per_video(lists[split], captions) for split in splits})


def parse_vatex(directory: str, splits: tuple[str, ...]) -> Annotations:
    official = [os.path.join(directory, f"vatex_{part}_v1.0.json") for part in ("training", "validation")]
    if any(os.path.isfile(path) for path in official):
        by_part = {}
        for part, path in zip(("training", "validation"), official):
            entries = _read_json(path) if os.path.isfile(path) else []
            by_part[part] = {entry["videoID"]: entry["enCap"] for entry in entries}
        captions = {**by_part["training"], **by_part["validation"]}
        default_train = list(by_part["training"])
    else:
        captions = _read_json(find_file(directory, "VATEX", "vatex_training_v1.0.json", "ref_captions.json"))
        default_train = None
    video_ids = {}
    for split in splits:
        list_path = os.path.join(directory, f"{split}_list.txt")
        if os.path.isfile(list_path):
            video_ids[split] = read_id_list(list_path)
        elif split == "train" and default_train is not None:
            video_ids[split] = default_train
        else:
            raise AnnotationFormatError(
                f"VATEX: {split}_list.txt is missing from {directory!r}; the {split} split of the HGR protocol is a "
                "list of video ids (val/test: 1,500 each from the official validation set)."
            )
    return _build({split: _records_per_video(video_ids[split], captions) for split in splits})


def parse_lsmdc(directory: str, splits: tuple[str, ...]) -> Annotations:
    files = {
        "train": "LSMDC16_annos_training.csv",
        "val": "LSMDC16_annos_val.csv",
        "test": "LSMDC16_challenge_1000_publictect.csv",
    }
    per_split = {}
    for split in splits:
        path = find_file(directory, "LSMDC", files[split])
        records = []
        with open(path, encoding="utf-8") as file:
            for line_number, line in enumerate(file, start=1):
                if not line.strip():
                    continue
                fields = line.rstrip("\n").split("\t")
                if len(fields) != 6:
                    raise AnnotationFormatError(
                        f"{path}:{line_number}: expected 6 tab-separated fields (CLIP_ID, START_ALIGNED, END_ALIGNED, "
                        f"START_EXTRACTED, END_EXTRACTED, SENTENCE), got {len(fields)}"
                    )
                records.append(CaptionRecord(fields[0], fields[5]))
        per_split[split] = (records, [])
    return _build(per_split)


# DiDeMo annotates the first 30 s of a video; CLIP4Clip reads [0, 31) s for the paragraph query.
DIDEMO_CLIP_END = 31.0


def parse_didemo(directory: str, splits: tuple[str, ...]) -> Annotations:
    per_split = {}
    for split in splits:
        descriptions = defaultdict(list)
        for entry in _read_json(find_file(directory, "DiDeMo", f"{split}_data.json")):
            descriptions[entry["video"]].append(entry["description"])
        list_path = os.path.join(directory, f"{split}_list.txt")
        video_ids = read_id_list(list_path) if os.path.isfile(list_path) else list(descriptions)
        records, uncaptioned = [], []
        for video_id in video_ids:
            if descriptions.get(video_id):
                records.append(CaptionRecord(video_id, " ".join(descriptions[video_id]), 0.0, DIDEMO_CLIP_END))
            else:
                uncaptioned.append(video_id)
        per_split[split] = (records, uncaptioned)
    return _build(per_split)
