"""The embedded default model: what the command line uses when no model is named, with no download.

For now it is a tiny CrossTVR over the vocabulary of the synthetic sample videos, randomly initialised from a fixed
seed: it exercises the whole two-stage pipeline (and answers with a ranked list), but its ranking is not meaningful.
A checkpoint trained on the synthetic benchmark replaces it once that benchmark lands.
"""

import torch
from transformers import CLIPImageProcessorPil

from .configuration_crosstvr import CrossTVRConfig
from .modeling_crosstvr import CrossTVRModel
from .processing_crosstvr import CrossTVRProcessor
from .synthetic import VOCABULARY
from .vocabulary import build_bert_tokenizer, build_clip_tokenizer


IMAGE_SIZE = 64
NUM_FRAMES = 8
MAX_TEXT_LENGTH = 12


def build_default_processor() -> CrossTVRProcessor:
    """Processor of the default model: 64 px frames, 8 frames, 12 tokens, tokenizers over the sample vocabulary."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return CrossTVRProcessor(
        image_processor,
        build_clip_tokenizer(VOCABULARY),
        build_bert_tokenizer(VOCABULARY),
        num_frames=NUM_FRAMES,
        max_text_length=MAX_TEXT_LENGTH,
    )


def build_default_config(processor: CrossTVRProcessor) -> CrossTVRConfig:
    """A CrossTVR of the paper's shape at toy width (64), depth (2) and resolution (64 px, 16 px patches)."""
    tokenizer, qformer_tokenizer = processor.tokenizer, processor.qformer_tokenizer
    return CrossTVRConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": MAX_TEXT_LENGTH,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": IMAGE_SIZE,
            "patch_size": 16,
        },
        qformer_config={
            "vocab_size": len(qformer_tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 32,
            "pad_token_id": qformer_tokenizer.pad_token_id,
        },
        temporal_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 64,
        },
        projection_dim=32,
        num_frames=NUM_FRAMES,
        num_query_tokens=8,
        num_selected_tokens=4,
        token_selection_num_samples=100,
        rerank_top_k=5,
    )


def build_default_model(seed: int = 0) -> tuple[CrossTVRModel, CrossTVRProcessor]:
    """The embedded default (model in eval mode, processor); the same weights for the same `seed`."""
    processor = build_default_processor()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CrossTVRModel(build_default_config(processor))
    return model.eval(), processor
