import os

import numpy as np
import pytest
import torch
from PIL import Image

from crosstvr import CrossTVRProcessor, VideoDecodeError, read_video, sample_frame_indices
from crosstvr.processing_crosstvr import _read_frames_with_pyav


def test_center_sampling_takes_segment_centres():
    assert sample_frame_indices(100, 4) == [12, 37, 62, 87]
    assert sample_frame_indices(100, 4, start=20, end=60) == [25, 35, 45, 55]


def test_random_sampling_stays_in_its_segment_and_is_seeded():
    first = sample_frame_indices(100, 4, "random", generator=torch.Generator().manual_seed(0))
    again = sample_frame_indices(100, 4, "random", generator=torch.Generator().manual_seed(0))
    assert first == again
    for segment, index in enumerate(first):
        assert 25 * segment <= index < 25 * (segment + 1)
    draws = {tuple(sample_frame_indices(100, 4, "random", generator=torch.Generator().manual_seed(s))) for s in range(5)}
    assert len(draws) > 1


def test_short_clips_yield_all_their_frames():
    assert sample_frame_indices(3, 8) == [0, 1, 2]
    with pytest.raises(ValueError, match="empty frame range"):
        sample_frame_indices(10, 4, start=12)
    with pytest.raises(ValueError, match="sampling='middle'"):
        sample_frame_indices(10, 4, "middle")


def test_read_video_decodes_the_requested_frames(media_dir):
    frames = read_video(os.path.join(media_dir, "red_circle_left.mp4"), 4)
    assert frames.shape == (4, 64, 64, 3) and frames.dtype == np.uint8
    # The red circle moves left: its mean column decreases over the sampled frames.
    red = (frames[..., 0] > 150) & (frames[..., 1] < 100)
    columns = [np.nonzero(mask)[1].mean() for mask in red]
    assert columns == sorted(columns, reverse=True)
    assert read_video(os.path.join(media_dir, "short.mp4"), 4).shape[0] == 2


def test_frame_sizes_decord_cannot_convert_are_decoded_with_pyav(media_dir):
    frames = read_video(os.path.join(media_dir, "odd_size.mp4"), 4)
    assert frames.shape == (4, 48, 48, 3)
    # The fallback decodes exactly what decord decodes where decord works.
    path = os.path.join(media_dir, "red_circle_left.mp4")
    np.testing.assert_array_equal(read_video(path, 4), _read_frames_with_pyav(path, [2, 6, 10, 14]))


def test_read_video_clip_times(media_dir):
    # 16 frames at 8 fps: [1 s, 2 s) is frames 8..15.
    path = os.path.join(media_dir, "blue_square_up.mp4")
    full = read_video(path, 16)
    clip = read_video(path, 4, start_time=1.0, end_time=2.0)
    np.testing.assert_array_equal(clip, full[[9, 11, 13, 15]])
    with pytest.raises(VideoDecodeError, match="starts at 5.0 s but the video lasts 2.00 s"):
        read_video(path, 4, start_time=5.0)


def write_numbered_video(path: str, keyframe_interval: int) -> str:
    """120 flat grey frames at 24 fps whose brightness is twice their index, H.264 with x264's default B-frames
    (non-reference frames to skip)."""
    import av

    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        stream.codec_context.gop_size = keyframe_interval
        for index in range(120):
            frame = np.full((64, 64, 3), 2 * index, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


@pytest.fixture(scope="module")
def numbered_video(tmp_path_factory) -> str:
    return write_numbered_video(os.fspath(tmp_path_factory.mktemp("numbered") / "numbered.mp4"), 40)


def frame_numbers(frames: np.ndarray, video: str) -> list[int]:
    """Which frames of `video` these are, told by their brightness (every frame decoded with PyAV as the reference)."""
    brightness = _read_frames_with_pyav(video, list(range(120))).mean(axis=(1, 2, 3))
    assert (np.diff(brightness) > 0).all()
    return [int(np.abs(brightness - frame.mean()).argmin()) for frame in frames]


def reference_frame_numbers(video: str) -> np.ndarray:
    """The frames of `video` that libavcodec decodes with skip_frame=NONREF."""
    import av

    with av.open(video) as container:
        stream = container.streams.video[0]
        stream.codec_context.skip_frame = "NONREF"
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    return np.array(frame_numbers(np.stack(frames), video))


def test_reference_frame_decoding_takes_the_nearest_reference_frames(numbered_video):
    targets = sample_frame_indices(120, 12)
    # Exact decoding: the sampled frames themselves.
    assert frame_numbers(read_video(numbered_video, 12), numbered_video) == targets
    frames = read_video(numbered_video, 12, decoding="reference_frames")
    assert frames.shape == (12, 64, 64, 3) and frames.dtype == np.uint8
    numbers = frame_numbers(frames, numbered_video)
    assert numbers == sorted(set(numbers))  # distinct, in order
    offsets = [abs(number - target) for number, target in zip(numbers, targets)]
    assert max(offsets) <= 2 and any(offsets)  # some sampled frames were skipped and replaced by a neighbour


@pytest.mark.parametrize("num_threads", [1, 3])
@pytest.mark.parametrize("keyframe_interval", [10, 40, 250])
def test_reference_frame_decoding_jumps_to_keyframes_without_changing_the_frames(tmp_path, keyframe_interval,
                                                                                 num_threads):
    # With 4 samples 30 frames apart and keyframes every 10, decoding skips from each sample to the next keyframe
    # (and with several threads, decodes the stretches after different keyframes at once); the frames chosen must
    # still be the nearest of all reference frames, and the arrays the same in any number of threads.
    video = write_numbered_video(os.fspath(tmp_path / "video.mp4"), keyframe_interval)
    references = reference_frame_numbers(video)
    assert len(references) < 100  # non-reference frames exist
    targets = sample_frame_indices(120, 4)
    nearest = [int(references[np.abs(references - target).argmin()]) for target in targets]
    frames = read_video(video, 4, decoding="reference_frames", num_threads=num_threads)
    assert frame_numbers(frames, video) == nearest
    np.testing.assert_array_equal(frames, read_video(video, 4, decoding="reference_frames", num_threads=1))


def test_reference_frame_decoding_of_a_clip(numbered_video):
    # [2 s, 4 s) at 24 fps is frames 48..95; the decoder starts from the keyframe at 40.
    frames = read_video(numbered_video, 4, start_time=2.0, end_time=4.0, decoding="reference_frames")
    numbers = frame_numbers(frames, numbered_video)
    targets = sample_frame_indices(120, 4, start=48, end=96)
    assert all(abs(number - target) <= 2 for number, target in zip(numbers, targets))
    with pytest.raises(VideoDecodeError, match="starts at 9.0 s but the video lasts 5.00 s"):
        read_video(numbered_video, 4, start_time=9.0, decoding="reference_frames")


def test_reference_frame_decoding_of_short_clips_decodes_every_frame(media_dir, numbered_video):
    assert read_video(os.path.join(media_dir, "short.mp4"), 4, decoding="reference_frames").shape[0] == 2
    # 30 frames for 12 samples (under 4 per sample): nothing is skipped, so the samples are exact.
    numbers = frame_numbers(read_video(numbered_video, 12, end_time=1.25, decoding="reference_frames"), numbered_video)
    assert numbers == sample_frame_indices(120, 12, end=30)


@pytest.mark.parametrize("decoding", ["exact", "reference_frames"])
@pytest.mark.parametrize("name", ["corrupt.mp4", "empty.mp4", "notes.mp4"])
def test_unreadable_files_raise_an_error_naming_the_file(media_dir, name, decoding):
    with pytest.raises(VideoDecodeError, match=name):
        read_video(os.path.join(media_dir, name), 4, decoding=decoding)


def test_missing_file_and_unknown_decoding(media_dir):
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        read_video(os.path.join(media_dir, "missing.mp4"), 4)
    with pytest.raises(ValueError, match="decoding='fast' is not one of"):
        read_video(os.path.join(media_dir, "short.mp4"), 4, decoding="fast")


def test_processor_shapes_and_masks_for_files(tester, media_dir):
    processor = tester.get_processor()
    paths = [os.path.join(media_dir, name) for name in ("red_circle_left.mp4", "short.mp4")]
    inputs = processor(text=["a red circle moves left", "a yellow circle"], videos=paths)
    size = tester.image_size
    assert inputs["pixel_values"].shape == (2, tester.num_frames, 3, size, size)
    assert inputs["video_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert (inputs["pixel_values"][1, 2:] == 0).all()
    for key in ("input_ids", "attention_mask", "qformer_input_ids", "qformer_attention_mask"):
        assert inputs[key].shape == (2, tester.text_length)
    assert inputs["input_ids"][0, 0] == processor.tokenizer.bos_token_id
    assert inputs["qformer_input_ids"][0, 0] == processor.qformer_tokenizer.cls_token_id


def test_processor_accepts_decoded_frames(tester, frames):
    processor = tester.get_processor()
    as_array = processor(videos=frames)  # one (frames, H, W, C) array
    as_list = processor(videos=[list(frames)])  # a list of videos, each a list of arrays
    as_pil = processor(videos=[Image.fromarray(frame) for frame in frames])  # one video of PIL images
    batch = processor(videos=np.stack([frames, frames]))  # (videos, frames, H, W, C)
    for inputs in (as_array, as_list, as_pil):
        assert inputs["pixel_values"].shape == (1, tester.num_frames, 3, tester.image_size, tester.image_size)
        torch.testing.assert_close(inputs["pixel_values"], as_array["pixel_values"])
    assert batch["pixel_values"].shape[0] == 2
    # Ten frames into four: the segment centres 1, 3, 6, 8.
    expected = processor(videos=frames[[1, 3, 6, 8]])
    torch.testing.assert_close(as_array["pixel_values"], expected["pixel_values"])
    assert processor(videos=frames[:2])["video_mask"].tolist() == [[1, 1, 0, 0]]


def test_processor_truncates_long_text_and_can_refuse_to(tester):
    processor = tester.get_processor()
    long_text = " ".join(["red circle"] * 20)
    inputs = processor(text=long_text)
    assert inputs["input_ids"].shape == (1, tester.text_length)
    assert inputs["input_ids"][0, -1] == processor.tokenizer.eos_token_id  # EOS survives truncation
    with pytest.raises(ValueError, match="exceed max_text_length=8"):
        processor(text=long_text, truncation=False)


def test_processor_bad_inputs(tester, media_dir):
    processor = tester.get_processor()
    with pytest.raises(ValueError, match="needs `text`, `videos` or `images`"):
        processor()
    with pytest.raises(ValueError, match="`videos` or `images`, not both"):
        processor(videos=[np.zeros((3, 8, 8, 3), np.uint8)], images=[np.zeros((8, 8, 3), np.uint8)])
    with pytest.raises(ValueError, match="videos must be"):
        processor(videos=42)
    with pytest.raises(ValueError, match="text must be a string"):
        processor(text=[1, 2])
    with pytest.raises(VideoDecodeError, match="corrupt.mp4"):
        processor(videos=[os.path.join(media_dir, "corrupt.mp4")])
    with pytest.raises(ValueError, match="start_times / end_times apply to video files"):
        processor(videos=[np.zeros((3, 8, 8, 3), np.uint8)], start_times=[1.0])


def test_processor_save_load_round_trip(tester, tmp_path, frames):
    processor = tester.get_processor()
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "processing_crosstvr.py").exists()
    assert (tmp_path / "qformer_tokenizer").is_dir()
    loaded = CrossTVRProcessor.from_pretrained(tmp_path)
    assert (loaded.num_frames, loaded.max_text_length) == (tester.num_frames, tester.text_length)
    assert loaded.decoding == "exact"
    processor.decoding = "reference_frames"
    processor.save_pretrained(tmp_path)
    assert CrossTVRProcessor.from_pretrained(tmp_path).decoding == "reference_frames"
    with pytest.raises(ValueError, match="decoding='fast' is not one of"):
        CrossTVRProcessor(processor.image_processor, processor.tokenizer, processor.qformer_tokenizer, decoding="fast")
    inputs, loaded_inputs = processor(text="a red square", videos=frames), loaded(text="a red square", videos=frames)
    for key in inputs:
        torch.testing.assert_close(loaded_inputs[key], inputs[key])


def test_processor_routes_keywords_per_modality_and_refuses_unknown_ones(tester, frames):
    processor = tester.get_processor()
    normalised = processor(videos=frames)["pixel_values"]
    raw_flat = processor(videos=frames, do_normalize=False)["pixel_values"]
    raw_nested = processor(videos=frames, videos_kwargs={"do_normalize": False})["pixel_values"]
    torch.testing.assert_close(raw_flat, raw_nested)
    mean = torch.tensor(processor.image_processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_processor.image_std).view(3, 1, 1)
    torch.testing.assert_close(normalised, (raw_flat - mean) / std, atol=1e-5, rtol=1e-5)
    # Text keywords reach both tokenizers; video sampling keywords reach the sampler.
    text = processor(text=["a red square", "a blue circle moves left"], padding="longest")
    assert text["input_ids"].shape[1] < tester.text_length and text["qformer_input_ids"].shape[1] < tester.text_length
    two = processor(videos=frames, num_frames=2, sampling="random", generator=torch.Generator().manual_seed(0))
    assert two["pixel_values"].shape[1] == 2
    for bad, named in (
        ({"do_normalise": False}, "'do_normalise'"),
        ({"videos_kwargs": {"fps": 2}}, r"videos_kwargs\['fps'\]"),
        ({"text_kwargs": {"colour": 1}}, r"text_kwargs\['colour'\]"),
    ):
        with pytest.raises(TypeError, match=named):
            processor(text="a red square", videos=frames, **bad)


def test_images_are_one_frame_videos(tester, frames):
    processor = tester.get_processor()
    images = processor(images=[frames[0], Image.fromarray(frames[5])], do_normalize=False)
    assert images["pixel_values"].shape == (2, 1, 3, tester.image_size, tester.image_size)
    assert images["video_mask"].tolist() == [[1], [1]]
    single = processor(videos=[frames[5]], num_frames=1, do_normalize=False)["pixel_values"]
    torch.testing.assert_close(images["pixel_values"][1], single[0])


def test_sample_frames_mirrors_transformers_video_processors(tester):
    from transformers.video_utils import VideoMetadata

    processor = tester.get_processor()
    metadata = VideoMetadata(total_num_frames=40, fps=8.0)
    assert processor.sample_frames(metadata) == sample_frame_indices(40, tester.num_frames)
    assert processor.sample_frames(metadata, num_frames=2) == [10, 30]
    generator = torch.Generator().manual_seed(0)
    random = processor.sample_frames(metadata, sampling="random", generator=generator)
    assert [index // 10 for index in random] == [0, 1, 2, 3]  # one frame in each of the 4 segments
