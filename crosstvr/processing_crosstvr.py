# Copyright 2026 The crosstvr authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Processor class for CrossTVR: frame sampling, the CLIP image processor, the CLIP tokenizer and the Q-Former tokenizer.

This file is Hub-portable: it imports only the standard library, torch and `transformers`; decord, which reads video
files, is imported when a video file is read.
"""

import bisect
import os
from collections.abc import Iterable, Iterator
from queue import Empty, SimpleQueue

import torch
from transformers import BatchFeature, Pipeline
from transformers.processing_utils import ImagesKwargs, ProcessingKwargs, ProcessorMixin, TextKwargs, Unpack, VideosKwargs
from transformers.video_utils import VideoMetadata


SAMPLING_MODES = ("center", "random")
# "exact": decode the sampled frames themselves (decord). "reference_frames": decode only reference frames and take
# the nearest one to each sampled frame (PyAV with libavcodec's skip_frame=NONREF), see `read_video`.
DECODING_MODES = ("exact", "reference_frames")
# Below this many frames per sampled frame, "reference_frames" decodes every frame, so that samples stay distinct.
MIN_FRAMES_PER_SAMPLE_TO_SKIP = 4


# What the processor needs beyond torch and transformers, as one install line (the Hub's remote code cannot declare
# dependencies, so they are checked up front and named together).
REQUIREMENTS = (
    "CrossTVRProcessor needs Pillow to process frames and decord (or PyAV, with decoding='reference_frames') to read "
    "video files: `pip install pillow decord av`."
)


def check_requirements() -> None:
    """Raise an ImportError naming the requirements when Pillow, which every frame goes through, is missing (video
    files are decoded, and decord or PyAV imported, only when one is read)."""
    try:
        import PIL.Image  # noqa: F401
    except ImportError as error:
        raise ImportError(f"{REQUIREMENTS} Pillow is missing here.") from error


class VideoDecodeError(ValueError):
    """A video file exists but cannot be decoded (corrupt, empty, or not a video)."""


def sample_frame_indices(
    num_video_frames: int,
    num_frames: int,
    sampling: str = "center",
    start: int = 0,
    end: int | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """
    Uniform frame sampling (TSN-style segments, as in the CLIP4Clip family): the frames `[start, end)` are split into
    `num_frames` equal segments and one frame is taken per segment, the segment's centre (`sampling="center"`, for
    evaluation) or a uniformly random frame of it (`sampling="random"`, for training). A clip shorter than `num_frames`
    yields all its frames; the caller pads the rest.

    Returns:
        Increasing frame indices, at most `num_frames` of them.
    """
    if sampling not in SAMPLING_MODES:
        raise ValueError(f"sampling={sampling!r} is not one of {SAMPLING_MODES}")
    end = num_video_frames if end is None else min(end, num_video_frames)
    start = max(start, 0)
    length = end - start
    if length <= 0:
        raise ValueError(f"empty frame range [{start}, {end}) in a video of {num_video_frames} frames")
    if length <= num_frames:
        return list(range(start, end))
    segment = length / num_frames
    if sampling == "center":
        offsets = [0.5] * num_frames
    else:
        offsets = torch.rand(num_frames, generator=generator).tolist()
    return [start + min(int((i + offset) * segment), length - 1) for i, offset in enumerate(offsets)]


def read_video(
    path: str | os.PathLike,
    num_frames: int,
    sampling: str = "center",
    start_time: float | None = None,
    end_time: float | None = None,
    generator: torch.Generator | None = None,
    num_threads: int = 0,
    decoding: str = "exact",
):
    """
    Decode `num_frames` uniformly sampled RGB frames of a video file (see [`sample_frame_indices`]), optionally from
    the clip `[start_time, end_time)` in seconds (LSMDC, DiDeMo).

    Two decoding modes:

    - `"exact"` (default): decord decodes the sampled frames themselves. Between keyframes, which are often 250
      frames apart, that still means decoding nearly every frame.
    - `"reference_frames"`: PyAV decodes the clip skipping the frames that no other frame references (libavcodec's
      `skip_frame=NONREF`: most B-frames) and jumping from each sampled frame to the keyframe before the next one
      where there is one in between; each sampled index gets the nearest reference frame, at most 2 frames away with
      x264's default 3 B-frames. The chosen frames are those a full pass would choose; about a third of the frames
      are decoded, at 2x the speed of `"exact"` in one thread. The stretches from a keyframe to the sampled frames
      after it are independent and are decoded in `num_threads` threads (libavcodec's slice threading does nothing
      for the common one-slice H.264 frames). The frame count comes from the container's metadata. Clips with fewer
      than `MIN_FRAMES_PER_SAMPLE_TO_SKIP` frames per sampled frame decode every frame, so samples stay distinct.

    `num_threads`: decoder threads; 0 (default) lets decord choose, and gives `"reference_frames"` one thread per core
    the process may use.

    Returns:
        A `(frames, height, width, 3)` uint8 array with at most `num_frames` frames.

    Raises:
        FileNotFoundError: the file does not exist.
        VideoDecodeError: the file cannot be decoded, has no frames, or the clip lies outside the video.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video file {path!r} does not exist")
    if decoding not in DECODING_MODES:
        raise ValueError(f"decoding={decoding!r} is not one of {DECODING_MODES}")
    if decoding == "reference_frames":
        return _read_nearest_reference_frames(path, num_frames, sampling, start_time, end_time, generator, num_threads)
    try:
        import decord
    except ImportError as error:
        raise ImportError(f"{REQUIREMENTS} decord is missing here.") from error
    try:
        reader = decord.VideoReader(path, num_threads=num_threads)
        num_video_frames = len(reader)
        fps = reader.get_avg_fps()
    except (RuntimeError, decord.DECORDError) as error:
        raise VideoDecodeError(f"video {path!r} could not be decoded: {str(error).splitlines()[0]}") from error
    if num_video_frames == 0:
        raise VideoDecodeError(f"video {path!r} has no frames")
    _, _, indices = _clip_frame_indices(
        path, num_video_frames, fps, num_frames, sampling, start_time, end_time, generator
    )
    try:
        return reader.get_batch(indices).asnumpy()
    except (RuntimeError, decord.DECORDError) as error:
        message = str(error).splitlines()[0]
        if "from_size == to_size" not in message:
            raise VideoDecodeError(f"video {path!r} could not be decoded: {message}") from error
    # decord 0.6 mis-sizes the frames of some geometries (e.g. 48x48 or 72x40 px) although the stream is fine.
    return _read_frames_with_pyav(path, indices)


def _read_frames_with_pyav(path: str, indices: list[int]):
    """The frames `indices` of a video decoded with PyAV, in presentation order (decord's fallback)."""
    try:
        import av
    except ImportError as error:
        raise VideoDecodeError(
            f"video {path!r}: decord cannot convert frames of this size; `pip install av` to decode it with PyAV"
        ) from error
    wanted, frames = set(indices), {}
    try:
        with av.open(path) as container:
            for index, frame in enumerate(container.decode(video=0)):
                if index in wanted:
                    frames[index] = frame.to_ndarray(format="rgb24")
                if index >= indices[-1]:
                    break
    except av.FFmpegError as error:
        raise VideoDecodeError(f"video {path!r} could not be decoded: {error}") from error
    if len(frames) < len(wanted):
        raise VideoDecodeError(f"video {path!r}: PyAV decoded fewer frames than the container announced")
    return torch.stack([torch.from_numpy(frames[index]) for index in indices]).numpy()


def _clip_frame_indices(
    path: str, num_video_frames: int, fps: float, num_frames: int, sampling, start_time, end_time, generator
) -> tuple[int, int, list[int]]:
    """The clip `[start_time, end_time)` seconds as frames `[start, end)` of the video, and the frames sampled from
    it (see [`sample_frame_indices`])."""
    start = 0 if start_time is None else int(start_time * fps)
    end = num_video_frames if end_time is None else min(max(int(end_time * fps), start + 1), num_video_frames)
    if start >= num_video_frames:
        raise VideoDecodeError(
            f"video {path!r}: the clip starts at {start_time} s but the video lasts {num_video_frames / fps:.2f} s"
        )
    return start, end, sample_frame_indices(num_video_frames, num_frames, sampling, start, end, generator)


def _import_av(path: str):
    try:
        import av
    except ImportError as error:
        raise ImportError(f"Decoding {path!r} this way needs PyAV: `pip install av`.") from error
    return av


def _read_nearest_reference_frames(path, num_frames, sampling, start_time, end_time, generator, num_threads):
    """`read_video(..., decoding="reference_frames")`: skips non-reference frames and jumps to keyframes; the stretches
    from a keyframe to the sampled frames after it are decoded in `num_threads` threads (0: one per usable core)."""
    av = _import_av(path)
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoDecodeError(f"video {path!r} has no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            if stream.duration:
                duration = float(stream.duration * stream.time_base)
            else:
                duration = (container.duration or 0) / av.time_base
            num_video_frames = stream.frames or int(round(duration * fps))
            if num_video_frames <= 0 or fps <= 0:
                raise VideoDecodeError(f"video {path!r} has no frames (or no frame rate) in its metadata")
            start, end, indices = _clip_frame_indices(
                path, num_video_frames, fps, num_frames, sampling, start_time, end_time, generator
            )
            skip_non_reference = end - start >= MIN_FRAMES_PER_SAMPLE_TO_SKIP * num_frames
            first_pts = stream.start_time or 0
            if start > 0:  # to the keyframe before the clip
                container.seek(first_pts + int(start / fps / stream.time_base), stream=stream, backward=True)

            # The frame index of a timestamp, (pts - first_pts) * time_base * fps; the integer product over the
            # denominator is the correctly rounded float(Fraction) without a Fraction per frame (8 % of the time).
            numerator, denominator = stream.time_base.numerator, stream.time_base.denominator

            def position(pts: int) -> float:
                return (pts - first_pts) * numerator / denominator * fps

            packets = _packets_through(container, stream, indices[-1], position)
            segments = _keyframe_segments(packets, indices, position)
            num_threads = min(len(segments), num_threads or _usable_cores())

            def decode_segments(codec, numbers: Iterable[int]) -> None:
                if skip_non_reference:
                    codec.skip_frame = "NONREF"
                # Slice threading (libavcodec's fastest here) in one thread; with several, they use the cores.
                codec.thread_type = "SLICE"
                if num_threads > 1:
                    codec.thread_count = 1
                for number in numbers:
                    first_packet, segment_indices = segments[number]
                    codec.flush_buffers()
                    frames = _decode_towards(codec, packets[first_packet:], segment_indices, position)
                    chosen[number] = _nearest_frames(frames, segment_indices, position)

            chosen = [None] * len(segments)  # the frames chosen for each segment's indices
            if num_threads <= 1:
                decode_segments(stream.codec_context, range(len(segments)))
            else:
                # Longest first, each to the next free thread: the frames a segment decodes grow with the distance
                # from its keyframe to its last index.
                lengths = [segment_indices[-1] - position(packets[k].pts) for k, segment_indices in segments]
                order = sorted(range(len(segments)), key=lambda number: -lengths[number])
                _decode_in_threads(av, path, stream.codec_context, decode_segments, order, num_threads)
        # Converted here, not in the threads: the conversion holds Python's lock, and the threads' decoding would
        # wait for it (12 % slower end to end).
        arrays = _frame_arrays(av, [frame for frames in chosen for frame in frames])
    except av.FFmpegError as error:
        raise VideoDecodeError(f"video {path!r} could not be decoded: {error}") from error
    if not arrays:
        raise VideoDecodeError(f"video {path!r}: no frame of the clip could be decoded")
    return torch.stack(arrays).numpy()


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _decode_in_threads(av, path: str, codec, decode_segments, order: list[int], num_threads: int) -> None:
    """Run `decode_segments(codec, segment numbers)` in `num_threads` threads that take the segments in `order`, each
    as it becomes free: this one with `codec`, the others with decoders of their own (from their own opening of the
    file; the packets are shared). libavcodec runs without Python's lock, so the threads decode in parallel."""
    from concurrent.futures import ThreadPoolExecutor

    queue = SimpleQueue()
    for number in order:
        queue.put(number)

    def numbers() -> Iterator[int]:
        while True:
            try:
                yield queue.get_nowait()
            except Empty:
                return

    def run() -> None:
        with av.open(path) as container:
            decode_segments(container.streams.video[0].codec_context, numbers())

    with ThreadPoolExecutor(num_threads - 1) as pool:
        others = [pool.submit(run) for _ in range(num_threads - 1)]
        decode_segments(codec, numbers())
        for other in others:
            other.result()  # re-raises a thread's error


def _frame_arrays(av, frames: list) -> list[torch.Tensor]:
    """The RGB arrays of decoded frames; a frame chosen for several indices is converted once. One reformatter
    converts them all: `frame.to_ndarray` sets up a scaler per frame, 3x the time of the conversions themselves."""
    reformatter, arrays = av.video.reformatter.VideoReformatter(), {}
    for frame in frames:
        if id(frame) not in arrays:
            arrays[id(frame)] = torch.from_numpy(reformatter.reformat(frame, format="rgb24").to_ndarray())
    return [arrays[id(frame)] for frame in frames]


def _packets_through(container, stream, last_index: int, position) -> list:
    """The packets of `stream` from where the container stands up to the first keyframe past frame `last_index` (which
    tells that no frame of the clip follows); reading them costs a few percent of decoding."""
    packets = []
    for packet in container.demux(stream):
        if packet.size == 0:  # the demuxer's end-of-stream marker
            continue
        packets.append(packet)
        if packet.is_keyframe and packet.pts is not None and position(packet.pts) > last_index:
            break
    return packets


def _keyframe_segments(packets: list, indices: list[int], position) -> list[tuple[int, list[int]]]:
    """
    The increasing `indices` grouped by the last keyframe at or before each: `(first packet, indices)` per group, in
    order. Decoding a group from its keyframe yields the same frames as decoding from the start (a keyframe needs no
    earlier frame), and no frame before it can be nearer to its indices than the keyframe itself, so the groups are
    independent. Indices before the first keyframe decode from the first packet.
    """
    keyframe_packets = [k for k, packet in enumerate(packets) if packet.is_keyframe and packet.pts is not None]
    keyframe_positions = [position(packets[k].pts) for k in keyframe_packets]  # increasing
    segments = {}
    for index in indices:
        last = bisect.bisect_right(keyframe_positions, index) - 1
        segments.setdefault(keyframe_packets[last] if last >= 0 else 0, []).append(index)
    return list(segments.items())


def _decode_towards(codec, packets: list, indices: list[int], position):
    """
    The frames `codec` decodes from `packets`, in presentation order, as far as choosing the nearest frame to each of
    the increasing `indices` needs them: up to the first frame at or past the last index.
    """
    reached = 0
    for packet in packets:
        for frame in codec.decode(packet):
            yield frame
            while frame.pts is not None and reached < len(indices) and position(frame.pts) >= indices[reached]:
                reached += 1
        if reached == len(indices):
            return
    yield from codec.decode(None)


def _nearest_frames(frames, indices: list[int], frame_index) -> list:
    """For each of the increasing `indices`, the frame of `frames` (in presentation order) whose position
    `frame_index(frame.pts)` is nearest, the earlier one on a tie. Stops at the first frame at or past the last index;
    if the frames end first, the remaining indices get the last frame. Empty if there is no frame at all."""
    chosen, previous = [], None
    for frame in frames:
        if frame.pts is None:
            continue
        position = frame_index(frame.pts)
        while len(chosen) < len(indices) and position >= indices[len(chosen)]:
            target = indices[len(chosen)]
            nearer_before = previous is not None and target - previous[0] <= position - target
            chosen.append(previous[1] if nearer_before else frame)
        if len(chosen) == len(indices):
            return chosen
        previous = (position, frame)
    if previous is None:
        return chosen
    return chosen + [previous[1]] * (len(indices) - len(chosen))


class CrossTVRVideosKwargs(VideosKwargs, total=False):
    """
    Video keyword arguments: transformers' `VideosKwargs` (the frame-processing ones reach the image processor;
    `num_frames` overrides the processor's T for this call) and CrossTVR's frame sampling.

    Attributes:
        sampling (`str`): `"center"` or `"random"`, see [`sample_frame_indices`].
        start_times, end_times (`list[float | None]`): per video file, the clip to sample from, in seconds.
        generator (`torch.Generator`): randomness of `sampling="random"`.
    """

    sampling: str | None
    start_times: list | tuple | None
    end_times: list | tuple | None
    generator: torch.Generator | None


class CrossTVRProcessorKwargs(ProcessingKwargs, total=False):
    videos_kwargs: CrossTVRVideosKwargs


# `VideosKwargs` keys this processor reads itself; with the image processor's keys they are the supported ones.
SAMPLING_KWARGS = ("num_frames", "sampling", "start_times", "end_times", "generator")


def _is_frame(value) -> bool:
    """A single decoded frame: a PIL image, or an (H, W, C) array or tensor."""
    return hasattr(value, "getpixel") or getattr(value, "ndim", None) == 3


class CrossTVRProcessor(ProcessorMixin):
    r"""
    Constructs a CrossTVR processor: a CLIP image processor for the frames, the CLIP tokenizer for stage 1 and the
    Q-Former's tokenizer (BERT, as in BLIP-2) for stage 2, plus video frame sampling.

    Videos are given as file paths (decoded with decord) or as already decoded frames: a sequence of PIL images or of
    `(H, W, C)` arrays, or one `(frames, H, W, C)` array or tensor per video. `num_frames` frames are sampled uniformly
    (segment centres by default, random offsets within the segments with `sampling="random"`); videos with fewer frames
    are padded with zero frames and `video_mask` marks them with 0. Video files are decoded as `decoding` says (see
    [`read_video`]): the sampled frames exactly (decord), or the nearest reference frames (PyAV, about twice as fast).
    Texts are padded and truncated to `max_text_length` tokens by both tokenizers (CLIP4Clip's max_words); pass
    `truncation=False` to get an error instead. (The model drops padding that every text of a batch has.)

    Args:
        image_processor ([`CLIPImageProcessor`]): resizes, crops and normalises frames.
        tokenizer ([`CLIPTokenizer`]): stage-1 tokenizer.
        qformer_tokenizer ([`BertTokenizer`]): stage-2 (Q-Former) tokenizer.
        num_frames (`int`, *optional*, defaults to 12): frames T per video.
        max_text_length (`int`, *optional*, defaults to 32): text length L in tokens.
        decoding (`str`, *optional*, defaults to `"exact"`): `"exact"` or `"reference_frames"`.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        qformer_tokenizer=None,
        num_frames=12,
        max_text_length=32,
        decoding="exact",
    ):
        if decoding not in DECODING_MODES:
            raise ValueError(f"decoding={decoding!r} is not one of {DECODING_MODES}")
        self.num_frames = num_frames
        self.max_text_length = max_text_length
        self.decoding = decoding
        super().__init__(image_processor, tokenizer, qformer_tokenizer)

    valid_processor_kwargs = CrossTVRProcessorKwargs

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """As in transformers, after checking what the processor needs (a clear error instead of a deep one)."""
        check_requirements()
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def __call__(
        self,
        text: str | list[str] | None = None,
        videos=None,
        images=None,
        return_tensors: str | None = "pt",
        **kwargs: Unpack[CrossTVRProcessorKwargs],
    ) -> BatchFeature:
        """
        Tokenize `text` and/or sample and preprocess `videos` (or `images`, as one-frame videos).

        Keyword arguments are routed as transformers' processors route them: flat (`padding=...`, `do_normalize=...`,
        `sampling="random"`) to the modality whose typed keywords declare them, or per modality (`text_kwargs={...}`,
        `videos_kwargs={...}`, `images_kwargs={...}`, `common_kwargs={...}`). Text keywords reach both tokenizers;
        image-processing keywords reach the CLIP image processor, for videos too. A keyword no modality reads is
        refused with its name, not ignored.

        Args:
            text (`str` or `list[str]`, *optional*): captions or queries.
            videos (*optional*): one video or a list of videos (paths or decoded frames, see the class docstring).
            images (*optional*): one image or a list of images (PIL or `(H, W, C)` arrays), each processed as a video of
                one frame (`pixel_values` `(batch, 1, 3, H, W)`), as CLIP and X-CLIP users pass images.
            return_tensors (`str`, *optional*, defaults to `"pt"`).
            kwargs: see [`CrossTVRProcessorKwargs`]; video sampling: `sampling` (`"center"` or `"random"`),
                `start_times`, `end_times` (seconds, per video file), `generator`, `num_frames`.

        Returns:
            [`BatchFeature`] with `input_ids`, `attention_mask`, `qformer_input_ids`, `qformer_attention_mask` for text
            and `pixel_values` `(batch, num_frames, 3, H, W)`, `video_mask` `(batch, num_frames)` for videos.
        """
        if text is None and videos is None and images is None:
            raise ValueError("CrossTVRProcessor needs `text`, `videos` or `images` (or text with one of them).")
        if videos is not None and images is not None:
            raise ValueError("Pass `videos` or `images`, not both: a batch holds videos of one length.")
        self._check_kwargs(kwargs)
        routed = self._merge_kwargs(CrossTVRProcessorKwargs, **kwargs)
        data = {}
        if text is not None:
            data.update(self._tokenize(text, **routed["text_kwargs"]))
        if videos is not None:
            data.update(self._process_videos(videos, **routed["videos_kwargs"]))
        if images is not None:
            images = images if isinstance(images, (list, tuple)) else [images]
            frames = [[image] for image in images]
            data.update(self._process_videos(frames, num_frames=1, **routed["images_kwargs"]))
        return BatchFeature(data, tensor_type=return_tensors)

    def _check_kwargs(self, kwargs: dict) -> None:
        """Refuse keywords that no modality reads, and video keywords this processor does not implement."""
        image_keys = set(ImagesKwargs.__annotations__)
        image_keys |= set(getattr(self.image_processor, "valid_kwargs", ImagesKwargs).__annotations__)
        readable = {
            "text_kwargs": set(TextKwargs.__annotations__),
            "images_kwargs": image_keys,
            "videos_kwargs": set(SAMPLING_KWARGS) | image_keys,
        }
        refused = []
        for key, value in kwargs.items():
            if key in readable:
                refused += [f"{key}[{sub_key!r}]" for sub_key in value if sub_key not in readable[key]]
            elif key == "common_kwargs":
                refused += [f"common_kwargs[{sub_key!r}]" for sub_key in value if sub_key != "return_tensors"]
            elif not any(key in keys for keys in readable.values()):
                refused.append(repr(key))
        if refused:
            raise TypeError(
                f"CrossTVRProcessor got keyword arguments it does not read: {', '.join(refused)}. Text keywords go to "
                "the tokenizers, image-processing keywords to the image processor, and videos take "
                f"{list(SAMPLING_KWARGS)} besides those."
            )

    def _tokenize(self, text: str | list[str], **text_kwargs) -> dict:
        if isinstance(text, str):
            text = [text]
        if not isinstance(text, (list, tuple)) or not all(isinstance(t, str) for t in text):
            raise ValueError(f"text must be a string or a list of strings, got {type(text).__name__}")
        kwargs = {"padding": "max_length", "truncation": True, "max_length": self.max_text_length, **text_kwargs}
        clip_encoding = self.tokenizer(list(text), **kwargs)
        qformer_encoding = self.qformer_tokenizer(list(text), **kwargs)
        for name, encoding in (("tokenizer", clip_encoding), ("qformer_tokenizer", qformer_encoding)):
            too_long = [t for t, ids in zip(text, encoding["input_ids"]) if len(ids) > self.max_text_length]
            if too_long:
                raise ValueError(
                    f"{len(too_long)} text(s) exceed max_text_length={self.max_text_length} tokens of the {name} "
                    f"(first: {too_long[0]!r}); leave truncation on or shorten them."
                )
        return {
            "input_ids": clip_encoding["input_ids"],
            "attention_mask": clip_encoding["attention_mask"],
            "qformer_input_ids": qformer_encoding["input_ids"],
            "qformer_attention_mask": qformer_encoding["attention_mask"],
        }

    def sample_frames(
        self,
        metadata: VideoMetadata,
        num_frames: int | None = None,
        sampling: str = "center",
        generator: torch.Generator | None = None,
    ) -> list[int]:
        """
        The frame indices this processor samples from a video described by `metadata` (transformers'
        `VideoMetadata`; only `total_num_frames` is read): [`sample_frame_indices`] with `num_frames` (default: the
        processor's T). Named and shaped as transformers' `BaseVideoProcessor.sample_frames`, whose processors need
        torchvision; CrossTVR decodes with decord or PyAV and samples TSN-style segments (centres, or random offsets
        with `sampling="random"`) instead of evenly spaced frames or `fps`.
        """
        return sample_frame_indices(
            metadata.total_num_frames, num_frames or self.num_frames, sampling, generator=generator
        )

    def _as_video_list(self, videos) -> list:
        """Normalise the accepted inputs to a list with one entry (path or frame sequence) per video."""
        if isinstance(videos, (str, os.PathLike)) or getattr(videos, "ndim", None) == 4:
            return [videos]
        if getattr(videos, "ndim", None) == 5:
            return list(videos)
        if isinstance(videos, (list, tuple)) and videos and _is_frame(videos[0]):
            return [videos]
        if isinstance(videos, (list, tuple)) and videos:
            return list(videos)
        raise ValueError(
            "videos must be a path, a sequence of frames, a (frames, H, W, C) array, or a list of those; got "
            f"{type(videos).__name__}"
        )

    def _video_frames(self, video, num_frames, sampling, start_time, end_time, generator) -> list:
        """Up to `num_frames` frames of one video, sampled as documented."""
        if isinstance(video, (str, os.PathLike)):
            return list(read_video(video, num_frames, sampling, start_time, end_time, generator, decoding=self.decoding))
        if start_time is not None or end_time is not None:
            raise ValueError("start_times / end_times apply to video files, not to decoded frames")
        frames = list(video)
        if not frames:
            raise ValueError("a video given as decoded frames has no frames")
        for frame in frames:
            if not _is_frame(frame):
                raise ValueError(
                    f"a decoded frame must be a PIL image or an (H, W, C) array, got {type(frame).__name__} with shape "
                    f"{getattr(frame, 'shape', None)}"
                )
        return [frames[i] for i in sample_frame_indices(len(frames), num_frames, sampling, generator=generator)]

    def _process_videos(
        self,
        videos,
        num_frames: int | None = None,
        sampling: str | None = None,
        start_times=None,
        end_times=None,
        generator: torch.Generator | None = None,
        **image_kwargs,
    ) -> dict:
        """Sample `num_frames` (default: the processor's) frames of every video and run the image processor on
        them with `image_kwargs`; `(batch, num_frames, C, H, W)` pixels and the `(batch, num_frames)` mask."""
        num_frames = num_frames or self.num_frames
        sampling = sampling or "center"
        videos = self._as_video_list(videos)
        start_times = [None] * len(videos) if start_times is None else list(start_times)
        end_times = [None] * len(videos) if end_times is None else list(end_times)
        if not len(start_times) == len(end_times) == len(videos):
            raise ValueError(
                f"got {len(videos)} videos but {len(start_times)} start_times and {len(end_times)} end_times"
            )
        frames_per_video = [
            self._video_frames(video, num_frames, sampling, start, end, generator)
            for video, start, end in zip(videos, start_times, end_times)
        ]
        flat_frames = [frame for frames in frames_per_video for frame in frames]
        image_kwargs.pop("return_tensors", None)
        processed = self.image_processor(images=flat_frames, return_tensors="pt", **image_kwargs)["pixel_values"]
        pixel_values = processed.new_zeros(len(videos), num_frames, *processed.shape[1:])  # (batch, T, C, H, W)
        video_mask = torch.zeros(len(videos), num_frames, dtype=torch.long)
        offset = 0
        for index, frames in enumerate(frames_per_video):
            pixel_values[index, : len(frames)] = processed[offset : offset + len(frames)]
            video_mask[index, : len(frames)] = 1
            offset += len(frames)
        return {"pixel_values": pixel_values, "video_mask": video_mask}

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "qformer_input_ids", "qformer_attention_mask", "pixel_values", "video_mask"]


class TextVideoRetrievalPipeline(Pipeline):
    r"""
    The `"text-video-retrieval"` pipeline: texts and videos in, for every text the videos ranked by two-stage
    retrieval (stage-1 cosine for all, the stage-1 top `rerank_depth` re-ranked by the fused score).

    ```python
    >>> from transformers import pipeline

    >>> retriever = pipeline("text-video-retrieval", model="path/or/repo", trust_remote_code=True)
    >>> retriever("a person is cooking", videos=["a.mp4", "b.mp4", "c.mp4"], top_k=2)
    [{'video': 'b.mp4', 'score': 0.61, 'stage1_score': 0.33, 'fine_score': 0.93, 'reranked': True}, ...]
    ```

    A CrossTVR checkpoint declares it in `config.custom_pipelines`, so `pipeline(model=...)` finds it; the code is this
    file, which every checkpoint carries.

    Call arguments:
        text (`str` or `list[str]`): the queries; a list gives one result list per query.
        videos: the candidates, as the processor takes them (paths or decoded frames).
        top_k (`int`, *optional*): results per query (default: all videos).
        rerank_depth (`int`, *optional*): K, the stage-1 candidates stage 2 re-ranks (default:
            `config.rerank_top_k`); 0 returns the stage-1 ranking.

    Each result: `video` (the path, or the index of a video given as frames), `score` (the fused score
    s_coarse + w * s_fine for re-ranked videos, s_coarse below them), `stage1_score`, `fine_score` (None below the
    top K) and `reranked`.
    """

    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_video_processor = False

    def __call__(self, text: str | list[str], videos=None, **kwargs):
        if videos is None:
            raise ValueError("The text-video-retrieval pipeline needs `videos=[...]`, the candidates to rank.")
        queries = [text] if isinstance(text, str) else list(text)
        videos = self.processor._as_video_list(videos)
        results = super().__call__({"text": queries, "videos": videos}, **kwargs)
        return results[0] if isinstance(text, str) else results

    def _sanitize_parameters(self, top_k: int | None = None, rerank_depth: int | None = None):
        for name, value in (("top_k", top_k), ("rerank_depth", rerank_depth)):
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")
        return {}, {"rerank_depth": rerank_depth}, {"top_k": top_k}

    def preprocess(self, inputs: dict) -> dict:
        model_inputs = self.processor(text=inputs["text"], videos=inputs["videos"])
        return {**model_inputs, "videos": inputs["videos"]}

    def _forward(self, model_inputs: dict, rerank_depth: int | None = None) -> dict:
        model = self.model
        videos = model_inputs.pop("videos")
        text_embeds = model.get_text_features(model_inputs["input_ids"], model_inputs["attention_mask"])
        encoded = model.encode_video(model_inputs["pixel_values"], model_inputs["video_mask"])
        similarity = model.get_similarity(text_embeds, encoded.video_embeds)  # (texts, videos)
        depth = model.config.rerank_top_k if rerank_depth is None else rerank_depth
        outputs = {"videos": videos, "similarity": similarity}
        if depth > 0:
            outputs["rerank"] = model.rerank_text_to_video(
                similarity,
                model_inputs["qformer_input_ids"],
                model_inputs["qformer_attention_mask"],
                encoded.vision_tokens,
                model_inputs["video_mask"],
                top_k=depth,
            )
        return outputs

    def postprocess(self, model_outputs: dict, top_k: int | None = None) -> list[list[dict]]:
        videos, similarity = model_outputs["videos"], model_outputs["similarity"].float()
        rerank = model_outputs.get("rerank")
        ranking = similarity.argsort(dim=1, descending=True, stable=True) if rerank is None else rerank.ranking
        results = []
        for row in range(similarity.shape[0]):
            fine = {}
            if rerank is not None:
                for column, video in enumerate(rerank.top_k_indices[row].tolist()):
                    fine[video] = (rerank.fine_scores[row, column].item(), rerank.fused_scores[row, column].item())
            entries = []
            for video in ranking[row, :top_k].tolist():
                fine_score, fused_score = fine.get(video, (None, None))
                stage1_score = similarity[row, video].item()
                entries.append(
                    {
                        "video": videos[video] if isinstance(videos[video], (str, os.PathLike)) else video,
                        "score": stage1_score if fused_score is None else fused_score,
                        "stage1_score": stage1_score,
                        "fine_score": fine_score,
                        "reranked": fused_score is not None,
                    }
                )
            results.append(entries)
        return results


# `save_pretrained` copies this file next to the weights and records it in `auto_map`.
CrossTVRProcessor.register_for_auto_class()


__all__ = [
    "DECODING_MODES",
    "CrossTVRProcessor",
    "CrossTVRProcessorKwargs",
    "CrossTVRVideosKwargs",
    "TextVideoRetrievalPipeline",
    "VideoDecodeError",
    "read_video",
    "sample_frame_indices",
]
