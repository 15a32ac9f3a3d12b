"""The embedded default model, and the tiny geometry it is built with.

The default is what the command line uses when no model is named: a tiny CrossTVR trained by the synthetic
benchmark's recipe (`benchmarks/synthetic_benchmark.py --ship-default`) and shipped in `crosstvr/default_checkpoint/`
as safetensors with its configuration, processor and model card. No download is involved.

`build_tiny_model` gives the same geometry with random weights (fast, seeded); `build_tiny_clip`,
`build_tiny_eva_dual_encoder` and `build_tiny_blip2` build the parts the recipe pre-trains before conversion (the
miniatures of CLIP, EVA-CLIP and BLIP-2).
"""

import os

import torch
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTextConfig

from .configuration_crosstvr import CrossTVRConfig
from .modeling_crosstvr import CrossTVRModel
from .processing_crosstvr import CrossTVRProcessor
from .synthetic import VOCABULARY
from .vocabulary import build_bert_tokenizer, build_clip_tokenizer


DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_checkpoint")
IMAGE_SIZE = 64
NUM_FRAMES = 6
MAX_TEXT_LENGTH = 24
WIDTH = 64
FINE_PATCH_SIZE = 8


def build_tiny_processor(num_frames: int = NUM_FRAMES) -> CrossTVRProcessor:
    """64 px frames, `num_frames` frames, 24 tokens, tokenizers over the synthetic scenes' vocabulary."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return CrossTVRProcessor(
        image_processor,
        build_clip_tokenizer(VOCABULARY),
        build_bert_tokenizer(VOCABULARY),
        num_frames=num_frames,
        max_text_length=MAX_TEXT_LENGTH,
    )


def _tiny_clip_text_config(tokenizer) -> dict:
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": WIDTH,
        "intermediate_size": 2 * WIDTH,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": MAX_TEXT_LENGTH,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def build_tiny_config(processor: CrossTVRProcessor, **overrides) -> CrossTVRConfig:
    """A CrossTVR of the paper's shape at toy width (64), depth (2) and resolution (64 px, 16 px patches)."""
    tokenizer, qformer_tokenizer = processor.tokenizer, processor.qformer_tokenizer
    kwargs = {
        "text_config": _tiny_clip_text_config(tokenizer),
        "vision_config": {
            "hidden_size": WIDTH,
            "intermediate_size": 2 * WIDTH,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": IMAGE_SIZE,
            "patch_size": 16,
        },
        "qformer_config": {
            "vocab_size": len(qformer_tokenizer),
            "hidden_size": WIDTH,
            "intermediate_size": 2 * WIDTH,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "cross_attention_frequency": 1,
            "max_position_embeddings": MAX_TEXT_LENGTH,
            "pad_token_id": qformer_tokenizer.pad_token_id,
            # Toy width: no dropout, and an initialisation at the width's scale (BERT's 0.02 is for width 768;
            # at width 64 the Q-Former trained from scratch sits on a long plateau with it).
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "initializer_range": WIDTH**-0.5,
        },
        "temporal_config": {
            "hidden_size": WIDTH,
            "intermediate_size": 2 * WIDTH,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 64,
        },
        "projection_dim": WIDTH,
        "num_frames": processor.num_frames,
        "num_query_tokens": 4,
        "initializer_range": WIDTH**-0.5,
        "num_selected_tokens": 4,
        "token_selection_num_samples": 100,
        "rerank_top_k": 5,
    }
    kwargs.update(overrides)
    return CrossTVRConfig(**kwargs)


def build_tiny_clip(processor: CrossTVRProcessor) -> CLIPModel:
    """The stage-1 towers' starting point: a `CLIPModel` of the tiny geometry with random weights."""
    config = CLIPConfig(
        text_config=_tiny_clip_text_config(processor.tokenizer),
        vision_config=build_tiny_config(processor).vision_config.to_dict(),
        projection_dim=WIDTH,
    )
    return CLIPModel(config)


def build_tiny_eva_dual_encoder(processor: CrossTVRProcessor, patch_size: int = FINE_PATCH_SIZE):
    """
    The stage-2 tower's starting point, the miniature of EVA-CLIP: BLIP-2's vision tower (`Blip2VisionModel`, the
    family `--stage2-tower blip2` converts) paired with a CLIP text tower in a `VisionTextDualEncoderModel`, random
    weights. Its patches are finer than stage 1's (8 px: a frame is 8 x 8 patches), so that small details such as the
    synthetic scenes' 4-pixel dot fill a good part of a patch.

    Its weights are drawn at the width's scale (`initializer_range = WIDTH**-0.5`, as the tiny Q-Former's).
    `Blip2VisionConfig` defaults to 1e-10, which suits a tower that is always loaded from a checkpoint; trained from
    it, every weight starts at about zero and the tower hardly learns: supervised on "is the dot visible" its loss
    stayed at the class prior for 300 steps, and after contrastive pre-training its frame embeddings of two frames
    that differ only in the dot's colour had a cosine of 1.0000.
    """
    from transformers import Blip2VisionConfig, VisionTextDualEncoderConfig, VisionTextDualEncoderModel

    from .pretraining import register_blip2_vision_tower

    register_blip2_vision_tower()
    vision_config = Blip2VisionConfig(
        hidden_size=WIDTH,
        intermediate_size=2 * WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=patch_size,
        initializer_range=WIDTH**-0.5,
    )
    text_config = CLIPTextConfig(**_tiny_clip_text_config(processor.tokenizer))
    return VisionTextDualEncoderModel(
        VisionTextDualEncoderConfig.from_vision_text_configs(vision_config, text_config, projection_dim=WIDTH)
    )


def build_tiny_blip2(processor: CrossTVRProcessor, vision_config, num_query_tokens: int = 4):
    """
    The Q-Former's starting point: a `Blip2ForImageTextRetrieval` over the given vision tower configuration (its
    weights are the caller's to load) with the tiny geometry's Q-Former, random weights. transformers initialises
    `query_tokens` to zero (they are always loaded from a checkpoint); as LAVIS does for BLIP-2 trained from scratch,
    they are drawn from N(0, initializer_range) here, since zero queries make the Q-Former's first LayerNorm divide
    by its epsilon.
    """
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    qformer_config = build_tiny_config(processor).qformer_config.to_dict()
    qformer_config["encoder_hidden_size"] = vision_config.hidden_size
    config = Blip2Config(
        vision_config=vision_config.to_dict(),
        qformer_config=qformer_config,
        num_query_tokens=num_query_tokens,
        image_text_hidden_size=WIDTH,
    )
    model = Blip2ForImageTextRetrieval(config)
    with torch.no_grad():
        model.query_tokens.normal_(std=config.qformer_config.initializer_range)
    return model


def build_tiny_model(seed: int = 0, **overrides) -> tuple[CrossTVRModel, CrossTVRProcessor]:
    """The tiny geometry with random weights, the same for the same `seed` (model in eval mode, processor)."""
    processor = build_tiny_processor()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CrossTVRModel(build_tiny_config(processor, **overrides))
    return model.eval(), processor


def load_default_model(dtype: torch.dtype | None = None) -> tuple[CrossTVRModel, CrossTVRProcessor]:
    """The embedded default (model in eval mode, processor), from `crosstvr/default_checkpoint/`; `dtype` as in
    `from_pretrained`."""
    if not os.path.exists(os.path.join(DEFAULT_CHECKPOINT, "model.safetensors")):
        raise FileNotFoundError(
            f"the embedded default checkpoint is missing from {DEFAULT_CHECKPOINT}; reinstall crosstvr, or run "
            "benchmarks/synthetic_benchmark.py --ship-default to train it"
        )
    model = CrossTVRModel.from_pretrained(DEFAULT_CHECKPOINT, dtype=dtype)
    return model.eval(), CrossTVRProcessor.from_pretrained(DEFAULT_CHECKPOINT)
