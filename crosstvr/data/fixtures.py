"""Tiny fixture datasets in the official on-disk formats of the five benchmarks, with generated videos.

Used by the tests, and by users who want to smoke-test a pipeline before pointing it at the real data:

```python
>>> from crosstvr.data import load_retrieval_dataset, write_fixture
>>> fixture = write_fixture("msrvtt", "/tmp/msrvtt-fixture")
>>> load_retrieval_dataset("msrvtt", fixture.annotations_dir, fixture.videos_dir)
```

Each video is a generated scene (a coloured shape crossing the frame); its captions describe it.
"""

import csv
import json
import os
import pickle
from dataclasses import dataclass

import numpy as np

from ..synthetic import MovingShape, render, sample_moving_shapes, write_video


@dataclass
class Fixture:
    """Where a fixture was written and what it contains: the videos of every split and each video's captions."""

    annotations_dir: str
    videos_dir: str
    splits: dict[str, list[str]]
    captions: dict[str, list[str]]


_TEMPLATES = (
    "a {colour} {shape} moves {direction}{adverb}",
    "the {colour} {shape} is moving {direction}{adverb}",
    "a {shape} that is {colour} goes {direction}{adverb}",
    "{colour} {shape} moving {direction}{adverb}",
    "there is a {colour} {shape} going {direction}{adverb}",
)
_ADVERBS = ("", " slowly", " steadily", " across the frame")


def describe(scene: MovingShape, count: int) -> list[str]:
    """`count` distinct captions of `scene` (at most 20)."""
    captions = [
        template.format(colour=scene.colour, shape=scene.shape, direction=scene.direction, adverb=adverb)
        for adverb in _ADVERBS
        for template in _TEMPLATES
    ]
    if count > len(captions):
        raise ValueError(f"at most {len(captions)} distinct captions per scene, asked for {count}")
    return captions[:count]


def _write_videos(videos_dir: str, video_files: dict[str, str], scenes: list[MovingShape]) -> None:
    """Render one scene per video to `videos_dir/<relative file>`."""
    for (video_id, relative_path), scene in zip(video_files.items(), scenes):
        path = os.path.join(videos_dir, relative_path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_video(path, render(scene, num_frames=16, size=64))


def _write_lines(path: str, lines: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as file:
        file.writelines(f"{line}\n" for line in lines)


def _write_json(path: str, data) -> None:
    with open(path, "w", encoding="utf-8") as file:
        json.dump(data, file)


def _msrvtt(annotations_dir, videos_dir, scenes):
    video_ids = [f"video{i}" for i in range(len(scenes))]
    captions = {video_id: describe(scene, 20) for video_id, scene in zip(video_ids, scenes)}
    splits = {"train_9k": video_ids[:9], "train_7k": video_ids[:7], "test_1k": video_ids[9:]}
    _write_json(
        os.path.join(annotations_dir, "MSRVTT_data.json"),
        {
            "info": {"year": 2016, "version": "1.0", "description": "crosstvr fixture"},
            "videos": [
                {"video_id": v, "id": i, "category": 0, "url": f"https://example.invalid/watch?v={v}",
                 "start time": 0.0, "end time": 2.0, "split": "train" if i < 9 else "test"}
                for i, v in enumerate(video_ids)
            ],
            "sentences": [
                {"caption": caption, "video_id": v, "sen_id": 20 * i + k}
                for i, v in enumerate(video_ids)
                for k, caption in enumerate(captions[v])
            ],
        },
    )
    for split, file_name in (("train_9k", "MSRVTT_train.9k.csv"), ("train_7k", "MSRVTT_train.7k.csv")):
        with open(os.path.join(annotations_dir, file_name), "w", encoding="utf-8", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["video_id"])
            writer.writerows([v] for v in splits[split])
    with open(os.path.join(annotations_dir, "MSRVTT_JSFUSION_test.csv"), "w", encoding="utf-8", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["key", "vid_key", "video_id", "sentence"])
        for k, v in enumerate(splits["test_1k"]):
            writer.writerow([f"ret{k}", f"msr{v[5:]}", v, captions[v][0]])
        captions.update({v: captions[v][:1] for v in splits["test_1k"]})  # one test caption per video
    _write_videos(videos_dir, {v: f"{v}.mp4" for v in video_ids}, scenes)
    return splits, captions


def _msvd(annotations_dir, videos_dir, scenes):
    video_ids = [f"clip{i:02d}XyZ_{5 * i}_{5 * i + 10}" for i in range(len(scenes))]
    captions = {v: describe(scene, 3 + i % 4) for i, (v, scene) in enumerate(zip(video_ids, scenes))}
    splits = {"train": video_ids[:4], "val": video_ids[4:6], "test": video_ids[6:]}
    # raw-captions.pkl holds token lists; only plain containers and strings, as the reader requires.
    with open(os.path.join(annotations_dir, "raw-captions.pkl"), "wb") as file:
        pickle.dump({v: [caption.split() for caption in captions[v]] for v in video_ids}, file)
    for split, ids in splits.items():
        _write_lines(os.path.join(annotations_dir, f"{split}_list.txt"), ids)
    _write_videos(videos_dir, {v: f"{v}.avi" for v in video_ids}, scenes)
    return splits, captions


def _vatex(annotations_dir, videos_dir, scenes):
    video_ids = [f"yt{i:02d}-AbCdEf_{10 * i:06d}_{10 * i + 10:06d}" for i in range(len(scenes))]
    captions = {v: describe(scene, 10) for v, scene in zip(video_ids, scenes)}
    training, validation = video_ids[:4], video_ids[4:]
    for file_name, ids in (("vatex_training_v1.0.json", training), ("vatex_validation_v1.0.json", validation)):
        _write_json(
            os.path.join(annotations_dir, file_name),
            [{"videoID": v, "enCap": captions[v], "chCap": ["一个视频"] * 10} for v in ids],
        )
    splits = {"train": training, "val": validation[:2], "test": validation[2:]}
    _write_lines(os.path.join(annotations_dir, "val_list.txt"), splits["val"])
    _write_lines(os.path.join(annotations_dir, "test_list.txt"), splits["test"])
    _write_videos(videos_dir, {v: f"{v}.mp4" for v in video_ids}, scenes)
    return splits, captions


def _lsmdc(annotations_dir, videos_dir, scenes):
    movies = ("0001_American_Fixture", "0002_Fixture_Returns")
    video_ids = [
        f"{movies[i % 2]}_00.0{i}.12.345-00.0{i}.15.678" for i in range(len(scenes))
    ]
    captions = {v: describe(scene, 1) for v, scene in zip(video_ids, scenes)}
    captions[video_ids[0]].append(describe(scenes[0], 2)[1])  # CLIP_IDs are not unique in the training file
    splits = {"train": video_ids[:4], "val": video_ids[4:6], "test": video_ids[6:]}
    files = {
        "train": "LSMDC16_annos_training.csv",
        "val": "LSMDC16_annos_val.csv",
        "test": "LSMDC16_challenge_1000_publictect.csv",
    }
    for split, ids in splits.items():
        _write_lines(
            os.path.join(annotations_dir, files[split]),
            [f"{v}\t00.00.01.000\t00.00.03.000\t00.00.00.900\t00.00.03.100\t{c}" for v in ids for c in captions[v]],
        )
    _write_videos(videos_dir, {v: os.path.join(v.rsplit("_00.", 1)[0], f"{v}.avi") for v in video_ids}, scenes)
    return splits, captions


def _didemo(annotations_dir, videos_dir, scenes):
    video_ids = [f"{1000 + i}@N00_{5000 + i}_a1b2c3.mp4" for i in range(len(scenes))]
    descriptions = {v: describe(scene, 4) for v, scene in zip(video_ids, scenes)}
    splits = {"train": video_ids[:3], "val": video_ids[3:5], "test": video_ids[5:]}
    rng = np.random.default_rng(0)
    for split, ids in splits.items():
        entries = []
        for v in ids:
            for k, description in enumerate(descriptions[v]):
                start = int(rng.integers(0, 6))
                times = [[start, min(start + int(rng.integers(0, 2)), 5)] for _ in range(4)]
                entries.append(
                    {"annotation_id": len(entries), "description": description, "times": times, "video": v,
                     "num_segments": 6, "dl_link": "https://example.invalid"}
                )
        _write_json(os.path.join(annotations_dir, f"{split}_data.json"), entries)
        _write_lines(os.path.join(annotations_dir, f"{split}_list.txt"), ids)
    _write_videos(videos_dir, {v: v for v in video_ids}, scenes)
    return splits, {v: [" ".join(descriptions[v])] for v in video_ids}


_WRITERS = {"msrvtt": (_msrvtt, 12), "msvd": (_msvd, 8), "vatex": (_vatex, 8), "lsmdc": (_lsmdc, 8), "didemo": (_didemo, 7)}


def write_fixture(name: str, directory: str | os.PathLike, seed: int = 0) -> Fixture:
    """
    Write a tiny `name` dataset (`"msrvtt"`, `"msvd"`, `"vatex"`, `"lsmdc"` or `"didemo"`) in its official layout
    under `directory/annotations` and `directory/videos`.

    Sizes: MSR-VTT 12 videos x 20 captions (train_9k: 9 videos, train_7k: 7, test_1k: 3 pairs); MSVD 8 videos with
    3-6 captions (4/2/2); VATEX 8 x 10 captions (4 training, 2 + 2 from validation as the HGR val/test); LSMDC 8 clips
    in two movie folders (4/2/2, one training clip with two sentences); DiDeMo 7 videos x 4 descriptions (3/2/2).
    """
    if name not in _WRITERS:
        raise ValueError(f"no fixture for {name!r}; choose from {sorted(_WRITERS)}")
    writer, num_videos = _WRITERS[name]
    annotations_dir = os.path.join(os.fspath(directory), "annotations")
    videos_dir = os.path.join(os.fspath(directory), "videos")
    os.makedirs(annotations_dir, exist_ok=True)
    os.makedirs(videos_dir, exist_ok=True)
    splits, captions = writer(annotations_dir, videos_dir, sample_moving_shapes(num_videos, seed))
    return Fixture(annotations_dir, videos_dir, splits, captions)
