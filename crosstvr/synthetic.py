"""Procedurally generated videos with captions that describe them.

Two kinds of scenes:

- [`MovingShape`]: one shape crossing the frame. Simple media for tests and the tiny benchmark fixtures.
- [`Scene`]: the fine-grained retrieval benchmark (`benchmarks/synthetic_benchmark.py`) and the demo's sample library.
  Two objects, one in the top half and one in the bottom half of the frame, each with a size, colour and shape; one
  after the other, each makes an out-and-back movement in a direction (the first during the first half of the clip,
  the second during the second half), while a small dot of some colour flashes in the middle frames only. The caption
  names the objects in the order they move:

      "big red circle goes left, then small blue square goes up, yellow dot flashes"

  A scene's hard negatives differ in one fine detail: the dot's colour, the direction of one movement, or the order
  of the two movements (the objects stay where they are, so only time tells the orders apart; and since every
  movement returns to its start, averaging frames over time does not tell them apart either).

Videos are rendered with NumPy and written with PyAV; read them back with decord like any other video.
"""

import json
import os
from dataclasses import asdict, dataclass, replace

import numpy as np


COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 80, 220),
    "yellow": (230, 200, 30),
}
DOT_COLOURS = {**COLOURS, "purple": (150, 60, 200), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"big": 8.0, "small": 5.0}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
BACKGROUND = (235, 235, 235)
VOCABULARY = ("a", "first", "moves", "goes", "and", "then", "while", "dot", "flashes", "at", *SIZES, *DOT_COLOURS, *SHAPES,
              *DIRECTIONS, *(str(cell) for cell in range(16)))


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


VIDEO_CODECS = {".avi": "mpeg4", ".webm": "libvpx-vp9"}  # anything else: H.264


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: int = 8) -> None:
    """
    Write `(frames, height, width, 3)` uint8 RGB frames as a video whose container follows the file extension (MPEG-4
    Part 2 in .avi, VP9 in .webm, H.264 otherwise); height and width must be even.

    The same frames give the same bytes in every process, so that a generated benchmark is the same data in every
    invocation: the encoder runs in one thread, and libx264 without its macroblock-tree rate control (`mbtree=0`),
    which, even single-threaded, wrote other bytes in about half of the runs on these small frames (as did adaptive
    quantisation; B-frames, which the `reference_frames` decoding skips, are kept), and the muxer in its bit-exact
    mode (WebM's muxer draws random track ids otherwise).
    """
    try:
        import av
    except ImportError as error:
        raise ImportError("Writing videos needs PyAV: `pip install av`.") from error
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"video frame sizes must be even, got {width}x{height}")
    codec = VIDEO_CODECS.get(os.path.splitext(os.fspath(path))[1].lower(), "libx264")
    with av.open(os.fspath(path), mode="w", container_options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(codec, rate=fps, options={"x264-params": "mbtree=0"} if codec == "libx264" else {})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.thread_count, stream.codec_context.thread_type = 1, "NONE"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


# ------------------------------------------------------------------------------------------------------------------
# One moving shape: test media and dataset fixtures
# ------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MovingShape:
    """One shape of one colour crossing the frame in one direction."""

    shape: str
    colour: str
    direction: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} moves {self.direction}"


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


def sample_moving_shapes(count: int, seed: int = 0) -> list[MovingShape]:
    """`count` distinct single-shape scenes drawn without replacement from all shape x colour x direction combinations."""
    scenes = [MovingShape(s, c, d) for s in SHAPES for c in COLOURS for d in DIRECTIONS]
    if count > len(scenes):
        raise ValueError(f"at most {len(scenes)} distinct scenes exist, asked for {count}")
    order = np.random.default_rng(seed).permutation(len(scenes))[:count]
    return [scenes[i] for i in order]


# ------------------------------------------------------------------------------------------------------------------
# The fine-grained benchmark scenes
# ------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneObject:
    """An object of a [`Scene`]: its look, where it rests (centre x in pixels) and where it moves."""

    size: str
    colour: str
    shape: str
    x: int
    direction: str

    @property
    def phrase(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """Two objects (`top`, `bottom`) moving one after the other (`top_first`), and a dot flashing in the middle."""

    top: SceneObject
    bottom: SceneObject
    top_first: bool
    dot_colour: str
    dot_x: int
    dot_y: int

    @property
    def order(self) -> tuple[SceneObject, SceneObject]:
        return (self.top, self.bottom) if self.top_first else (self.bottom, self.top)

    def captions(self) -> list[str]:
        """Three phrasings of the same description; the first is the canonical caption."""
        first, second = self.order
        one, two = f"{first.phrase} goes {first.direction}", f"{second.phrase} goes {second.direction}"
        return [
            f"{one}, then {two}, {self.dot_colour} dot flashes",
            f"first {first.phrase} moves {first.direction}, then {second.phrase} moves {second.direction}, and a "
            f"{self.dot_colour} dot flashes",
            f"{self.dot_colour} dot flashes while {one} then {two}",
        ]

    def hard_negatives(self, rng: np.random.Generator) -> dict[str, "Scene"]:
        """Scenes that differ from this one in one fine detail: the dot's colour, the direction of the first
        movement, or the order of the two movements."""
        first, _ = self.order
        flipped = replace(first, direction=OPPOSITE[first.direction])
        other_colours = [c for c in DOT_COLOURS if c not in (self.dot_colour, self.top.colour, self.bottom.colour)]
        return {
            "dot_colour": replace(self, dot_colour=str(rng.choice(other_colours))),
            "direction": replace(self, **{"top" if self.top_first else "bottom": flipped}),
            "order": replace(self, top_first=not self.top_first),
        }


def random_scene(rng: np.random.Generator) -> Scene:
    """A scene with two differently coloured objects and a dot of a third colour."""
    colours = rng.choice(list(COLOURS), size=2, replace=False)
    objects = [
        SceneObject(
            size=str(rng.choice(list(SIZES))),
            colour=str(colour),
            shape=str(rng.choice(SHAPES)),
            x=int(rng.integers(20, 45)),
            direction=str(rng.choice(list(DIRECTIONS))),
        )
        for colour in colours
    ]
    dot_colour = rng.choice([c for c in DOT_COLOURS if c not in colours])
    return Scene(
        top=objects[0],
        bottom=objects[1],
        top_first=bool(rng.integers(2)),
        dot_colour=str(dot_colour),
        dot_x=int(rng.integers(6, 58)),
        dot_y=int(rng.choice([30, 32, 34])),  # the band between the two objects' areas
    )


GRID_CELL = 4  # pixels per cell of the grid that frame captions name positions on


def frame_layout(scene: Scene, index: int, num_frames: int = 12, size: int = 64):
    """
    Where things are in frame `index` of `scene`: `([(object, centre_x, centre_y), ...], dot_visible)`. The first
    object moves out by 10 px and back (a half sine) during the first half of the clip, the second during the second
    half; the dot is visible in the middle third.
    """
    half = num_frames // 2
    amplitude = 10.0
    first, _ = scene.order
    placed = []
    for obj, centre_y in ((scene.top, size * 0.25), (scene.bottom, size * 0.75)):
        moving = (index < half) == (obj is first)
        step = index if index < half else index - half
        offset = amplitude * np.sin(np.pi * step / max(half - 1, 1)) if moving else 0.0
        dx, dy = DIRECTIONS[obj.direction]
        placed.append((obj, obj.x + dx * offset, centre_y + dy * offset))
    dot_visible = num_frames // 3 <= index < num_frames - num_frames // 3
    return placed, dot_visible


def render_scene(scene: Scene, num_frames: int = 12, size: int = 64) -> np.ndarray:
    """Frames `(num_frames, size, size, 3)` uint8 of `scene`, laid out by [`frame_layout`]."""
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    for index in range(num_frames):
        frames[index] = BACKGROUND
        placed, dot_visible = frame_layout(scene, index, num_frames, size)
        for obj, centre_x, centre_y in placed:
            frames[index][_shape_mask(obj.shape, size, centre_x, centre_y, SIZES[obj.size])] = COLOURS[obj.colour]
        if dot_visible:
            frames[index][scene.dot_y - 2 : scene.dot_y + 2, scene.dot_x - 2 : scene.dot_x + 2] = DOT_COLOURS[scene.dot_colour]
    return frames


def frame_caption(scene: Scene, index: int, num_frames: int = 12, size: int = 64) -> str:
    """
    What frame `index` of `scene` shows, the way an image caption would say it: each object and the cell of a
    `GRID_CELL`-pixel grid its centre is in (column, then row), and the dot where it is visible, e.g.

        "big red circle at 7 3, small blue square at 9 12, black dot at 3 8"
    """
    placed, dot_visible = frame_layout(scene, index, num_frames, size)
    phrases = [f"{obj.phrase} at {int(x // GRID_CELL)} {int(y // GRID_CELL)}" for obj, x, y in placed]
    if dot_visible:
        phrases.append(f"{scene.dot_colour} dot at {scene.dot_x // GRID_CELL} {scene.dot_y // GRID_CELL}")
    return ", ".join(phrases)


def scene_groups(count: int, seed: int) -> list[dict[str, Scene]]:
    """`count` groups of a base scene and its three hard negatives, all scenes distinct across groups."""
    rng = np.random.default_rng(seed)
    groups, seen = [], set()
    while len(groups) < count:
        base = random_scene(rng)
        group = {"base": base, **base.hard_negatives(rng)}
        captions = {scene.captions()[0] for scene in group.values()}
        if len(captions) == len(group) and not captions & seen:
            seen |= captions
            groups.append(group)
    return groups


def write_video_frames(video_path: str | os.PathLike, directory: str | os.PathLike) -> list[str]:
    """Decode every frame of a video with PyAV and write it as `directory/<index:02d>.png`; returns the paths."""
    import av
    from PIL import Image

    os.makedirs(directory, exist_ok=True)
    paths = []
    with av.open(os.fspath(video_path)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            paths.append(os.path.join(os.fspath(directory), f"{index:02d}.png"))
            Image.fromarray(frame.to_ndarray(format="rgb24")).save(paths[-1])
    return paths


def write_benchmark(
    directory: str | os.PathLike, seed: int = 0, groups: tuple[int, int, int] = (150, 25, 50), num_frames: int = 12
) -> dict[str, list[str]]:
    """
    Write the fine-grained benchmark in MSVD's on-disk layout, so that `crosstvr.data.load_msvd`, training and
    `crosstvr evaluate --dataset msvd` read it unchanged, and the frames of the training and validation videos with
    captions of what each frame shows (for image-text pre-training, `crosstvr.pretraining`):

        directory/annotations/raw-captions.json   {video_id: [captions]}: three phrasings for training videos, the
                                                  canonical caption for validation and test videos
        directory/annotations/{train,val,test}_list.txt
        directory/annotations/scenes.json         {video_id: {"group", "variant", "scene"}}, for analysis
        directory/annotations/frame_captions_{train,val}.json
                                                  LAVIS's image-caption format, one record per frame:
                                                  {"image": "frames/<video_id>/<index>.png", "caption": [`frame_caption`],
                                                  "image_id": "<video_id>/<index>", "group": "g<group>/<index>"}:
                                                  a group is the same frame of the scene group's four videos,
                                                  the near duplicates that differ only in the detail
        directory/videos/<video_id>.mp4
        directory/frames/<video_id>/<index:02d>.png   the decoded frames of the training and validation videos

    `groups` are the numbers of scene groups (a scene and its three hard negatives, 4 videos) of the train, val and
    test splits. Returns the video ids of every split.
    """
    root = os.fspath(directory)
    annotations, videos = os.path.join(root, "annotations"), os.path.join(root, "videos")
    os.makedirs(annotations, exist_ok=True)
    os.makedirs(videos, exist_ok=True)
    all_groups = scene_groups(sum(groups), seed)
    splits, captions, scenes, frame_records = {}, {}, {}, {}
    start = 0
    for split, count in zip(("train", "val", "test"), groups):
        splits[split], records = [], []
        for group_index in range(start, start + count):
            for variant, scene in all_groups[group_index].items():
                video_id = f"g{group_index:04d}_{variant}"
                video_path = os.path.join(videos, f"{video_id}.mp4")
                write_video(video_path, render_scene(scene, num_frames))
                phrasings = scene.captions()
                captions[video_id] = phrasings if split == "train" else phrasings[:1]
                scenes[video_id] = {"group": group_index, "variant": variant, "scene": asdict(scene)}
                splits[split].append(video_id)
                if split == "test":
                    continue
                for index, path in enumerate(write_video_frames(video_path, os.path.join(root, "frames", video_id))):
                    records.append(
                        {
                            "image": os.path.relpath(path, root),
                            "caption": frame_caption(scene, index, num_frames),
                            "image_id": f"{video_id}/{index:02d}",
                            "group": f"g{group_index:04d}/{index:02d}",
                        }
                    )
        frame_records[split] = records
        start += count
    outputs = {
        "raw-captions.json": captions,
        "scenes.json": scenes,
        **{f"frame_captions_{split}.json": records for split, records in frame_records.items() if records},
    }
    for name, content in outputs.items():
        with open(os.path.join(annotations, name), "w", encoding="utf-8") as file:
            json.dump(content, file)
    for split, video_ids in splits.items():
        with open(os.path.join(annotations, f"{split}_list.txt"), "w", encoding="utf-8") as file:
            file.writelines(f"{video_id}\n" for video_id in video_ids)
    return splits


def write_sample_library(directory: str | os.PathLike, count: int = 12, seed: int = 1000, **render_kwargs) -> dict:
    """Write `count` benchmark scenes (whole groups of hard negatives first) into `directory`; return
    {file name: caption}. The seed keeps them apart from the benchmark's own scenes."""
    os.makedirs(directory, exist_ok=True)
    scenes = [scene for group in scene_groups((count + 3) // 4, seed) for scene in group.values()][:count]
    captions = {}
    for index, scene in enumerate(scenes):
        name = f"{index:03d}.mp4"
        write_video(os.path.join(directory, name), render_scene(scene, **render_kwargs))
        captions[name] = scene.captions()[0]
    return captions
