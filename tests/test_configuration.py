import json

import pytest
from transformers import AutoConfig, Blip2QFormerConfig, Blip2VisionConfig, CLIPTextConfig, CLIPVisionConfig

from crosstvr import CrossTVRConfig


def test_defaults_reproduce_the_paper_base_model():
    config = CrossTVRConfig()
    assert isinstance(config.text_config, CLIPTextConfig)
    assert isinstance(config.vision_config, CLIPVisionConfig)
    assert isinstance(config.qformer_config, Blip2QFormerConfig)
    # ViT-B/32 at 224 px: 7 x 7 patches + CLS = 50 tokens per frame, width 768.
    assert (config.vision_config.image_size, config.vision_config.patch_size) == (224, 32)
    assert config.vision_config.hidden_size == 768 and config.projection_dim == 512
    # BLIP-2-size Q-Former: 12 layers, hidden 768, cross-attention every 2nd layer, text FFN on.
    qformer = config.qformer_config
    assert (qformer.num_hidden_layers, qformer.hidden_size, qformer.cross_attention_frequency) == (12, 768, 2)
    assert qformer.use_qformer_text_input and qformer.encoder_hidden_size == 768
    assert (config.num_query_tokens, config.num_frames, config.num_selected_tokens) == (32, 12, 4)
    # K is the paper's; s_fine = p (the paper's) with w = 0.3, chosen on the synthetic validation split (README).
    assert (config.rerank_top_k, config.fine_score, config.fine_score_weight) == (15, "probability", 0.3)
    assert config.temporal_aggregator == "token_shift_select"
    assert config.share_spatial_temporal and not config.share_vision_tower
    assert isinstance(config.fine_vision_config, CLIPVisionConfig)
    assert config.fine_vision_config.to_dict() == config.vision_config.to_dict()


def test_save_load_round_trip(tmp_path):
    config = CrossTVRConfig(temporal_aggregator="mean", num_frames=64, rerank_top_k=7)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "crosstvr"
    assert saved["auto_map"]["AutoConfig"] == "configuration_crosstvr.CrossTVRConfig"
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, CrossTVRConfig)
    ignored = {"_name_or_path", "transformers_version"}
    assert {k: v for k, v in loaded.to_dict().items() if k not in ignored} == {
        k: v for k, v in config.to_dict().items() if k not in ignored
    }
    assert (loaded.temporal_aggregator, loaded.num_frames, loaded.rerank_top_k) == ("mean", 64, 7)


def test_stage_two_tower_family_follows_model_type():
    config = CrossTVRConfig(
        fine_vision_config={"model_type": "blip_2_vision_model", "hidden_size": 64, "num_attention_heads": 4}
    )
    assert isinstance(config.fine_vision_config, Blip2VisionConfig)
    assert config.qformer_config.encoder_hidden_size == 64
    assert config.fine_vision_hidden_size == 64


def test_shared_tower_has_no_separate_config():
    config = CrossTVRConfig(share_vision_tower=True)
    assert config.fine_vision_config is None
    assert config.qformer_config.encoder_hidden_size == config.vision_config.hidden_size


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"temporal_aggregator": "lstm"}, "temporal_aggregator='lstm'"),
        ({"share_vision_tower": True, "fine_vision_config": {"model_type": "clip_vision_model"}}, "left unset"),
        ({"fine_vision_config": {"model_type": "clip_text_model"}}, "stage-2 tower must be"),
        ({"num_frames": 40}, "raise it"),
        ({"temporal_aggregator": "transformer", "projection_dim": 256}, "must equal projection_dim"),
        ({"token_shift_layers": 13}, "token_shift_layers=13"),
        ({"rerank_top_k": 0}, "rerank_top_k must be at least 1"),
        ({"frame_position_embeddings_init_std": -1.0}, "must be >= 0"),
    ],
)
def test_invalid_settings_are_rejected_with_the_fix(overrides, message):
    with pytest.raises(ValueError, match=message):
        CrossTVRConfig(**overrides)


@pytest.mark.parametrize(
    "field, value", [("rerank_top_k", 2.5), ("num_frames", "12"), ("fine_score_weight", "high"), ("share_vision_tower", "no")]
)
def test_bad_types_fail_at_construction_naming_the_field(tester, field, value):
    with pytest.raises(Exception, match=f"Field '{field}' expected"):
        tester.get_config(**{field: value})
