"""Procedurally generated videos with captions that describe them: sample libraries for the demo and media for tests.

Videos are rendered with NumPy and written with PyAV; read them back with decord like any other video.
"""

import os
from dataclasses import dataclass

import numpy as np


COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 80, 220),
    "yellow": (230, 200, 30),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
BACKGROUND = (235, 235, 235)
VOCABULARY = ("a", "moves", *COLOURS, *SHAPES, *DIRECTIONS)


@dataclass(frozen=True)
class MovingShape:
    """One shape of one colour crossing the frame in one direction."""

    shape: str
    colour: str
    direction: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} moves {self.direction}"


def _shape_mask(shape: str, size: int, centre_x: float, centre_y: float, radius: float) -> np.ndarray:
    """Boolean (size, size) mask of `shape` centred at (centre_x, centre_y)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = x - centre_x, y - centre_y
    if shape == "circle":
        return dx**2 + dy**2 <= radius**2
    if shape == "square":
        return (np.abs(dx) <= radius) & (np.abs(dy) <= radius)
    if shape == "triangle":
        # Apex up: inside when below the two slanted edges and above the base.
        return (dy <= radius) & (dy >= -radius + 2 * np.abs(dx))
    raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")


def render(scene: MovingShape, num_frames: int = 16, size: int = 64) -> np.ndarray:
    """Frames `(num_frames, size, size, 3)` uint8 of `scene`: the shape travels across the middle of the frame."""
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    step_x, step_y = DIRECTIONS[scene.direction]
    radius = size / 8
    for index in range(num_frames):
        progress = index / max(num_frames - 1, 1) - 0.5  # -0.5 .. 0.5
        centre_x = size / 2 + step_x * progress * (size - 3 * radius)
        centre_y = size / 2 + step_y * progress * (size - 3 * radius)
        frames[index] = BACKGROUND
        frames[index][_shape_mask(scene.shape, size, centre_x, centre_y, radius)] = COLOURS[scene.colour]
    return frames


VIDEO_CODECS = {".avi": "mpeg4", ".webm": "libvpx-vp9"}  # anything else: H.264


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: int = 8) -> None:
    """
    Write `(frames, height, width, 3)` uint8 RGB frames as a video whose container follows the file extension (MPEG-4
    Part 2 in .avi, VP9 in .webm, H.264 otherwise); height and width must be even.
    """
    try:
        import av
    except ImportError as error:
        raise ImportError("Writing videos needs PyAV: `pip install av`.") from error
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"video frame sizes must be even, got {width}x{height}")
    codec = VIDEO_CODECS.get(os.path.splitext(os.fspath(path))[1].lower(), "libx264")
    with av.open(os.fspath(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def sample_scenes(count: int, seed: int = 0) -> list[MovingShape]:
    """`count` distinct scenes drawn without replacement from all shape x colour x direction combinations."""
    scenes = [MovingShape(s, c, d) for s in SHAPES for c in COLOURS for d in DIRECTIONS]
    if count > len(scenes):
        raise ValueError(f"at most {len(scenes)} distinct scenes exist, asked for {count}")
    order = np.random.default_rng(seed).permutation(len(scenes))[:count]
    return [scenes[i] for i in order]


def write_sample_library(directory: str | os.PathLike, count: int = 8, seed: int = 0, **render_kwargs) -> dict:
    """Write `count` scene videos into `directory` and return {file name: caption}."""
    os.makedirs(directory, exist_ok=True)
    captions = {}
    for index, scene in enumerate(sample_scenes(count, seed)):
        name = f"{index:03d}_{scene.colour}_{scene.shape}_{scene.direction}.mp4"
        write_video(os.path.join(directory, name), render(scene, **render_kwargs))
        captions[name] = scene.caption
    return captions
