import logging
import os
import pickle
import shutil

import pytest
import torch

from crosstvr.data import (
    FORMATS,
    AnnotationFormatError,
    DatasetIntegrityError,
    VideoTextTransform,
    load_msrvtt,
    load_msvd,
    load_plain_pickle,
    load_retrieval_dataset,
    unique_videos,
    write_fixture,
)
from crosstvr.processing_crosstvr import VideoDecodeError


@pytest.fixture(scope="session")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmarks")
    return {name: write_fixture(name, root / name) for name in FORMATS}


@pytest.fixture
def msvd_copy(fixtures, tmp_path):
    """A private copy of the MSVD fixture, for tests that damage it."""
    fixture = fixtures["msvd"]
    annotations, videos = tmp_path / "annotations", tmp_path / "videos"
    shutil.copytree(fixture.annotations_dir, annotations)
    shutil.copytree(fixture.videos_dir, videos)
    return annotations, videos, fixture


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_splits_and_caption_counts_follow_the_format(fixtures, tmp_path, name):
    fixture = fixtures[name]
    dataset = load_retrieval_dataset(name, fixture.annotations_dir, fixture.videos_dir, cache_dir=tmp_path)
    assert set(dataset) == set(FORMATS[name].splits)
    for split, videos in fixture.splits.items():
        rows = dataset[split]
        assert list(dict.fromkeys(rows["video_id"])) == videos
        assert rows.num_rows == sum(len(fixture.captions[v]) for v in videos)
        for video_id, caption, index in zip(rows["video_id"], rows["caption"], rows["video_index"]):
            assert caption in fixture.captions[video_id]
            assert index == videos.index(video_id)
        assert all(os.path.isfile(path) for path in rows["video_path"])
        assert rows.features["video_index"].dtype == "int32" and rows.features["start_time"].dtype == "float32"
        assert rows.cache_files, "splits must be memory-mapped Arrow files"


def test_msrvtt_training_splits_have_twenty_rows_per_video(fixtures, tmp_path):
    fixture = fixtures["msrvtt"]
    dataset = load_msrvtt(fixture.annotations_dir, fixture.videos_dir, cache_dir=tmp_path)
    for split, videos in (("train_9k", 9), ("train_7k", 7)):
        assert dataset[split].num_rows == 20 * videos
        assert sorted(set(dataset[split]["video_index"])) == list(range(videos))
    assert dataset["test_1k"].num_rows == 3 and len(set(dataset["test_1k"]["video_id"])) == 3


def test_didemo_yields_one_paragraph_per_video_over_its_first_31_seconds(fixtures, tmp_path):
    fixture = fixtures["didemo"]
    test = load_retrieval_dataset("didemo", fixture.annotations_dir, fixture.videos_dir, cache_dir=tmp_path)["test"]
    assert test.num_rows == len(set(test["video_id"])) == 2
    for row in test:
        assert row["caption"].count(" moves ") == 1 and len(row["caption"].split()) > 12  # four sentences joined
        assert (row["start_time"], row["end_time"]) == (0.0, 31.0)


def test_lsmdc_keeps_repeated_clip_ids_as_separate_rows(fixtures, tmp_path):
    fixture = fixtures["lsmdc"]
    train = load_retrieval_dataset("lsmdc", fixture.annotations_dir, fixture.videos_dir, cache_dir=tmp_path)["train"]
    assert train.num_rows == 5 and len(set(train["video_id"])) == 4
    assert all(os.sep + "0001_American_Fixture" + os.sep in path or "0002" in path for path in train["video_path"])


def test_lazy_decoding_gives_the_processor_shapes(fixtures, tmp_path, tester):
    fixture = fixtures["didemo"]
    train = load_retrieval_dataset("didemo", fixture.annotations_dir, fixture.videos_dir, cache_dir=tmp_path)["train"]
    batch = train.with_transform(VideoTextTransform(tester.get_processor()))[:2]
    size = tester.image_size
    assert batch["pixel_values"].shape == (2, tester.num_frames, 3, size, size)
    assert batch["video_mask"].shape == (2, tester.num_frames) and batch["video_mask"].all()
    assert batch["input_ids"].shape == batch["qformer_input_ids"].shape == (2, tester.text_length)
    assert batch["video_index"].tolist() == [0, 1]

    random_frames = train.with_transform(VideoTextTransform(tester.get_processor(), sampling="random"))
    torch.manual_seed(0)
    first = random_frames[:1]["pixel_values"]
    torch.manual_seed(0)
    torch.testing.assert_close(random_frames[:1]["pixel_values"], first)
    draws = []
    for seed in range(4):
        torch.manual_seed(seed)
        draws.append(random_frames[:1]["pixel_values"])
    assert any(not torch.equal(draw, draws[0]) for draw in draws[1:])


def test_unique_videos_selects_one_row_per_video(fixtures, tmp_path, tester):
    fixture = fixtures["vatex"]
    test = load_retrieval_dataset("vatex", fixture.annotations_dir, fixture.videos_dir, cache_dir=tmp_path)["test"]
    videos = unique_videos(test)
    assert videos["video_id"] == fixture.splits["test"] and videos["video_index"] == [0, 1]
    decoded = unique_videos(test.with_transform(VideoTextTransform(tester.get_processor())))
    assert len(decoded) == 2 and decoded[:2]["video_index"].tolist() == [0, 1]


def test_missing_videos_fail_with_every_id_or_are_skipped(msvd_copy, tmp_path, caplog):
    annotations, videos, fixture = msvd_copy
    gone = fixture.splits["test"][0]
    os.remove(videos / f"{gone}.avi")
    with pytest.raises(DatasetIntegrityError, match=rf"1 missing_video: {gone} \(test\)") as error:
        load_msvd(annotations, videos, cache_dir=tmp_path / "cache")
    assert [(p.split, p.video_id, p.kind) for p in error.value.problems] == [("test", gone, "missing_video")]
    assert "on_bad_video='skip'" in str(error.value)

    with caplog.at_level(logging.WARNING, logger="crosstvr.data.builder"):
        dataset = load_msvd(annotations, videos, on_bad_video="skip", cache_dir=tmp_path / "cache")
    assert gone not in dataset["test"]["video_id"]
    assert dataset["test"].num_rows == len(fixture.captions[fixture.splits["test"][1]])
    assert f"1 missing_video: {gone} (test)" in caplog.text


def test_unreadable_videos_are_found_when_checked(msvd_copy, tmp_path):
    annotations, videos, fixture = msvd_copy
    corrupt, empty = fixture.splits["train"][:2]
    (videos / f"{corrupt}.avi").write_bytes(b"\x00garbage" * 100)
    (videos / f"{empty}.avi").write_bytes(b"")
    with pytest.raises(DatasetIntegrityError, match="2 unreadable_video") as error:
        load_msvd(annotations, videos, check_videos=True, cache_dir=tmp_path / "cache")
    reasons = {p.video_id: p.detail for p in error.value.problems}
    assert "could not be decoded" in reasons[corrupt] and reasons[empty] == "the file is empty"

    dataset = load_msvd(annotations, videos, check_videos=True, on_bad_video="skip", cache_dir=tmp_path / "cache")
    assert set(dataset["train"]["video_id"]) == set(fixture.splits["train"][2:])
    assert dataset["test"].num_rows > 0  # the other splits are untouched


def test_undetected_corrupt_video_fails_in_the_transform_with_its_name(msvd_copy, tmp_path, tester):
    annotations, videos, fixture = msvd_copy
    corrupt = fixture.splits["val"][0]
    (videos / f"{corrupt}.avi").write_bytes(b"\x00garbage" * 100)
    val = load_msvd(annotations, videos, splits=["val"], cache_dir=tmp_path / "cache")["val"]
    with pytest.raises(VideoDecodeError, match=rf"{corrupt}\.avi.*{corrupt}.*check_videos=True"):
        val.with_transform(VideoTextTransform(tester.get_processor()))[:1]


def test_listed_video_without_captions_is_reported(msvd_copy, tmp_path):
    annotations, videos, _ = msvd_copy
    with open(annotations / "val_list.txt", "a") as file:
        file.write("no_such_clip\n")
    with pytest.raises(DatasetIntegrityError, match=r"1 uncaptioned_video: no_such_clip \(val\)"):
        load_msvd(annotations, videos, cache_dir=tmp_path / "cache")


class _RunsCode:
    def __reduce__(self):
        return (os.mkdir, ("/tmp/crosstvr-pickle-was-executed",))


def test_msvd_pickle_reader_refuses_code(msvd_copy, tmp_path):
    annotations, videos, _ = msvd_copy
    marker = "/tmp/crosstvr-pickle-was-executed"
    shutil.rmtree(marker, ignore_errors=True)
    (annotations / "raw-captions.pkl").write_bytes(pickle.dumps({"clip": [["a", "cat"]], "evil": _RunsCode()}))
    with pytest.raises(AnnotationFormatError, match="refusing to load posix.mkdir"):
        load_msvd(annotations, videos, cache_dir=tmp_path / "cache")
    assert not os.path.exists(marker)
    # Plain containers and strings load.
    (annotations / "plain.pkl").write_bytes(pickle.dumps({"clip": [["a", "cat"]], "n": (1, 2.5)}))
    assert load_plain_pickle(str(annotations / "plain.pkl")) == {"clip": [["a", "cat"]], "n": (1, 2.5)}


def test_msvd_json_captions_are_an_equivalent_of_the_pickle(msvd_copy, tmp_path):
    annotations, videos, _ = msvd_copy
    from_pickle = load_msvd(annotations, videos, cache_dir=tmp_path / "a")
    captions = load_plain_pickle(str(annotations / "raw-captions.pkl"))
    os.remove(annotations / "raw-captions.pkl")
    import json

    (annotations / "raw-captions.json").write_text(json.dumps(captions))
    from_json = load_msvd(annotations, videos, cache_dir=tmp_path / "b")
    for split in from_pickle:
        assert from_json[split]["caption"] == from_pickle[split]["caption"]


def test_cache_is_reused_and_invalidated_by_changed_annotations(msvd_copy, tmp_path):
    annotations, videos, fixture = msvd_copy
    cache = tmp_path / "cache"
    first = load_msvd(annotations, videos, cache_dir=cache)
    again = load_msvd(annotations, videos, cache_dir=cache)
    assert again["train"].cache_files == first["train"].cache_files
    (annotations / "train_list.txt").write_text("\n".join(fixture.splits["train"][:2]) + "\n")
    changed = load_msvd(annotations, videos, cache_dir=cache)
    assert set(changed["train"]["video_id"]) == set(fixture.splits["train"][:2])
    assert not any(name.endswith(f".partial-{os.getpid()}") for name in os.listdir(cache))


def test_bad_arguments_and_files(fixtures, tmp_path):
    fixture = fixtures["lsmdc"]
    with pytest.raises(ValueError, match="unknown dataset 'kinetics'"):
        load_retrieval_dataset("kinetics", fixture.annotations_dir, fixture.videos_dir)
    with pytest.raises(ValueError, match=r"has no split\(s\) \['test_1k'\]"):
        load_retrieval_dataset("lsmdc", fixture.annotations_dir, fixture.videos_dir, splits=["test_1k"])
    with pytest.raises(ValueError, match="on_bad_video='ignore'"):
        load_retrieval_dataset("lsmdc", fixture.annotations_dir, fixture.videos_dir, on_bad_video="ignore")
    with pytest.raises(NotADirectoryError, match="videos folder"):
        load_retrieval_dataset("lsmdc", fixture.annotations_dir, tmp_path / "nowhere")
    with pytest.raises(AnnotationFormatError, match="MSRVTT_data.json"):
        load_retrieval_dataset("msrvtt", tmp_path, fixture.videos_dir, cache_dir=tmp_path / "cache")
    broken = tmp_path / "lsmdc"
    shutil.copytree(fixture.annotations_dir, broken)
    with open(broken / "LSMDC16_annos_val.csv", "a") as file:
        file.write("clip_without_enough_fields\tand a sentence\n")
    with pytest.raises(AnnotationFormatError, match=r"LSMDC16_annos_val.csv:3: expected 6 tab-separated fields"):
        load_retrieval_dataset("lsmdc", broken, fixture.videos_dir, cache_dir=tmp_path / "cache")


def test_random_frame_sampling_does_not_depend_on_where_the_dataset_lies(tmp_path):
    from crosstvr.default_model import build_tiny_processor

    write_fixture("msvd", tmp_path / "here")
    shutil.copytree(tmp_path / "here", tmp_path / "elsewhere")
    transform = VideoTextTransform(build_tiny_processor(), sampling="random", seed=3)
    pixels = []
    for root in ("here", "elsewhere"):
        rows = load_retrieval_dataset("msvd", str(tmp_path / root / "annotations"), str(tmp_path / root / "videos"),
                                      splits=["train"])["train"]
        pixels.append(transform(rows[:6])["pixel_values"])
    assert torch.equal(pixels[0], pixels[1])
