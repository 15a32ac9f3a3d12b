"""Tiny configurations, processors and generated media shared by the tests (no network, seeded)."""

import os


# Nothing in the suite may reach the Hub: fail fast instead of retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import CLIPImageProcessorPil  # noqa: E402

from crosstvr import CrossTVRConfig, CrossTVRModel, CrossTVRProcessor  # noqa: E402
from crosstvr.synthetic import VOCABULARY, MovingShape, render, write_video  # noqa: E402
from crosstvr.vocabulary import build_bert_tokenizer, build_clip_tokenizer  # noqa: E402


class CrossTVRModelTester:
    """Builds tiny CrossTVR configs (hidden 32, 2 layers, 32 px images), inputs and processors, like the
    `ModelTester` helpers of transformers."""

    image_size = 32
    patch_size = 8  # 16 patches + CLS = 17 tokens per frame
    num_frames = 4
    text_length = 8
    batch_size = 3

    def __init__(self):
        self.clip_tokenizer = build_clip_tokenizer(VOCABULARY)
        self.bert_tokenizer = build_bert_tokenizer(VOCABULARY)

    def get_config(self, **overrides) -> CrossTVRConfig:
        kwargs = {
            "text_config": {
                "vocab_size": len(self.clip_tokenizer),
                "hidden_size": 32,
                "intermediate_size": 37,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "max_position_embeddings": 16,
                "bos_token_id": self.clip_tokenizer.bos_token_id,
                "eos_token_id": self.clip_tokenizer.eos_token_id,
                "pad_token_id": self.clip_tokenizer.pad_token_id,
            },
            "vision_config": {
                "hidden_size": 32,
                "intermediate_size": 37,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "image_size": self.image_size,
                "patch_size": self.patch_size,
            },
            "qformer_config": {
                "vocab_size": len(self.bert_tokenizer),
                "hidden_size": 32,
                "intermediate_size": 37,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "max_position_embeddings": 16,
                "hidden_dropout_prob": 0.0,
                "attention_probs_dropout_prob": 0.0,
            },
            "temporal_config": {
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "max_position_embeddings": 32,
            },
            "projection_dim": 16,
            "num_frames": self.num_frames,
            "num_query_tokens": 3,
            "num_selected_tokens": 2,
            "coarse_num_selected_patches": 2,
            "token_selection_num_samples": 20,
            "rerank_top_k": 2,
        }
        kwargs.update(overrides)
        return CrossTVRConfig(**kwargs)

    def get_model(self, seed: int = 0, **overrides) -> CrossTVRModel:
        torch.manual_seed(seed)
        return CrossTVRModel(self.get_config(**overrides))

    def get_processor(self) -> CrossTVRProcessor:
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": self.image_size}, crop_size={"height": self.image_size, "width": self.image_size}
        )
        return CrossTVRProcessor(
            image_processor,
            self.clip_tokenizer,
            self.bert_tokenizer,
            num_frames=self.num_frames,
            max_text_length=self.text_length,
        )

    def get_inputs(self, batch_size: int | None = None, seed: int = 0) -> dict:
        """Random pixels with one padding frame in the first video, and real captions tokenized by both tokenizers."""
        batch_size = batch_size or self.batch_size
        generator = torch.Generator().manual_seed(seed)
        pixel_values = torch.randn(
            batch_size, self.num_frames, 3, self.image_size, self.image_size, generator=generator
        )
        video_mask = torch.ones(batch_size, self.num_frames, dtype=torch.long)
        video_mask[0, -1] = 0
        pixel_values[0, -1] = 0
        captions = ["a red circle moves left", "a blue square moves up", "a green triangle moves down", "a moves"]
        text = self.get_processor()(text=[captions[i % len(captions)] for i in range(batch_size)])
        return {"pixel_values": pixel_values, "video_mask": video_mask, **text}


@pytest.fixture(scope="session")
def tester() -> CrossTVRModelTester:
    return CrossTVRModelTester()


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory) -> str:
    """Generated media (64 px, 8 fps): good videos, a short one, one of a frame size decord mis-converts (48 px), a
    corrupt one, an empty file and a text file named .mp4."""
    directory = tmp_path_factory.mktemp("media")
    scenes = {
        "red_circle_left.mp4": (MovingShape("circle", "red", "left"), 16),
        "blue_square_up.mp4": (MovingShape("square", "blue", "up"), 16),
        "green_triangle_down.mp4": (MovingShape("triangle", "green", "down"), 16),
        "short.mp4": (MovingShape("circle", "yellow", "right"), 2),
    }
    for name, (scene, frames) in scenes.items():
        write_video(directory / name, render(scene, num_frames=frames))
    write_video(directory / "odd_size.mp4", render(MovingShape("square", "green", "left"), num_frames=8, size=48))
    good = (directory / "red_circle_left.mp4").read_bytes()
    (directory / "corrupt.mp4").write_bytes(good[: len(good) // 3][::-1])
    (directory / "empty.mp4").write_bytes(b"")
    (directory / "notes.mp4").write_text("this is not a video\n")
    return os.fspath(directory)


@pytest.fixture
def frames() -> np.ndarray:
    """Ten decoded frames of one scene, (10, 40, 48, 3) uint8."""
    return render(MovingShape("square", "red", "right"), num_frames=10, size=48)[:, 4:44]
