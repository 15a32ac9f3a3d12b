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
"""CrossTVR model configuration.

This file is Hub-portable: it imports only the standard library, `transformers` and `huggingface_hub`'s `strict`
(which transformers always installs and its own configurations use), and `save_pretrained` copies it next to every
checkpoint.
"""

import copy

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, Blip2QFormerConfig, CLIPTextConfig, CLIPVisionConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


TEMPORAL_AGGREGATORS = ("mean", "transformer", "token_shift_select")
SIMILARITY_HEADS = ("mean", "text_conditioned", "cret")
GEES_BOUNDS = ("slides", "jensen")
FINE_MODULES = ("crosstvr", "t2v2t")
FINE_ATTENTIONS = ("spatial_temporal", "spatial", "temporal")
FINE_VISION_MODEL_TYPES = ("clip_vision_model", "blip_2_vision_model")
FINE_SCORES = ("probability", "log_probability", "logit")
# The pipeline `transformers.pipeline(model=..., trust_remote_code=True)` builds for a CrossTVR checkpoint (the class
# lives in processing_crosstvr.py, which every checkpoint carries).
CUSTOM_PIPELINES = {
    "text-video-retrieval": {
        "impl": "processing_crosstvr.TextVideoRetrievalPipeline",
        "pt": ["AutoModel"],
        "type": "multimodal",
    }
}


@strict
class CrossTVRConfig(PreTrainedConfig):
    r"""
    Configuration of a [`CrossTVRModel`]: a two-stage text-video retrieval model ("Fine-grained Text-Video Retrieval
    with Frozen Image Encoders"). Stage 1 is a CLIP dual encoder whose frame embeddings are aggregated over time; stage
    2 re-ranks the stage-1 top K with a frozen vision tower and a BLIP-2 Q-Former run twice, first per frame (spatial
    text attention) and then over the selected tokens of all frames (temporal text attention).

    The defaults reproduce the paper's Base model: CLIP ViT-B/32 towers, TS2-Net token shift and token selection as the
    stage-1 aggregator, a BLIP-2-size Q-Former (12 layers, hidden 768, cross-attention every 2nd layer) with 32 query
    tokens, M = 4 selected tokens per frame, 12 frames and re-ranking depth K = 15.

    Args:
        text_config (`dict` or `CLIPTextConfig`, *optional*):
            The stage-1 CLIP text tower.
        vision_config (`dict` or `CLIPVisionConfig`, *optional*):
            The stage-1 CLIP vision tower (fine-tuned in stage 1).
        qformer_config (`dict` or `Blip2QFormerConfig`, *optional*):
            The Q-Former of the decoupled video-text cross attention. `encoder_hidden_size` is set to the width of the
            stage-2 vision tower and `use_qformer_text_input` to `True` (the text positions of the Q-Former need their
            own feed-forward layers, as in BLIP-2's image-text matching).
        temporal_config (`dict` or `CLIPTextConfig`, *optional*):
            The temporal transformer of the "transformer" and "token_shift_select" aggregators (CLIP4Clip's seqTransf:
            4 CLIP text-encoder layers of width `projection_dim`, which CLIP4Clip initialises from the CLIP text tower).
            `max_position_embeddings` bounds the number of temporal positions: frames for "transformer", frames x
            (1 + `coarse_num_selected_patches`) tokens for "token_shift_select".
        fine_vision_config (`dict`, `CLIPVisionConfig` or `Blip2VisionConfig`, *optional*):
            The frozen stage-2 vision tower; the tower family follows `model_type` (`"clip_vision_model"` for CLIP
            ViT-B/32, `"blip_2_vision_model"` for BLIP-2's EVA ViT-g/14). Defaults to a copy of `vision_config` and
            must be left unset when `share_vision_tower=True`.
        projection_dim (`int`, *optional*, defaults to 512):
            Dimension of the joint stage-1 embedding space.
        logit_scale_init_value (`float`, *optional*, defaults to 2.6592):
            Initial value of the learnable log temperature of the contrastive loss (CLIP's log(1 / 0.07)).
        num_frames (`int`, *optional*, defaults to 12):
            Frames T sampled per video (the paper uses 64 for DiDeMo). Bounds the fine frame position embeddings.
        temporal_aggregator (`str`, *optional*, defaults to `"token_shift_select"`):
            How stage 1 aggregates frames: `"mean"` (CLIP4Clip meanP, works zero-shot from CLIP), `"transformer"`
            (CLIP4Clip seqTransf) or `"token_shift_select"` (TS2-Net, the paper's stage 1).
        similarity_head (`str`, *optional*, defaults to `"mean"`):
            How stage 1 meets a text with the aggregated frames: `"mean"`, the cosine with the masked mean of the
            frame embeddings (CLIP4Clip meanP: one vector per video); `"text_conditioned"`, TS2-Net's released
            similarity, the frames' cosines pooled with a softmax conditioned on the text (see
            `text_conditioned_frame_similarity`; a video is then its T frame embeddings).
        frame_softmax_scale (`float`, *optional*, defaults to 4.0):
            The factor of the normalised frame similarities in the `"text_conditioned"` head's softmax (TS2-Net's 4).
            `similarity_head="cret"` is CRET's: the global cosine plus β times the local similarity of the features
            that learnable query centres gather from the patch and word tokens (CCM), trained with the Gaussian bound
            GEES (see `CrossTVRCRETSimilarity`).
        cret_num_centers (`int`, *optional*, defaults to 4):
            CRET's query centres C, each giving one local feature per video and per text.
        cret_num_heads (`int`, *optional*, defaults to 8):
            Heads of CCM's attention (one module shared by the video and the text decoder); divides `projection_dim`.
        cret_local_weight (`float`, *optional*, defaults to 1.0):
            β in S = S_g + β S_l (> 0).
        cret_ccm_loss_weight (`float`, *optional*, defaults to 1.0):
            α in L = L_GEES + α L_CCM.
        cret_gees_bound (`str`, *optional*, defaults to `"slides"`):
            `"slides"`, the closed form as the CRET slides write it (the variance term in the numerator too), or
            `"jensen"`, the form that provably bounds the expected NCE loss from above (the numerator without it).
        token_shift_layers (`int`, *optional*, defaults to 2):
            TS2-Net token shift is applied in this many last layers of the stage-1 vision tower.
        token_shift_fold_div (`int`, *optional*, defaults to 7):
            TS2-Net's shift period: every `fold`-th patch (fold = tokens // `token_shift_fold_div`) is taken from the
            previous frame and the patches `fold // 2` further on from the next frame.
        coarse_num_selected_patches (`int`, *optional*, defaults to 3):
            Patches TS2-Net's token selection keeps per frame beside the CLS token.
        num_query_tokens (`int`, *optional*, defaults to 32):
            Learnable query embeddings N_Q of the spatial text attention.
        num_selected_tokens (`int`, *optional*, defaults to 4):
            Tokens M per frame the stage-2 token selector passes to the temporal text attention.
        token_selection_num_samples (`int`, *optional*, defaults to 500):
            Noise samples of the perturbed-maximum top-k used by both token selectors in training.
        token_selection_sigma (`float`, *optional*, defaults to 0.05):
            Noise scale of the perturbed-maximum top-k.
        fine_module (`str`, *optional*, defaults to `"crosstvr"`):
            How stage 2 turns a (text, video tokens) pair into a matching logit: `"crosstvr"`, the paper's decoupled
            spatial/temporal text attention (the options from `num_query_tokens` to `temporal_text_input` configure
            it), or `"t2v2t"`, T2V2T fusion (Kim et al., "Text-to-Video-to-Text Fusion"): each frame's tokens attend to
            the caption (bypass cross-attention), then the caption's positions run through the Q-Former cross-attending
            to the fused tokens of all frames, and the matching head reads the first position. Both train with the same
            matching loss and re-rank the same top K.
        t2v2t_bypass (`bool`, *optional*, defaults to `True`):
            With `fine_module="t2v2t"`: the keys and values of the text-to-video fusion are the caption *and the
            frame's own tokens* (bypass cross-attention, so that a frame the caption does not describe can attend to
            itself); `False` keeps the caption only (the poster's "naive T2V2T" ablation).
        fine_attention (`str`, *optional*, defaults to `"spatial_temporal"`):
            The decoupled cross attention of stage 2 (`"spatial_temporal"`, the paper's) or one of its halves, for the
            paper's ablation: `"spatial"` pools X_spatial(t) over frames into the matching head; `"temporal"` lets the
            N_Q query tokens attend to the selected tokens of all frames, without the per-frame spatial pass.
        share_spatial_temporal (`bool`, *optional*, defaults to `True`):
            Whether spatial and temporal text attention share the Q-Former and its text embeddings (the paper's
            choice, Table 9); `False` builds a second Q-Former for the temporal pass.
        fine_vision_projection (`bool`, *optional*, defaults to `False`):
            Project the stage-2 tokens with a learned linear layer to the width the Q-Former's cross-attention was
            pre-trained on (`qformer_config.encoder_hidden_size`, e.g. BLIP-2's 1408), instead of sizing the
            cross-attention to the tower. Lets a CLIP ViT-B/32 tower (768) keep all of BLIP-2's cross-attention weights
            (`convert_checkpoint.py --cross-attention project`).
        share_vision_tower (`bool`, *optional*, defaults to `False`):
            Whether stage 2 reads the stage-1 vision tower instead of a separate frozen one (the paper's appendix:
            same accuracy, smaller model).
        use_frame_position_embeddings (`bool`, *optional*, defaults to `True`):
            Add a learnable frame position embedding P_t to X_spatial(t) before the temporal pass (zero-initialised
            unless `frame_position_embeddings_init_std` says otherwise). The paper's equations leave the temporal pass
            without any notion of frame order; at a zero initialisation this is exactly the paper's module, and
            training can learn order ("A, then B").
        frame_position_embeddings_init_std (`float`, *optional*, defaults to 0.0):
            Standard deviation of the normal distribution the frame position embeddings P_t start from; 0 starts them
            at zero (the paper has no P_t, so this is our choice). From zero they stay far below the scale of
            X_spatial(t) in a short stage 2 (the synthetic benchmark: norm 0.03 against 7.6 after 250 steps); a std of
            about `norm(X_spatial(t)) / sqrt(qformer_config.hidden_size)` starts them at that scale (1.0 there). On that
            benchmark's validation split this did not raise R@1 (README), so the default stays zero.
        use_token_frame_embeddings (`bool`, *optional*, defaults to `False`):
            Add a learnable, zero-initialised embedding E_t of the frame index to the M selected tokens of frame t
            before the temporal pass (keys and values V_select(t) + E_t), as TimeSformer and ViViT add temporal
            embeddings to their tokens. In the paper's Eqs. 5-6 the M x T keys carry no frame index, so the temporal
            pass sees the selected tokens as a set: only the queries (with `use_frame_position_embeddings`) know the
            order. At initialisation this is exactly the paper's module.
        use_temporal_difference_tokens (`bool`, *optional*, defaults to `False`):
            Give the fine module, beside the N tokens V_t of each frame, their differences from the previous frame's
            tokens at the same positions, V_t - V_{t-1} (zero for the first real frame): 2N tokens per frame. Motion
            shows in these differences where a single frame's tokens do not show it (the motion cue of temporal
            difference networks, Wang et al., CVPR 2021). T2V2T reads all 2N; CrossTVR's temporal pass selects its M
            tokens among them, while its spatial pass keeps the frame's own N tokens. Adds no parameters.
        temporal_text_input (`bool`, *optional*, defaults to `False`):
            Whether the caption's tokens join X_spatial(t) as inputs of the temporal text attention of
            `"spatial_temporal"`. The paper's Eq. 5 (`False`) makes the T spatial outputs alone the queries: the text
            reaches the temporal pass only through them. `True` concatenates the caption again, as BLIP-2's matching
            path does in the spatial pass. (The `"temporal"` ablation, which has no spatial pass, always reads the
            caption beside the query tokens.)
        rerank_top_k (`int`, *optional*, defaults to 15):
            Re-ranking depth K: candidates per query that stage 2 scores.
        fine_score (`str`, *optional*, defaults to `"probability"`):
            What s_fine is, from the matching head's probability p of a match: `"probability"` (p, the paper's
            "matching score"), `"log_probability"` (log p) or `"logit"` (the log-odds log(p / (1 - p)), the difference
            of the two logits).
        fine_score_weight (`float`, *optional*, defaults to 0.3):
            w in the fused score s = s_coarse + w * s_fine of the re-ranked candidates, where s_coarse is the stage-1
            cosine similarity. The paper adds the two (w = 1); 0.3 is what the synthetic benchmark's validation split
            chose among p, log p and the log-odds with w in {0.01 ... 3} (the README has the grid): stage-1 cosines
            within a top K differ by hundredths, so at w = 1 the fine score decides alone, while a smaller w lets the
            two stages' different strengths combine.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the initialisation of the layers CrossTVR adds.
        custom_pipelines (`dict`, *optional*):
            The pipelines `transformers.pipeline` offers for the checkpoint; defaults to `"text-video-retrieval"`
            (`TextVideoRetrievalPipeline`).

    Example:

    ```python
    >>> from crosstvr import CrossTVRConfig, CrossTVRModel

    >>> config = CrossTVRConfig()  # the paper's Base model
    >>> model = CrossTVRModel(config)
    ```"""

    model_type = "crosstvr"
    sub_configs_defaults = {
        "text_config": CLIPTextConfig,
        "vision_config": CLIPVisionConfig,
        "qformer_config": SubConfigSpec(Blip2QFormerConfig, init_kwargs={"use_qformer_text_input": True}),
        "temporal_config": SubConfigSpec(
            CLIPTextConfig,
            init_kwargs={
                "hidden_size": 512,
                "intermediate_size": 2048,
                "num_hidden_layers": 4,
                "num_attention_heads": 8,
                "max_position_embeddings": 128,
            },
        ),
        "fine_vision_config": SubConfigSpec(AutoConfig, model_type="clip_vision_model", optional=True),
    }

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    qformer_config: dict | PreTrainedConfig | None = None
    temporal_config: dict | PreTrainedConfig | None = None
    fine_vision_config: dict | PreTrainedConfig | None = None
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    num_frames: int = 12
    temporal_aggregator: str = "token_shift_select"
    similarity_head: str = "mean"
    frame_softmax_scale: float = 4.0
    cret_num_centers: int = 4
    cret_num_heads: int = 8
    cret_local_weight: float = 1.0
    cret_ccm_loss_weight: float = 1.0
    cret_gees_bound: str = "slides"
    token_shift_layers: int = 2
    token_shift_fold_div: int = 7
    coarse_num_selected_patches: int = 3
    num_query_tokens: int = 32
    num_selected_tokens: int = 4
    token_selection_num_samples: int = 500
    token_selection_sigma: float = 0.05
    fine_module: str = "crosstvr"
    t2v2t_bypass: bool = True
    fine_attention: str = "spatial_temporal"
    share_spatial_temporal: bool = True
    fine_vision_projection: bool = False
    share_vision_tower: bool = False
    use_frame_position_embeddings: bool = True
    frame_position_embeddings_init_std: float = 0.0
    use_token_frame_embeddings: bool = False
    use_temporal_difference_tokens: bool = False
    temporal_text_input: bool = False
    rerank_top_k: int = 15
    fine_score: str = "probability"
    fine_score_weight: float = 0.3
    initializer_range: float = 0.02
    custom_pipelines: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.custom_pipelines is None:
            self.custom_pipelines = copy.deepcopy(CUSTOM_PIPELINES)
        if self.fine_vision_config is None and not self.share_vision_tower:
            self.fine_vision_config = copy.deepcopy(self.vision_config)
        # The Q-Former cross-attends to the stage-2 vision tokens (projected or not), and its text positions need
        # their own FFN.
        if not self.fine_vision_projection:
            self.qformer_config.encoder_hidden_size = self.fine_vision_hidden_size
        self.qformer_config.use_qformer_text_input = True
        self.validate_architecture()

    @property
    def fine_vision_hidden_size(self) -> int:
        """Width of the stage-2 vision tokens (the stage-1 tower's when the tower is shared)."""
        tower = self.vision_config if self.share_vision_tower else self.fine_vision_config
        return tower.hidden_size

    @property
    def fine_token_hidden_size(self) -> int:
        """Width of the tokens the fine module reads (after `fine_vision_projection`, if any)."""
        return self.qformer_config.encoder_hidden_size

    def validate_architecture(self):
        """Part of `@strict`-powered validation: rejects settings that cannot build a network."""
        if self.temporal_aggregator not in TEMPORAL_AGGREGATORS:
            raise ValueError(
                f"temporal_aggregator={self.temporal_aggregator!r} is not one of {TEMPORAL_AGGREGATORS}."
            )
        if self.similarity_head not in SIMILARITY_HEADS:
            raise ValueError(f"similarity_head={self.similarity_head!r} is not one of {SIMILARITY_HEADS}.")
        if self.similarity_head == "cret":
            if self.cret_gees_bound not in GEES_BOUNDS:
                raise ValueError(f"cret_gees_bound={self.cret_gees_bound!r} is not one of {GEES_BOUNDS}.")
            if self.cret_local_weight <= 0:
                raise ValueError(f"cret_local_weight={self.cret_local_weight} must be > 0 (without the local score, "
                                 "use similarity_head='mean').")
            if self.projection_dim % self.cret_num_heads:
                raise ValueError(f"cret_num_heads={self.cret_num_heads} does not divide projection_dim="
                                 f"{self.projection_dim}.")
        if self.fine_module not in FINE_MODULES:
            raise ValueError(f"fine_module={self.fine_module!r} is not one of {FINE_MODULES}.")
        if self.fine_module == "t2v2t":
            if self.fine_attention != "spatial_temporal":
                raise ValueError(
                    f"fine_attention={self.fine_attention!r} ablates CrossTVR's fine module; T2V2T has no spatial and "
                    "temporal passes. Leave fine_attention at 'spatial_temporal' with fine_module='t2v2t'."
                )
            if self.fine_token_hidden_size % self.qformer_config.num_attention_heads:
                raise ValueError(
                    f"T2V2T's text-to-video fusion attends at the width of the stage-2 tokens "
                    f"({self.fine_token_hidden_size}) with qformer_config.num_attention_heads="
                    f"{self.qformer_config.num_attention_heads} heads; choose a number of heads that divides it."
                )
        if self.fine_attention not in FINE_ATTENTIONS:
            raise ValueError(f"fine_attention={self.fine_attention!r} is not one of {FINE_ATTENTIONS}.")
        if self.frame_position_embeddings_init_std < 0:
            raise ValueError(f"frame_position_embeddings_init_std={self.frame_position_embeddings_init_std} must be >= 0 "
                             "(0 starts the frame position embeddings at zero).")
        if self.fine_score not in FINE_SCORES:
            raise ValueError(f"fine_score={self.fine_score!r} is not one of {FINE_SCORES}.")
        if self.share_vision_tower and self.fine_vision_config is not None:
            raise ValueError(
                "fine_vision_config must be left unset when share_vision_tower=True: stage 2 then reads the stage-1 "
                "vision tower."
            )
        if self.fine_vision_config is not None and self.fine_vision_config.model_type not in FINE_VISION_MODEL_TYPES:
            raise ValueError(
                f"fine_vision_config has model_type {self.fine_vision_config.model_type!r}; the stage-2 tower must be "
                f"one of {FINE_VISION_MODEL_TYPES}."
            )
        if self.temporal_aggregator != "mean" and self.temporal_config.hidden_size != self.projection_dim:
            raise ValueError(
                f"temporal_config.hidden_size ({self.temporal_config.hidden_size}) must equal projection_dim "
                f"({self.projection_dim}): the temporal transformer runs on projected frame embeddings."
            )
        temporal_positions = self.num_frames * (
            1 + self.coarse_num_selected_patches if self.temporal_aggregator == "token_shift_select" else 1
        )
        if self.temporal_aggregator != "mean" and temporal_positions > self.temporal_config.max_position_embeddings:
            raise ValueError(
                f"The {self.temporal_aggregator!r} aggregator needs {temporal_positions} temporal positions for "
                f"num_frames={self.num_frames}, but temporal_config.max_position_embeddings is "
                f"{self.temporal_config.max_position_embeddings}; raise it."
            )
        if self.temporal_aggregator == "token_shift_select" and not (
            0 <= self.token_shift_layers <= self.vision_config.num_hidden_layers
        ):
            raise ValueError(
                f"token_shift_layers={self.token_shift_layers} must lie in [0, vision_config.num_hidden_layers="
                f"{self.vision_config.num_hidden_layers}]."
            )
        for name in ("num_frames", "num_query_tokens", "num_selected_tokens", "rerank_top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")


# `save_pretrained` copies this file next to the weights and records it in `auto_map`.
CrossTVRConfig.register_for_auto_class()


__all__ = ["CrossTVRConfig"]
