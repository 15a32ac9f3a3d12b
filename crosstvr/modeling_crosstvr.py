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
"""PyTorch CrossTVR: two-stage text-video retrieval with a frozen image encoder.

Stage 1 ("coarse") is a CLIP dual encoder; stage 2 ("fine") re-ranks the stage-1 top K with a frozen vision tower and
a BLIP-2 Q-Former run as decoupled spatial and temporal text attention, followed by a matching head.

This file is Hub-portable: it imports only torch, `transformers` and its sibling `configuration_crosstvr`, and
`save_pretrained` copies it next to every checkpoint.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    Blip2QFormerConfig,
    Blip2QFormerModel,
    Blip2VisionModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.blip_2.modeling_blip_2 import (
    Blip2QFormerAttention,
    Blip2QFormerIntermediate,
    Blip2QFormerOutput,
    Blip2TextEmbeddings,
)
from transformers.models.clip.modeling_clip import CLIPAttention, CLIPEncoder, CLIPPreTrainedModel
from transformers.pytorch_utils import apply_chunking_to_forward
from transformers.utils import ModelOutput, can_return_tuple, logging

from .configuration_crosstvr import CrossTVRConfig


logger = logging.get_logger(__name__)

# The Q-Former's query rows read slices of its attention masks (`qformer_query_outputs`), which flex attention's block
# masks do not allow, and transformers' Q-Former refuses flash attention.
QFORMER_ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")

# The modules stage-2 training updates (the tower it reads is frozen).
STAGE_TWO_TRAINABLE_MODULES = ("fine_vision_projection", "fine_module")

# Checkpoints written before the fine modules became sub-modules (`CrossTVRModel.fine_module`) kept their parameters at
# the top level; `from_pretrained` renames them (anchored: stage 1's `temporal_aggregator.token_selector` stays).
LEGACY_FINE_MODULE_KEYS = {
    r"^(query_tokens|qformer_embeddings|qformer|temporal_qformer_embeddings|temporal_qformer|token_selector"
    r"|frame_position_embeddings|token_frame_embeddings|text_to_video_fusion|matching_head)\b": r"fine_module.\1",
}

# What a `CrossTVRProcessor` returns; the encoding verbs ignore the keys of the other modality.
PROCESSOR_OUTPUT_KEYS = (
    "input_ids",
    "attention_mask",
    "qformer_input_ids",
    "qformer_attention_mask",
    "pixel_values",
    "video_mask",
)

FINE_VISION_MODEL_CLASSES = {"clip_vision_model": CLIPVisionModel, "blip_2_vision_model": Blip2VisionModel}


@dataclass
class CrossTVROutput(ModelOutput):
    """
    Output of [`CrossTVRModel.forward`], the training step of both stages.

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            Sum of the losses that were computed: `loss_contrastive` always, `loss_matching` when Q-Former inputs were
            given, and `listwise_loss_weight * loss_listwise` when negative videos were given too.
        loss_contrastive (`torch.FloatTensor` of shape `()`, *optional*):
            Stage-1 loss: symmetric InfoNCE (with `similarity_head="cret"`, L_GEES + alpha L_CCM).
        loss_matching (`torch.FloatTensor` of shape `()`, *optional*):
            Stage-2 video-text matching loss on the positives and the ALBEF hard negatives.
        loss_listwise (`torch.FloatTensor` of shape `()`, *optional*):
            Stage-2 listwise loss of every text over its video and its given negative videos (see
            [`listwise_matching_loss`]); computed when `negative_vision_tokens` were given.
        logits_per_text (`torch.FloatTensor` of shape `(batch_size, batch_size)`):
            Temperature-scaled stage-1 similarities, texts x videos.
        logits_per_video (`torch.FloatTensor` of shape `(batch_size, batch_size)`):
            The transpose of `logits_per_text`.
        text_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
            L2-normalised stage-1 text embeddings.
        video_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
            L2-normalised stage-1 video embeddings (`(batch_size, frames, projection_dim)` frame embeddings with
            `similarity_head="text_conditioned"`).
        matching_logits (`torch.FloatTensor` of shape `((3 + n) * batch_size, 2)`, *optional*):
            Matching-head logits of the positive pairs, then (text, hard negative video), then (hard negative text,
            video), then (text_i, its j-th given negative video), row-major over i and j, when n negative videos per
            text were given in `negative_vision_tokens`.
        matching_labels (`torch.LongTensor` of shape `((3 + n) * batch_size,)`, *optional*):
            1 for the positive pairs, 0 for the negatives.
        text_model_output (`BaseModelOutputWithPooling`):
            The output of the CLIP text tower, with its hidden states and attentions when `output_hidden_states` and
            `output_attentions` ask for them (as in `CLIPOutput`).
        vision_model_output (`BaseModelOutputWithPooling`, *optional*):
            The output of the stage-1 vision tower on the `batch_size * frames` frames; absent when `video_embeds`
            were given.
    """

    loss: torch.FloatTensor | None = None
    loss_contrastive: torch.FloatTensor | None = None
    loss_matching: torch.FloatTensor | None = None
    loss_listwise: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    logits_per_video: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    video_embeds: torch.FloatTensor | None = None
    matching_logits: torch.FloatTensor | None = None
    matching_labels: torch.LongTensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None

    def to_tuple(self) -> tuple:
        return tuple(value.to_tuple() if isinstance(value, ModelOutput) else value for value in self.values())


@dataclass
class CrossTVRVideoOutput(ModelOutput):
    """
    Output of [`CrossTVRModel.encode_video`]: everything retrieval needs to know about a video.

    Args:
        video_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
            L2-normalised stage-1 video embeddings (`(batch_size, frames, projection_dim)` frame embeddings with
            `similarity_head="text_conditioned"`).
        vision_tokens (`torch.FloatTensor` of shape `(batch_size, frames, tokens, fine_vision_hidden_size)`):
            Tokens of the frozen stage-2 vision tower, the V_t of the fine module.
    """

    video_embeds: torch.FloatTensor | None = None
    vision_tokens: torch.FloatTensor | None = None


@dataclass
class CrossTVRRerankOutput(ModelOutput):
    """
    Output of [`CrossTVRModel.rerank_text_to_video`] and [`CrossTVRModel.rerank_video_to_text`], one row per query.

    Args:
        logits (`torch.FloatTensor` of shape `(queries, candidates)`):
            Scores whose row order is the two-stage ranking: the re-ranked top K carry their fused score shifted by a
            per-row constant above every other candidate, which keeps its stage-1 similarity. Use them to rank and to
            compute metrics; read `fused_scores` for the fused values themselves.
        ranking (`torch.LongTensor` of shape `(queries, candidates)`):
            Candidate indices, best first: the top K by fused score, then the rest in stage-1 order.
        top_k_indices (`torch.LongTensor` of shape `(queries, K)`):
            The candidates stage 2 scored, in stage-1 order.
        fine_scores (`torch.FloatTensor` of shape `(queries, K)`):
            s_fine of those candidates (`config.fine_score` of the matching head: p, log p or the log-odds).
        fused_scores (`torch.FloatTensor` of shape `(queries, K)`):
            s_coarse + w * s_fine of those candidates.
    """

    logits: torch.FloatTensor | None = None
    ranking: torch.LongTensor | None = None
    top_k_indices: torch.LongTensor | None = None
    fine_scores: torch.FloatTensor | None = None
    fused_scores: torch.FloatTensor | None = None


@dataclass
class CrossTVRRetrievalOutput(ModelOutput):
    """
    Output of [`CrossTVRModel.retrieve`]: two-stage retrieval of a batch of texts against a set of videos.

    Args:
        logits_per_text (`torch.FloatTensor` of shape `(texts, videos)`):
            Stage-1 cosine similarities s_coarse.
        text_to_video (`CrossTVRRerankOutput`):
            Re-ranked videos for every text.
        video_to_text (`CrossTVRRerankOutput`):
            Re-ranked texts for every video.
        text_embeds (`torch.FloatTensor` of shape `(texts, projection_dim)`):
            L2-normalised stage-1 text embeddings.
        video_embeds (`torch.FloatTensor` of shape `(videos, projection_dim)`):
            L2-normalised stage-1 video embeddings (`(videos, frames, projection_dim)` frame embeddings with
            `similarity_head="text_conditioned"`).
    """

    logits_per_text: torch.FloatTensor | None = None
    text_to_video: CrossTVRRerankOutput | None = None
    video_to_text: CrossTVRRerankOutput | None = None
    text_embeds: torch.FloatTensor | None = None
    video_embeds: torch.FloatTensor | None = None


def masked_mean_pool(frame_embeds: torch.Tensor, video_mask: torch.Tensor) -> torch.Tensor:
    r"""
    CLIP4Clip's mean pooling ("meanP") of frame embeddings into one video embedding:

        v = normalize( sum_t m_t normalize(f_t) / sum_t m_t )

    Args:
        frame_embeds: `(batch, frames, dim)`.
        video_mask: `(batch, frames)`, 1 for real frames and 0 for padding.

    Returns:
        `(batch, dim)`, L2-normalised.
    """
    frame_embeds = F.normalize(frame_embeds, dim=-1)
    weights = video_mask.to(frame_embeds.dtype).unsqueeze(-1)  # (batch, frames, 1)
    pooled = (frame_embeds * weights).sum(dim=1) / weights.sum(dim=1)
    return F.normalize(pooled, dim=-1)


def text_conditioned_frame_similarity(
    text_embeds: torch.Tensor, frame_embeds: torch.Tensor, scale: float = 4.0, chunk_size: int = 1024
) -> torch.Tensor:
    r"""
    TS2-Net's stage-1 similarity (`get_frame_similarity` of its released model): every frame's cosine with the text,
    pooled over the video's real frames with a softmax conditioned on the text,

        s_f     = <t, f_f>                                  t and f_f L2-normalised
        a_f     = softmax_f( scale * s_f / ||s||_2 )        over the real frames, ||s||_2 the norm over them
        S(t, v) = sum_f a_f s_f

    so that the frames that match the text best dominate, smoothly (scale 4 in TS2-Net). TS2-Net also blends in a
    similarity on selected words (`get_frame_selectedcls_similarity`, weighted by `frame_match_weight`); with the
    word selection its release leaves switched off, that similarity has one text token and equals this one, so the
    blend is this similarity for every weight.

    Args:
        text_embeds: `(texts, dim)`, L2-normalised.
        frame_embeds: `(videos, frames, dim)`, L2-normalised rows; padding frames are zero rows.
        scale: the factor of the normalised similarities in the softmax.
        chunk_size: texts scored at a time (the `(texts, videos, frames)` cosines are the memory).

    Returns:
        `(texts, videos)`.
    """
    real_frames = torch.linalg.vector_norm(frame_embeds, dim=-1) > 0  # (videos, frames)
    rows = []
    for start in range(0, len(text_embeds), chunk_size):
        chunk = text_embeds[start : start + chunk_size]
        # One (videos * frames, dim) x (dim, chunk) product, then (chunk, videos, frames).
        frame_similarity = (frame_embeds.flatten(0, 1) @ chunk.t()).t().view(len(chunk), *frame_embeds.shape[:2])
        # Padding frames have s_f = 0, so the norm runs over the real frames; the softmax then skips the padding.
        weights = scale * F.normalize(frame_similarity, dim=-1)
        weights = weights.masked_fill(~real_frames, torch.finfo(weights.dtype).min).softmax(dim=-1)
        rows.append((weights * frame_similarity).sum(dim=-1))  # (chunk, videos)
    return torch.cat(rows)


def contrastive_loss(logits_per_text: torch.Tensor, positive_mask: torch.Tensor) -> torch.Tensor:
    r"""
    Symmetric InfoNCE of CLIP / CLIP4Clip over a batch of (text_i, video_i) pairs:

        L = 1/2 [ -1/B sum_i log softmax_j(s_ij)_i  -  1/B sum_j log softmax_i(s_ij)_j ]

    where s = `logits_per_text` (already temperature-scaled). When a video appears several times in the batch, its
    other captions are neither positives nor negatives: they are removed from the denominators.

    Args:
        logits_per_text: `(batch, batch)`, texts x videos.
        positive_mask: `(batch, batch)` bool, True where text i describes video j (the diagonal included).
    """
    batch_size = logits_per_text.shape[0]
    diagonal = torch.eye(batch_size, dtype=torch.bool, device=logits_per_text.device)
    logits = logits_per_text.masked_fill(positive_mask & ~diagonal, float("-inf"))
    labels = torch.arange(batch_size, device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def gees_loss(
    text_embeds: torch.Tensor,
    video_means: torch.Tensor,
    video_variances: torch.Tensor,
    logit_scale: torch.Tensor,
    positive_mask: torch.Tensor,
    bound: str = "slides",
) -> torch.Tensor:
    r"""
    CRET's Gaussian estimation of the embedding space (GEES): a video's frame embeddings are draws of
    v_j ~ N(mu_j, diag sigma_j), and the text-to-video NCE loss is replaced by a closed form of its expectation over
    the draws, from E[exp(tau <t, v_j>)] = exp(tau <t, mu_j> + tau^2 / 2 <t, sigma_j t>):

        g_ij = tau <t_i, mu_j> + tau^2 / 2 <t_i^2, sigma_j>
        "slides":  L = -1/B sum_i log softmax_j(g_ij)_i
        "jensen":  L = -1/B sum_i [ tau <t_i, mu_i> - log sum_j exp(g_ij) ]

    "jensen" bounds E_v[L_NCE] from above (Jensen's inequality on the log of the denominator; the numerator's
    expectation is exact). "slides" keeps the variance term in the numerator too, as the CRET slides write it: lower
    by tau^2 / 2 <t_i^2, sigma_i>, so not a bound in general (`tests/test_cret.py` checks both against a Monte-Carlo
    estimate). The slides leave the denominator's indices garbled; here it runs over the batch's videos, and other
    captions of a text's own video are removed from it, as in [`contrastive_loss`].

    Args:
        text_embeds: `(batch, dim)` t, L2-normalised.
        video_means: `(batch, dim)` mu.
        video_variances: `(batch, dim)` sigma, the diagonal of each video's covariance.
        logit_scale: tau, the temperature's inverse.
        positive_mask: `(batch, batch)` bool, True where text i describes video j (the diagonal included).
        bound: "slides" or "jensen".
    """
    logits = logit_scale * text_embeds @ video_means.t() + logit_scale**2 / 2 * text_embeds.square() @ video_variances.t()
    diagonal = torch.eye(len(logits), dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(positive_mask & ~diagonal, float("-inf"))
    if bound == "slides":
        numerator = logits.diagonal()
    else:
        numerator = logit_scale * (text_embeds * video_means).sum(dim=-1)
    return (logits.logsumexp(dim=1) - numerator).mean()


def sample_hard_negatives(
    logits_per_text: torch.Tensor, positive_mask: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    ALBEF / BLIP hard-negative mining from the stage-1 similarities of a batch: for every text i one negative video

        j ~ softmax_j(s_ij)  over the videos that do not match text i,

    and for every video j one negative text i ~ softmax_i(s_ij) likewise, so that harder negatives are drawn more often.

    Args:
        logits_per_text: `(texts, videos)` temperature-scaled stage-1 similarities (no gradient is needed).
        positive_mask: `(texts, videos)` bool, True where the text describes the video.
        generator: optional random generator, for reproducible sampling.

    Returns:
        `(negative_video_per_text (texts,), negative_text_per_video (videos,))` as index tensors.
    """
    logits_per_text = logits_per_text.detach().float()
    # BLIP adds a small constant so that rows whose negatives all underflow can still be sampled.
    weights_text_to_video = (logits_per_text.softmax(dim=1) + 1e-4).masked_fill(positive_mask, 0)
    weights_video_to_text = (logits_per_text.t().softmax(dim=1) + 1e-4).masked_fill(positive_mask.t(), 0)
    if (weights_text_to_video.sum(dim=1) == 0).any() or (weights_video_to_text.sum(dim=1) == 0).any():
        raise ValueError(
            "Hard-negative sampling needs, for every text, a video of the batch it does not describe (and vice "
            "versa); this batch has none. Use batches with at least two different videos."
        )
    negative_video = torch.multinomial(weights_text_to_video, 1, generator=generator).squeeze(1)
    negative_text = torch.multinomial(weights_video_to_text, 1, generator=generator).squeeze(1)
    return negative_video, negative_text


def listwise_matching_loss(matching_logits: torch.Tensor, num_rows: int, reduction: str = "mean") -> torch.Tensor:
    r"""
    The localized contrastive estimation loss of a re-ranker (LCE; Gao, Dai and Callan, "Rethink Training of BERT
    Rerankers in Multi-Stage Retrieval Pipeline", ECIR 2021): every text ranks its own video above n negative videos
    drawn from the candidates the first stage returns for it,

        L = -log( exp s(t, v+) / (exp s(t, v+) + sum_j exp s(t, v-_j)) ),   s = z_match - z_no_match

    where s is the matching head's log-odds, the score re-ranking orders candidates by (up to the monotone p or
    log p). The matching loss asks each pair's probability to be right on its own; this one asks only for the order
    within a caption's candidates, which is what re-ranking uses.

    Args:
        matching_logits: `((3 + n) * num_rows, 2)` logits of the pairs of [`matching_pair_inputs`] for `num_rows`
            texts with n given negatives each: the positives first, the given negatives last.
        num_rows: the number of texts.
        reduction: "mean" or "sum" over the texts.
    """
    log_odds = matching_logits[:, 1] - matching_logits[:, 0]  # ((3 + n) * rows,)
    positive_scores = log_odds[:num_rows]  # (rows,)
    negative_scores = log_odds[3 * num_rows :].unflatten(0, (num_rows, -1))  # (rows, n)
    scores = torch.cat([positive_scores.unsqueeze(1), negative_scores], dim=1).float()  # (rows, 1 + n)
    return F.cross_entropy(scores, scores.new_zeros(len(scores), dtype=torch.long), reduction=reduction)


def fuse_reranking(
    similarity: torch.Tensor,
    coarse_ranking: torch.Tensor,
    fine_scores: torch.Tensor,
    fine_score_weight: float,
    coarse_scores: torch.Tensor | None = None,
) -> CrossTVRRerankOutput:
    r"""
    The two-stage ranking of every row of `similarity` (queries x candidates), given its stage-1 order
    `coarse_ranking` (a stable descending sort of the row) and the stage-2 scores of its first K candidates
    `fine_scores` (queries x K):

        s = s_coarse + w * s_fine  for the top K, ordered by s;  the other candidates follow in stage-1 order.

    s_coarse is read from `coarse_scores` (default: `similarity`). When `similarity` is post-processed (DSL, QB-Norm),
    pass the stage-1 cosine as `coarse_scores`: post-processing then chooses the K candidates and orders the rest,
    while the fused score keeps the cosine's scale, which post-processing shrinks by orders of magnitude.

    Ties are broken by candidate index everywhere (as the metrics do), so `ranking` and `logits` always agree. The fine
    scores of a shorter prefix give the ranking at a smaller depth, so one scoring serves every K <= K_max.
    """
    num_candidates, top_k = similarity.shape[1], fine_scores.shape[1]
    top_k_indices = coarse_ranking[:, :top_k]
    coarse_top_k = (similarity if coarse_scores is None else coarse_scores).gather(1, top_k_indices)
    fused_scores = coarse_top_k + fine_score_weight * fine_scores.to(coarse_top_k.dtype)
    by_index = top_k_indices.argsort(dim=1)  # a stable sort by the fused score then breaks ties by index
    order = by_index.gather(1, fused_scores.gather(1, by_index).sort(dim=1, descending=True, stable=True).indices)
    ranking = torch.cat([top_k_indices.gather(1, order), coarse_ranking[:, top_k:]], dim=1)
    if top_k < num_candidates:
        # Shift the fused scores of each row above its best remaining stage-1 score.
        best_rest = similarity.gather(1, coarse_ranking[:, top_k : top_k + 1])
        offset = best_rest - fused_scores.min(dim=1, keepdim=True).values + 1
        logits = similarity.scatter(1, top_k_indices, fused_scores + offset)
    else:
        logits = similarity.scatter(1, top_k_indices, fused_scores)
    return CrossTVRRerankOutput(
        logits=logits,
        ranking=ranking,
        top_k_indices=top_k_indices,
        fine_scores=fine_scores,
        fused_scores=fused_scores,
    )


def matching_pairs(
    batch_size: int, negative_video: torch.Tensor, negative_text: torch.Tensor, offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    The 3B video-text matching pairs of the B rows `offset .. offset + B - 1` of a (possibly gathered) batch: each
    positive (text_i, video_i), then (text_i, its hard negative video), then (the hard negative text of video_j,
    video_j). Returns `(text_index, video_index, labels)` into the batch, labels 1 for positives and 0 for negatives.
    """
    rows = torch.arange(offset, offset + batch_size, device=negative_video.device)
    text_index = torch.cat([rows, rows, negative_text[rows]])
    video_index = torch.cat([rows, negative_video[rows], rows])
    labels = torch.cat([torch.ones_like(rows), torch.zeros_like(rows), torch.zeros_like(rows)])
    return text_index, video_index, labels


def matching_pair_inputs(
    qformer_input_ids: torch.Tensor,
    qformer_attention_mask: torch.Tensor,
    vision_tokens: torch.Tensor,
    video_mask: torch.Tensor,
    negative_video: torch.Tensor,
    negative_text: torch.Tensor,
    rows: slice,
    negative_vision_tokens: torch.Tensor | None = None,
    negative_video_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    The inputs of [`CrossTVRModel.get_fine_logits`] for the matching pairs of the batch rows `rows` (see
    [`matching_pairs`]; the first four arguments hold the whole, possibly gathered, batch), followed, when
    `negative_vision_tokens` `(rows, n, frames, tokens, width)` (n videos per row of `rows`) are given, by
    (text_i, its j-th given negative) with label 0, row-major over i and j.

    Returns:
        `(qformer_input_ids, qformer_attention_mask, vision_tokens, video_mask, labels)` of the pairs.
    """
    text_index, video_index, labels = matching_pairs(rows.stop - rows.start, negative_video, negative_text, rows.start)
    pair_input_ids, pair_attention_mask = qformer_input_ids[text_index], qformer_attention_mask[text_index]
    pair_tokens, pair_video_mask = vision_tokens[video_index], video_mask[video_index]
    if negative_vision_tokens is not None:
        if negative_vision_tokens.dim() != 5:
            raise ValueError(
                "negative_vision_tokens must be shaped (rows, negatives per row, frames, tokens, width), got "
                f"{tuple(negative_vision_tokens.shape)}"
            )
        per_row = negative_vision_tokens.shape[1]
        if negative_video_mask is None:
            negative_video_mask = video_mask.new_ones(negative_vision_tokens.shape[:3])
        pair_input_ids = torch.cat([pair_input_ids, qformer_input_ids[rows].repeat_interleave(per_row, dim=0)])
        pair_attention_mask = torch.cat(
            [pair_attention_mask, qformer_attention_mask[rows].repeat_interleave(per_row, dim=0)]
        )
        pair_tokens = torch.cat([pair_tokens, negative_vision_tokens.flatten(0, 1).to(pair_tokens.dtype)])
        pair_video_mask = torch.cat([pair_video_mask, negative_video_mask.flatten(0, 1)])
        labels = torch.cat([labels, labels.new_zeros(len(negative_vision_tokens) * per_row)])
    return pair_input_ids, pair_attention_mask, pair_tokens, pair_video_mask, labels


def all_gather_with_grad(tensor: torch.Tensor, group) -> torch.Tensor:
    """
    Concatenate `tensor` from every process of `group` along dim 0. Gradients flow back to every process's own slice,
    summed over the processes' losses: when every process computes the same global loss, DDP's gradient averaging then
    yields exactly the single-process gradient of that loss. All processes must pass the same shape.
    """
    import torch.distributed.nn

    return torch.cat(torch.distributed.nn.functional.all_gather(tensor.contiguous(), group=group), dim=0)


def all_gather_no_grad(tensor: torch.Tensor, group) -> torch.Tensor:
    """Concatenate `tensor` from every process of `group` along dim 0, without gradient."""
    gathered = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(gathered, tensor.detach().contiguous(), group=group)
    return torch.cat(gathered, dim=0)


def shift_tokens(hidden_states: torch.Tensor, video_mask: torch.Tensor, fold_div: int) -> torch.Tensor:
    r"""
    TS2-Net token shift: whole patch tokens are exchanged between neighbouring frames so that attention inside a frame
    sees a little motion context. With fold = max(tokens // fold_div, 2), the patches at positions 1, 1 + fold,
    1 + 2 fold, ... of frame t are replaced by those of frame t - 1, and the patches at 1 + fold // 2 + k fold by those
    of frame t + 1 (TS2-Net: fold_div 7, 50 tokens -> 7 patches each way). The CLS token is never shifted, and no
    token is exchanged with a padding frame (TS2-Net itself ignores padding), so padding cannot leak into real frames.

    Args:
        hidden_states: `(batch * frames, tokens, dim)`, the frames of a video contiguous.
        video_mask: `(batch, frames)`, 0 marks padding frames.
    """
    batch_size, num_frames = video_mask.shape
    frames_total, num_tokens, dim = hidden_states.shape
    if frames_total != batch_size * num_frames:
        raise ValueError(f"token shift got {frames_total} frames for a video_mask of shape {tuple(video_mask.shape)}")
    tokens = hidden_states.view(batch_size, num_frames, num_tokens, dim)
    fold = max(num_tokens // fold_div, 2)
    from_previous = torch.arange(1, num_tokens, fold, device=tokens.device)
    from_next = torch.arange(1 + fold // 2, num_tokens, fold, device=tokens.device)
    valid = video_mask.bool()
    both_real = (valid[:, 1:] & valid[:, :-1])[:, :, None, None]  # (batch, frames - 1, 1, 1): pair (t, t + 1)
    shifted = tokens.clone()
    shifted[:, 1:, from_previous] = torch.where(
        both_real, tokens[:, :-1, from_previous], tokens[:, 1:, from_previous]
    )
    shifted[:, :-1, from_next] = torch.where(both_real, tokens[:, 1:, from_next], tokens[:, :-1, from_next])
    return shifted.view(frames_total, num_tokens, dim)


def temporal_difference_tokens(vision_tokens: torch.Tensor, video_mask: torch.Tensor) -> torch.Tensor:
    r"""
    Each frame's tokens followed by their differences from the previous frame's tokens at the same positions,

        Concat(V_t, \Delta V_t),   \Delta V_t = V_t - V_{t-1} if frames t and t - 1 are real, else 0,

    `(pairs, T, N, D)` and `(pairs, T)` -> `(pairs, T, 2 N, D)`.
    """
    real = video_mask.bool()
    previous_real = torch.cat([torch.zeros_like(real[:, :1]), real[:, :-1]], dim=1)  # (pairs, T)
    previous = torch.cat([vision_tokens[:, :1], vision_tokens[:, :-1]], dim=1)
    differences = (vision_tokens - previous) * (real & previous_real)[..., None, None].to(vision_tokens.dtype)
    return torch.cat([vision_tokens, differences], dim=2)


def trim_text_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the trailing positions that are padding in every row (`attention_mask` 0): they are masked as keys and
    their outputs are never read, so the result is unchanged and their compute is saved (processors pad to
    `max_text_length`, captions are usually far shorter)."""
    used = attention_mask.any(dim=0).nonzero()
    length = int(used[-1]) + 1 if used.numel() else 1
    return input_ids[:, :length], attention_mask[:, :length]


def _query_positions_after_self_attention(
    layer: nn.Module,
    query_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    encoder_attention_mask: torch.Tensor | None,
) -> torch.Tensor:
    """What a Q-Former layer does to its query positions after self-attention: cross-attention to the vision tokens
    (in the layers that have it), then the query feed-forward. `(rows, N_Q, hidden)` in and out."""
    if layer.has_cross_attention:
        query_states = layer.crossattention(
            query_states, encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask
        )
    return apply_chunking_to_forward(
        layer.feed_forward_chunk_query, layer.chunk_size_feed_forward, layer.seq_len_dim, query_states
    )


def qformer_query_outputs(
    qformer: Blip2QFormerModel,
    embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    num_queries: int,
    encoder_hidden_states: torch.Tensor,
    encoder_attention_mask: torch.Tensor | None = None,
    input_of_row: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""
    The query positions of the Q-Former's last layer, z_L[:N_Q], computing only what they depend on. Equal to

        qformer(query_embeds=embeds[input_of_row], query_length=N_Q, attention_mask=attention_mask[input_of_row],
                encoder_hidden_states=..., encoder_attention_mask=...).last_hidden_state[:, :N_Q]

    with two savings, which matter because re-ranking runs the Q-Former on K x T sequences per query:

    - The last layer's text positions feed nothing: its self-attention runs for the query positions only (as queries
      over all positions), and its text feed-forward is skipped.
    - With `input_of_row`, rows share inputs whose query part does not depend on the row (the learned query tokens,
      as in the spatial pass, where every frame of a pair has the same text). The first layer's self-attention sees
      only the input, and its text positions never cross-attend, so

          z_1 = Concat(FFN_q(CrossAttn(SA(e)[:N_Q][i(r)], V_r)), FFN_x(SA(e)[N_Q:])[i(r)])

      computes the self-attention and the text feed-forward once per input instead of once per row. In training
      mode the inputs are gathered to the rows first, so that dropout draws a mask per row as the plain Q-Former does.

    Args:
        qformer: the Q-Former (its layers are run one by one).
        embeds: `(inputs, N_Q + L, hidden)`, Concat(queries, text embeddings) before the Q-Former's layer norm.
        attention_mask: `(inputs, N_Q + L)`, 1 for positions to attend to.
        num_queries: N_Q.
        encoder_hidden_states: `(rows, tokens, encoder_hidden_size)`, what the query positions cross-attend to.
        encoder_attention_mask: a 4D mask over `encoder_hidden_states` for the query positions, or None.
        input_of_row: `(rows,)`, the input of each row; None when inputs and rows are the same.

    Returns:
        `(rows, N_Q, hidden)`.
    """
    if input_of_row is not None and qformer.training:
        # index_select, not embeds[input_of_row]: the backward of indexing with repeated indices accumulates with
        # index_put_, whose sums depend on thread scheduling on CPU; index_select's (index_add_) are reproducible.
        embeds, attention_mask = embeds.index_select(0, input_of_row), attention_mask[input_of_row]
        input_of_row = None
    hidden_states = qformer.dropout(qformer.layernorm(embeds.to(qformer.layernorm.weight.dtype)))
    encoder_hidden_states = encoder_hidden_states.to(hidden_states.dtype)
    self_attention_mask = create_bidirectional_mask(
        config=qformer.config, inputs_embeds=hidden_states, attention_mask=attention_mask
    )
    *layers, last_layer = qformer.encoder.layer
    if input_of_row is not None:
        if layers:
            first_layer, layers = layers[0], layers[1:]
            attention_output = first_layer.attention(hidden_states, attention_mask=self_attention_mask)
            text_states = apply_chunking_to_forward(
                first_layer.feed_forward_chunk,
                first_layer.chunk_size_feed_forward,
                first_layer.seq_len_dim,
                attention_output[:, num_queries:],
            )  # (inputs, L, hidden)
            query_states = _query_positions_after_self_attention(
                first_layer,
                attention_output[:, :num_queries][input_of_row],  # (rows, N_Q, hidden)
                encoder_hidden_states,
                encoder_attention_mask,
            )
            hidden_states = torch.cat([query_states, text_states[input_of_row]], dim=1)  # (rows, N_Q + L, hidden)
        else:
            hidden_states = hidden_states[input_of_row]
        if self_attention_mask is not None:
            self_attention_mask = self_attention_mask[input_of_row]
    for layer in layers:
        hidden_states = layer(
            hidden_states,
            attention_mask=self_attention_mask,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            query_length=num_queries,
        )
    query_mask = None if self_attention_mask is None else self_attention_mask[:, :, :num_queries]
    query_states = last_layer.attention(
        hidden_states[:, :num_queries], encoder_hidden_states=hidden_states, encoder_attention_mask=query_mask
    )  # (rows, N_Q, hidden): self-attention with the query positions as queries
    return _query_positions_after_self_attention(
        last_layer, query_states, encoder_hidden_states, encoder_attention_mask
    )


class PerturbedTopK(torch.autograd.Function):
    r"""
    Differentiable top-k by perturbed maximum (Berthet et al., 2020; Cordonnier et al., 2021), as in TS2-Net:

        y(s) = E_Z[ onehot(topk(s + sigma Z)) ],        Z ~ N(0, I)
        dy/ds = E_Z[ onehot(topk(s + sigma Z)) Z^T ] / sigma

    estimated with `num_samples` draws. The k indices of every draw are sorted by position, so row j of the indicator
    is the j-th kept token in spatial order.

    Input `(rows, candidates)` scores; output `(rows, k, candidates)` soft indicators whose rows sum to 1.
    """

    @staticmethod
    def forward(ctx, scores: torch.Tensor, k: int, num_samples: int, sigma: float) -> torch.Tensor:
        rows, candidates = scores.shape
        noise = torch.randn(rows, num_samples, candidates, dtype=scores.dtype, device=scores.device)
        perturbed = scores.unsqueeze(1) + sigma * noise  # (rows, samples, candidates)
        indices = perturbed.topk(k, dim=-1).indices.sort(dim=-1).values  # (rows, samples, k)
        indicators = scores.new_zeros(rows, k, candidates)
        indicators.scatter_add_(2, indices.transpose(1, 2), scores.new_full((rows, k, num_samples), 1 / num_samples))
        ctx.save_for_backward(noise, indices)
        ctx.sigma = sigma
        return indicators

    @staticmethod
    def backward(ctx, grad_indicators: torch.Tensor):
        noise, indices = ctx.saved_tensors
        num_samples = noise.shape[1]
        # sum_j dL/dy[j, idx_s(j)] for every draw s: (rows, samples)
        selected_grad = grad_indicators.gather(2, indices.transpose(1, 2)).sum(dim=1)
        grad_scores = torch.einsum("rs,rsc->rc", selected_grad, noise) / (num_samples * ctx.sigma)
        return grad_scores, None, None, None


class CrossTVRTokenShiftAttention(CLIPAttention):
    """
    A CLIP attention layer whose input is token-shifted between neighbouring frames first (TS2-Net's shift sits in
    front of the attention of the last layers of the vision tower; the residual stream is not shifted). The parameter
    names are CLIP's, so CLIP checkpoints load unchanged. The vision tower must be called with `video_mask`
    `(batch, frames)` among its keyword arguments, which transformers hands down to every attention layer.
    """

    def __init__(self, config: CLIPVisionConfig, fold_div: int):
        super().__init__(config)
        self.fold_div = fold_div

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        video_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if video_mask is None:
            raise ValueError("The token-shift layers of the vision tower need `video_mask` (batch, frames).")
        hidden_states = shift_tokens(hidden_states, video_mask, self.fold_div)
        return super().forward(hidden_states, attention_mask, **kwargs)


class CrossTVRTokenSelector(nn.Module):
    r"""
    TS2-Net token selection. Every token n of a frame is scored from its own feature and the frame's CLS feature,

        h_n = GELU(W_in LN(v_n)),   p = softmax_n( W_2 GELU(W_1 [h_n ; h_0]) ),

    and the `num_selected` most informative tokens are kept, in position order: by perturbed maximum in training
    (soft, differentiable, see [`PerturbedTopK`]) and by hard top-k in evaluation (the tokens themselves). The
    perturbation acts on log p, which orders the tokens exactly as p does and keeps the noise scale independent of the
    number of tokens.

    With `keep_cls_token=True` (TS2-Net's stage 1) the CLS token is always kept in front and the selection runs over
    the patches; otherwise (CrossTVR's stage 2) it runs over all tokens.
    """

    def __init__(self, hidden_size: int, num_selected: int, keep_cls_token: bool, num_samples: int, sigma: float):
        super().__init__()
        self.num_selected = num_selected
        self.keep_cls_token = keep_cls_token
        self.num_samples = num_samples
        self.sigma = sigma
        self.layer_norm = nn.LayerNorm(hidden_size)
        self.in_proj = nn.Linear(hidden_size, hidden_size // 2, bias=False)
        self.fc1 = nn.Linear(2 * (hidden_size // 2), hidden_size // 2, bias=False)
        self.fc2 = nn.Linear(hidden_size // 2, 1, bias=False)

    def token_log_probs(self, tokens: torch.Tensor) -> torch.Tensor:
        """log p over the candidate tokens: `(frames, tokens, dim)` -> `(frames, candidates)`."""
        local_features = F.gelu(self.in_proj(self.layer_norm(tokens)))  # (frames, tokens, dim / 2)
        global_features = local_features[:, :1].expand_as(local_features)
        logits = self.fc2(F.gelu(self.fc1(torch.cat([local_features, global_features], dim=-1)))).squeeze(-1)
        if self.keep_cls_token:
            logits = logits[:, 1:]
        return logits.log_softmax(dim=-1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """`(frames, tokens, dim)` -> `(frames, num_selected (+ 1 with the kept CLS), dim)`."""
        candidates = tokens[:, 1:] if self.keep_cls_token else tokens
        if self.num_selected > candidates.shape[1]:
            raise ValueError(
                f"The token selector keeps {self.num_selected} tokens per frame but a frame has only "
                f"{candidates.shape[1]} candidates; lower the number of selected tokens in the config."
            )
        log_probs = self.token_log_probs(tokens)  # (frames, candidates)
        if self.training:
            indicators = PerturbedTopK.apply(log_probs, self.num_selected, self.num_samples, self.sigma)
            selected = torch.einsum("fkc,fcd->fkd", indicators.to(candidates.dtype), candidates)
        else:
            indices = log_probs.topk(self.num_selected, dim=-1).indices.sort(dim=-1).values  # (frames, k)
            selected = candidates.gather(1, indices.unsqueeze(-1).expand(-1, -1, candidates.shape[-1]))
        if self.keep_cls_token:
            selected = torch.cat([tokens[:, :1], selected], dim=1)
        return selected


class CrossTVRTextToVideoFusion(nn.Module):
    r"""
    T2V2T's text-to-video fusion (Kim et al., "Text-to-Video-to-Text Fusion for Text-to-Video Retrieval"): the tokens
    F_V[t] of each frame t attend to the caption's features F_T, with the frame's own tokens beside them as keys and
    values (bypass cross-attention: a frame the caption does not describe can attend to itself instead of being
    modulated by it):

        F_T2V[t] = X-Attn(F_V[t], Concat(F_T W_T, F_V[t])) + E_t      (bypass; the poster's Eq. for F_T2V[i])
        F_T2V[t] = X-Attn(F_V[t], F_T W_T) + E_t                       (`bypass=False`: "naive T2V2T")

    X-Attn is a BERT cross-attention block at the width of the stage-2 tokens (multi-head attention, then residual and
    layer norm, then a feed-forward with residual and layer norm; transformers' Q-Former blocks, sized by
    `qformer_config` but at that width). W_T maps the Q-Former's text features to that width, and E_t is a learned,
    zero-initialised embedding of the frame index, the temporal embedding VindLU (T2V2T's base) adds to its frame
    features, so that the video-to-text pass over all frames' tokens knows their order.
    """

    def __init__(self, config: CrossTVRConfig):
        super().__init__()
        qformer_config, width = config.qformer_config, config.fine_token_hidden_size
        self.bypass = config.t2v2t_bypass
        self.config = Blip2QFormerConfig(
            hidden_size=width,
            encoder_hidden_size=width,
            num_attention_heads=qformer_config.num_attention_heads,
            intermediate_size=qformer_config.intermediate_size,
            hidden_act=qformer_config.hidden_act,
            hidden_dropout_prob=qformer_config.hidden_dropout_prob,
            attention_probs_dropout_prob=qformer_config.attention_probs_dropout_prob,
            layer_norm_eps=qformer_config.layer_norm_eps,
        )
        self.config._attn_implementation = "sdpa"
        self.text_projection = nn.Linear(qformer_config.hidden_size, width)
        self.crossattention = Blip2QFormerAttention(self.config, is_cross_attention=True)
        self.intermediate = Blip2QFormerIntermediate(self.config)
        self.output = Blip2QFormerOutput(self.config)
        self.frame_embeddings = nn.Parameter(torch.zeros(config.num_frames, width))

    def forward(
        self,
        frame_tokens: torch.Tensor,
        text_features: torch.Tensor,
        text_mask: torch.Tensor,
        frame_index: torch.Tensor,
    ) -> torch.Tensor:
        """
        Args:
            frame_tokens: `(frames, tokens, width)`, F_V[t] of every real frame.
            text_features: `(frames, text_length, qformer_hidden_size)`, F_T of the caption each frame is paired with.
            text_mask: `(frames, text_length)`, 1 for real text tokens.
            frame_index: `(frames,)`, t of each frame within its video.

        Returns:
            F_T2V: `(frames, tokens, width)`.
        """
        if int(frame_index.max()) >= self.frame_embeddings.shape[0]:
            raise ValueError(
                f"T2V2T has frame embeddings for {self.frame_embeddings.shape[0]} frames (config.num_frames) but got "
                f"{int(frame_index.max()) + 1} frames."
            )
        keys = self.text_projection(text_features)  # (frames, L, width)
        key_mask = text_mask
        if self.bypass:
            keys = torch.cat([keys, frame_tokens], dim=1)  # (frames, L + N, width)
            key_mask = torch.cat([text_mask, text_mask.new_ones(frame_tokens.shape[:2])], dim=1)
        encoder_attention_mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=frame_tokens, attention_mask=key_mask, encoder_hidden_states=keys
        )
        attention_output = self.crossattention(
            frame_tokens, encoder_hidden_states=keys, encoder_attention_mask=encoder_attention_mask
        )
        fused = self.output(self.intermediate(attention_output), attention_output)  # (frames, N, width)
        return fused + self.frame_embeddings[frame_index].unsqueeze(1)


class CrossTVRTemporalTransformer(CLIPPreTrainedModel):
    r"""
    CLIP4Clip's "seqTransf" temporal transformer over a sequence of embeddings e_1..e_S (frames, or selected tokens of
    all frames), with learned temporal positions p_s and a residual around the encoder:

        e'_s = e_s + Encoder(e + p, mask)_s

    It is a CLIP text-encoder stack (CLIP4Clip initialises it from the CLIP text tower), hence a CLIP sub-model: it
    gets CLIP's weight initialisation and attention implementation.
    """

    config: CLIPTextConfig

    def __init__(self, config: CLIPTextConfig):
        super().__init__(config)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.encoder = CLIPEncoder(config)
        self.post_init()

    def forward(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`(batch, positions, dim)` and a `(batch, positions)` mask -> `(batch, positions, dim)`."""
        positions = torch.arange(embeds.shape[1], device=embeds.device)
        hidden_states = embeds + self.position_embeddings(positions)
        attention_mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden_states, attention_mask=mask)
        hidden_states = self.encoder(inputs_embeds=hidden_states, attention_mask=attention_mask).last_hidden_state
        return embeds + hidden_states


class CrossTVRMeanPooling(nn.Module):
    """Stage-1 aggregator "mean" (CLIP4Clip meanP, parameter-free): the frames' CLS embeddings as they are."""

    def __init__(self, config: CrossTVRConfig):
        super().__init__()

    def forward(self, frame_tokens: torch.Tensor, video_mask: torch.Tensor) -> torch.Tensor:
        """`(batch, frames, tokens, dim)` projected tokens -> `(batch, frames, dim)` frame embeddings."""
        return frame_tokens[:, :, 0]


class CrossTVRSequenceTransformer(nn.Module):
    """Stage-1 aggregator "transformer" (CLIP4Clip seqTransf): the frames' CLS embeddings through a temporal
    transformer."""

    def __init__(self, config: CrossTVRConfig):
        super().__init__()
        self.temporal_transformer = CrossTVRTemporalTransformer._from_config(config.temporal_config)

    def forward(self, frame_tokens: torch.Tensor, video_mask: torch.Tensor) -> torch.Tensor:
        return self.temporal_transformer(frame_tokens[:, :, 0], video_mask)  # (batch, frames, dim)


class CrossTVRTokenShiftSelect(nn.Module):
    """Stage-1 aggregator "token_shift_select" (TS2-Net; the token shift itself sits in the vision tower): per frame
    the CLS token and the most informative patches are selected, all frames' selected tokens go through one temporal
    transformer, whose outputs at the frames' CLS tokens are the frame embeddings."""

    def __init__(self, config: CrossTVRConfig):
        super().__init__()
        self.token_selector = CrossTVRTokenSelector(
            config.projection_dim,
            config.coarse_num_selected_patches,
            keep_cls_token=True,
            num_samples=config.token_selection_num_samples,
            sigma=config.token_selection_sigma,
        )
        self.temporal_transformer = CrossTVRTemporalTransformer._from_config(config.temporal_config)

    def forward(self, frame_tokens: torch.Tensor, video_mask: torch.Tensor) -> torch.Tensor:
        batch_size, num_frames, _, dim = frame_tokens.shape
        selected = self.token_selector(frame_tokens.flatten(0, 1))  # (batch * frames, 1 + k, dim)
        tokens_per_frame = selected.shape[1]
        selected = selected.view(batch_size, num_frames * tokens_per_frame, dim)
        token_mask = video_mask.repeat_interleave(tokens_per_frame, dim=1)  # (batch, frames * (1 + k))
        hidden_states = self.temporal_transformer(selected, token_mask)
        return hidden_states.view(batch_size, num_frames, tokens_per_frame, dim)[:, :, 0]  # (batch, frames, dim)


TEMPORAL_AGGREGATOR_CLASSES = {
    "mean": CrossTVRMeanPooling,
    "transformer": CrossTVRSequenceTransformer,
    "token_shift_select": CrossTVRTokenShiftSelect,
}


class CrossTVRMeanSimilarity(nn.Module):
    """Stage-1 similarity head "mean" (CLIP4Clip meanP): a video is the normalised masked mean of its frame embeddings
    (see [`masked_mean_pool`]), and a text meets it by the cosine.

    A similarity head has `pool` (frames -> what is stored per video), `pool_text` (text embedding -> what is stored
    per text; it reads the projected word tokens when `reads_tokens`), `forward` (texts x videos similarity) and
    `loss` (the stage-1 training loss of a batch); `text_dim` and `video_shape` give the stored shapes."""

    reads_tokens = False

    def __init__(self, config: CrossTVRConfig):
        super().__init__()
        self.text_dim = config.projection_dim

    def video_shape(self, num_frames: int) -> tuple[int, ...]:
        """The shape of what `pool` stores per video."""
        return (self.text_dim,)

    def pool(
        self, frame_embeds: torch.Tensor, video_mask: torch.Tensor, frame_tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`(batch, frames, dim)` frame embeddings -> `(batch, dim)` normalised video embeddings."""
        return masked_mean_pool(frame_embeds, video_mask)

    def pool_text(
        self, text_embeds: torch.Tensor, word_tokens: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return text_embeds

    def forward(self, text_embeds: torch.Tensor, video_embeds: torch.Tensor) -> torch.Tensor:
        """`(texts, dim)` and `(videos, dim)` -> `(texts, videos)` cosines."""
        return text_embeds @ video_embeds.t()

    def loss(
        self,
        text_embeds: torch.Tensor,
        video_embeds: torch.Tensor,
        logit_scale: torch.Tensor,
        positive_mask: torch.Tensor,
        logits_per_text: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Symmetric InfoNCE ([`contrastive_loss`]) of the temperature-scaled similarities `logits_per_text` (computed
        here when not given); the temperature scales the texts before they meet the videos (the heads are linear in
        the text)."""
        if logits_per_text is None:
            logits_per_text = self(logit_scale * text_embeds, video_embeds)
        return contrastive_loss(logits_per_text, positive_mask)


class CrossTVRTextConditionedSimilarity(CrossTVRMeanSimilarity):
    """Stage-1 similarity head "text_conditioned" (TS2-Net's released similarity): a video is its normalised frame
    embeddings, zero rows for padding frames, and a text meets it by [`text_conditioned_frame_similarity`]."""

    def __init__(self, config: CrossTVRConfig):
        super().__init__(config)
        self.scale = config.frame_softmax_scale

    def video_shape(self, num_frames: int) -> tuple[int, ...]:
        return (num_frames, self.text_dim)

    def pool(
        self, frame_embeds: torch.Tensor, video_mask: torch.Tensor, frame_tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`(batch, frames, dim)` -> `(batch, frames, dim)`, L2-normalised real frames and zero padding frames."""
        return F.normalize(frame_embeds, dim=-1) * video_mask.unsqueeze(-1).to(frame_embeds.dtype)

    def forward(self, text_embeds: torch.Tensor, video_embeds: torch.Tensor) -> torch.Tensor:
        """`(texts, dim)` and `(videos, frames, dim)` -> `(texts, videos)`."""
        return text_conditioned_frame_similarity(text_embeds, video_embeds, self.scale)


class CrossTVRCRETSimilarity(CrossTVRMeanSimilarity):
    r"""
    Stage-1 similarity head "cret" (CRET, Ji et al.): the global cosine plus the similarity of local features that
    cross-modal correspondence modelling (CCM) gathers,

        Z_c = softmax( (Q_c W^Q)(E W^K)^T / sqrt(d_k) ) (E W^V)       per head, for each learnable centre Q_c
        S_g = cos( mean_t f_t, t )        S_l = 1/C sum_c cos( Z^v_c, Z^t_c )        S = S_g + beta S_l

    where E are a video's projected patch tokens (all real frames) for Z^v and a text's projected word tokens for
    Z^t, through one attention module shared by the two decoders. Training: L = L_GEES + alpha L_CCM, GEES
    ([`gees_loss`]) on the global embeddings with each video's frame embeddings as a Gaussian (mean and diagonal
    variance of the L2-normalised frames; its mean taken normalised, as S_g is a cosine) and L_CCM the symmetric
    InfoNCE of tau S_l. Choices where the slides are silent: C = `cret_num_centers` centres, combined by averaging
    their cosines; the centres attend over the patch tokens of every real frame at once; L_CCM symmetric, as CLIP's.

    So that search stays one inner product (an exact matrix product or any FAISS index), a video is stored as
    [mu_hat ; sqrt(beta / C) Z^v_1..C ; sigma] and a text as [t ; sqrt(beta / C) Z^t_1..C ; 0]: their inner product
    is S exactly, `(C + 2) * projection_dim` numbers each.
    """

    reads_tokens = True

    def __init__(self, config: CrossTVRConfig):
        super().__init__(config)
        self.num_centers, self.dim = config.cret_num_centers, config.projection_dim
        self.local_weight, self.ccm_loss_weight = config.cret_local_weight, config.cret_ccm_loss_weight
        self.bound = config.cret_gees_bound
        self.centers = nn.Parameter(torch.zeros(config.cret_num_centers, config.projection_dim))
        self.attention = nn.MultiheadAttention(config.projection_dim, config.cret_num_heads, batch_first=True)
        self.text_dim = (config.cret_num_centers + 2) * config.projection_dim

    def correspond(self, tokens: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """CCM's decoder: `(batch, tokens, dim)` with `(batch, tokens)` True at padding -> `(batch, C, dim)` local
        features, L2-normalised."""
        queries = self.centers.to(tokens.dtype).unsqueeze(0).expand(len(tokens), -1, -1)
        local, _ = self.attention(queries, tokens, tokens, key_padding_mask=padding_mask, need_weights=False)
        return F.normalize(local, dim=-1)

    def _stored(self, global_embeds: torch.Tensor, local: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        return torch.cat([global_embeds, (self.local_weight / self.num_centers) ** 0.5 * local.flatten(1), last], -1)

    def pool(
        self, frame_embeds: torch.Tensor, video_mask: torch.Tensor, frame_tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`(batch, frames, dim)` frame embeddings and `(batch, frames, tokens, dim)` projected patch tokens ->
        `(batch, (C + 2) * dim)`: [mu_hat ; sqrt(beta / C) Z^v ; sigma]."""
        weights = video_mask.to(frame_embeds.dtype).unsqueeze(-1)  # (batch, frames, 1)
        frames = F.normalize(frame_embeds, dim=-1)
        mean = (frames * weights).sum(dim=1) / weights.sum(dim=1)
        variance = ((frames - mean.unsqueeze(1)).square() * weights).sum(dim=1) / weights.sum(dim=1)
        batch, num_frames, num_tokens, dim = frame_tokens.shape
        padding = (video_mask == 0).unsqueeze(-1).expand(-1, -1, num_tokens).reshape(batch, num_frames * num_tokens)
        local = self.correspond(frame_tokens.reshape(batch, num_frames * num_tokens, dim), padding)  # (batch, C, dim)
        return self._stored(F.normalize(mean, dim=-1), local, variance)

    def pool_text(
        self, text_embeds: torch.Tensor, word_tokens: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`(batch, dim)` text embeddings and `(batch, length, dim)` projected word tokens ->
        `(batch, (C + 2) * dim)`: [t ; sqrt(beta / C) Z^t ; 0]."""
        if attention_mask is None:
            attention_mask = torch.ones(word_tokens.shape[:2], dtype=torch.long, device=word_tokens.device)
        local = self.correspond(word_tokens, attention_mask == 0)
        return self._stored(text_embeds, local, torch.zeros_like(text_embeds))

    def split(self, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A stored text or video -> (global `(batch, dim)`, local `(batch, C, dim)` L2-normalised, last block)."""
        dim, centers = self.dim, self.num_centers
        local = embeds[:, dim : (centers + 1) * dim].unflatten(1, (centers, dim))
        return embeds[:, :dim], F.normalize(local, dim=-1), embeds[:, (centers + 1) * dim :]

    def loss(
        self,
        text_embeds: torch.Tensor,
        video_embeds: torch.Tensor,
        logit_scale: torch.Tensor,
        positive_mask: torch.Tensor,
        logits_per_text: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """L = L_GEES + alpha L_CCM on the stored texts and videos (see the class docstring); the similarities
        `logits_per_text` play no part."""
        text_global, text_local, _ = self.split(text_embeds)
        video_mean, video_local, video_variance = self.split(video_embeds)
        local_similarity = torch.einsum("icd,jcd->ij", text_local, video_local) / self.num_centers  # S_l, (B, B)
        loss_gees = gees_loss(text_global, video_mean, video_variance, logit_scale, positive_mask, self.bound)
        return loss_gees + self.ccm_loss_weight * contrastive_loss(logit_scale * local_similarity, positive_mask)


SIMILARITY_HEAD_CLASSES = {
    "mean": CrossTVRMeanSimilarity,
    "text_conditioned": CrossTVRTextConditionedSimilarity,
    "cret": CrossTVRCRETSimilarity,
}


def check_num_frames(embeddings: torch.Tensor, num_frames: int) -> None:
    """Raise if a fine module's per-frame embeddings (`(config.num_frames, width)`) have fewer rows than frames."""
    if num_frames > embeddings.shape[0]:
        raise ValueError(
            f"The fine module has frame embeddings for {embeddings.shape[0]} frames (config.num_frames) but got "
            f"{num_frames} frames."
        )


class CrossTVRFineModule(nn.Module):
    """
    Stage 2's part: how (text, video tokens) pairs become matching logits, `matching_head(fuse(...))`. Every fine
    module runs a BLIP-2 Q-Former (`qformer_embeddings`, `qformer`) and ends in `matching_head` (a linear layer to {no
    match, match}, BLIP-2's ITM head); subclasses build the rest, then the head, and implement `fuse`, which takes `forward`'s
    arguments and returns the pair representation `(pairs, qformer_hidden_size)` the head reads.
    """

    def __init__(self, config: CrossTVRConfig):
        super().__init__()
        self.config = config
        self.qformer_embeddings = Blip2TextEmbeddings(config.qformer_config)
        self.qformer = Blip2QFormerModel._from_config(config.qformer_config)

    def unused_parameter_prefixes(self) -> list[str]:
        """Prefixes (relative to this module) of the parameters no output depends on, see
        [`CrossTVRModel.unused_parameter_names`]; none unless a subclass says otherwise."""
        return []

    def forward(
        self,
        qformer_input_ids: torch.Tensor,
        qformer_attention_mask: torch.Tensor,
        text_of_pair: torch.Tensor,
        vision_tokens: torch.Tensor,
        video_mask: torch.Tensor,
    ) -> torch.Tensor:
        """
        Matching logits of (text, video) pairs: `matching_head(fuse(...))`.

        Args:
            qformer_input_ids, qformer_attention_mask: `(texts, L)`, the distinct captions.
            text_of_pair: `(pairs,)`, the caption of each pair.
            vision_tokens: `(pairs, T, N, fine_token_hidden_size)`; video_mask: `(pairs, T)`, 1 for real frames.

        Returns:
            Matching logits `(pairs, 2)`: {no match, match}.
        """
        return self.matching_head(
            self.fuse(qformer_input_ids, qformer_attention_mask, text_of_pair, vision_tokens, video_mask)
        )


class CrossTVRDecoupledFineModule(CrossTVRFineModule):
    r"""
    Stage 2 of CrossTVR (`fine_module="crosstvr"`): decoupled video-text cross attention, then the matching head.

    A BLIP-2 Q-Former (`qformer_embeddings`, `qformer`, `query_tokens`) runs spatial text attention on every real
    frame ([`spatial_text_attention`]); a token selector keeps M tokens of every frame; temporal text attention
    ([`temporal_text_attention`]) lets X_spatial(t) (plus the frame position P_t) attend to the selected tokens of all
    frames; `matching_head` maps the mean of its query outputs to {no match, match}. The `fine_attention` ablations
    keep one pass: `"spatial"` feeds the masked mean of X_spatial(t) to the head, `"temporal"` uses the query tokens
    as temporal queries (with the caption, as in Eq. 1). With `share_spatial_temporal=False` the temporal pass has its
    own Q-Former (`temporal_qformer`, `temporal_qformer_embeddings`).
    """

    def __init__(self, config: CrossTVRConfig):
        super().__init__(config)
        qformer_config = config.qformer_config
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, qformer_config.hidden_size))
        both_passes = config.fine_attention == "spatial_temporal"
        if both_passes and not config.share_spatial_temporal:
            self.temporal_qformer_embeddings = Blip2TextEmbeddings(qformer_config)
            self.temporal_qformer = Blip2QFormerModel._from_config(qformer_config)
        else:
            self.temporal_qformer_embeddings = None
            self.temporal_qformer = None
        if config.fine_attention == "spatial":
            self.token_selector = None
        else:
            self.token_selector = CrossTVRTokenSelector(
                config.fine_token_hidden_size,
                config.num_selected_tokens,
                keep_cls_token=False,
                num_samples=config.token_selection_num_samples,
                sigma=config.token_selection_sigma,
            )
        if both_passes and config.use_frame_position_embeddings:
            self.frame_position_embeddings = nn.Parameter(torch.zeros(config.num_frames, qformer_config.hidden_size))
        else:
            self.frame_position_embeddings = None
        if self.token_selector is not None and config.use_token_frame_embeddings:
            self.token_frame_embeddings = nn.Parameter(torch.zeros(config.num_frames, config.fine_token_hidden_size))
        else:
            self.token_frame_embeddings = None
        self.matching_head = nn.Linear(qformer_config.hidden_size, 2)

    def unused_parameter_prefixes(self) -> list[str]:
        """The last Q-Former layer's text feed-forward, and a separate temporal Q-Former's text parts it never runs."""
        last_layer = self.config.qformer_config.num_hidden_layers - 1
        unused = [f"qformer.encoder.layer.{last_layer}.{module}." for module in ("intermediate", "output")]
        if self.temporal_qformer is not None:
            if self.config.temporal_text_input:
                unused += [f"temporal_qformer.encoder.layer.{last_layer}.{m}." for m in ("intermediate", "output")]
            else:
                layers = range(self.config.qformer_config.num_hidden_layers)
                unused += [f"temporal_qformer.encoder.layer.{i}.{m}." for i in layers for m in ("intermediate", "output")]
                unused.append("temporal_qformer_embeddings.")
        return unused

    def spatial_text_attention(
        self,
        qformer_input_ids: torch.Tensor,
        qformer_attention_mask: torch.Tensor,
        frame_tokens: torch.Tensor,
        text_of_frame: torch.Tensor | None = None,
    ) -> torch.Tensor:
        r"""
        Spatial text attention, independently per frame (BLIP-2's image-text matching path on one frame):

            z_{t,1} = Attn(Concat(Q, X), V_t),   z_{t,l} = Attn(z_{t,l-1}, V_t),  l = 2..L
            X_spatial(t) = mean over the N_Q query positions of z_{t,L}

        Queries Q and text X share self-attention; only the query positions cross-attend to V_t. The first layer's
        self-attention does not depend on the frame, so it runs once per text (see [`qformer_query_outputs`]).

        Args:
            qformer_input_ids, qformer_attention_mask: `(texts, text_length)`; one text per frame when
                `text_of_frame` is None.
            frame_tokens: `(frames, tokens, fine_token_hidden_size)`, V_t.
            text_of_frame: `(frames,)`, *optional*: the text each frame is paired with.

        Returns:
            X_spatial: `(frames, qformer_hidden_size)`.
        """
        num_texts = qformer_input_ids.shape[0]
        queries = self.query_tokens.expand(num_texts, -1, -1)  # (texts, N_Q, hidden)
        embeds = self.qformer_embeddings(input_ids=qformer_input_ids, query_embeds=queries)  # (texts, N_Q + L, hidden)
        attention_mask = torch.cat([qformer_attention_mask.new_ones(queries.shape[:2]), qformer_attention_mask], dim=1)
        query_states = qformer_query_outputs(
            self.qformer,
            embeds,
            attention_mask,
            queries.shape[1],
            encoder_hidden_states=frame_tokens,
            input_of_row=text_of_frame,
        )  # (frames, N_Q, hidden)
        return query_states.mean(dim=1)

    def temporal_text_attention(
        self,
        queries: torch.Tensor,
        query_mask: torch.Tensor,
        selected_tokens: torch.Tensor,
        token_mask: torch.Tensor,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        r"""
        Temporal text attention over the whole video (Eqs. 5-6): the queries attend to the M x T selected tokens of all
        frames,

            z_1 = Attn(Concat_t X_spatial(t), Concat_t V_select(t)),   z_l = Attn(z_{l-1}, Concat_t V_select(t))

        In the paper's module the queries are X_spatial(t) of every frame, and the text reaches this pass only through
        them. With `qformer_input_ids` the caption's tokens follow the queries, as in Eq. 1: the `"temporal"` ablation
        (the learned query tokens and the text) and `temporal_text_input=True`. The same Q-Former as the spatial pass
        runs unless `share_spatial_temporal=False`. Padding frames are masked both as queries and as keys.

        Args:
            queries: `(pairs, queries, qformer_hidden_size)`; query_mask: `(pairs, queries)`.
            selected_tokens: `(pairs, frames * M, fine_token_hidden_size)`, V_select; token_mask: `(pairs, frames * M)`.
            qformer_input_ids, qformer_attention_mask: `(pairs, text_length)`, *optional*.

        Returns:
            The masked mean of the last layer's query outputs: `(pairs, qformer_hidden_size)`.
        """
        if self.temporal_qformer is None:
            qformer, embeddings = self.qformer, self.qformer_embeddings
        else:
            qformer, embeddings = self.temporal_qformer, self.temporal_qformer_embeddings
        num_queries = queries.shape[1]
        embeds = embeddings(input_ids=qformer_input_ids, query_embeds=queries)  # (pairs, queries (+ L), hidden)
        attention_mask = query_mask.to(token_mask.dtype)
        if qformer_input_ids is not None:
            attention_mask = torch.cat([attention_mask, qformer_attention_mask.to(attention_mask.dtype)], dim=1)
        # Only the query positions cross-attend, so the padding mask over the selected tokens is built for those rows.
        encoder_attention_mask = create_bidirectional_mask(
            config=qformer.config,
            inputs_embeds=queries,
            attention_mask=token_mask,
            encoder_hidden_states=selected_tokens,
        )
        hidden_states = qformer_query_outputs(
            qformer,
            embeds,
            attention_mask,
            num_queries,
            encoder_hidden_states=selected_tokens,
            encoder_attention_mask=encoder_attention_mask,
        )  # (pairs, queries, hidden)
        weights = query_mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1)

    def fuse(
        self,
        qformer_input_ids: torch.Tensor,
        qformer_attention_mask: torch.Tensor,
        text_of_pair: torch.Tensor,
        vision_tokens: torch.Tensor,
        video_mask: torch.Tensor,
    ) -> torch.Tensor:
        """
        The pair representation the matching head reads (see [`CrossTVRDecoupledFineModule`]): distinct texts
        `(texts, L)`, the text of each pair `(pairs,)`, tokens `(pairs, T, N, D_v)` and `video_mask` `(pairs, T)` ->
        `(pairs, hidden)`.
        """
        num_pairs, num_frames = vision_tokens.shape[:2]
        fine_attention = self.config.fine_attention
        # Only real frames go through the per-frame passes; padding frames stay zero and are masked later.
        valid = video_mask.bool()  # (pairs, T)
        pair_of_frame = torch.arange(num_pairs, device=valid.device).unsqueeze(1).expand_as(valid)[valid]  # (F,)
        frame_tokens = vision_tokens[valid]  # (F, N, D_v)
        if fine_attention != "temporal":
            spatial = self.spatial_text_attention(
                qformer_input_ids, qformer_attention_mask, frame_tokens, text_of_pair[pair_of_frame]
            )  # (F, hidden)
            spatial_embeds = spatial.new_zeros(num_pairs, num_frames, spatial.shape[-1])
            spatial_embeds[valid] = spatial  # (pairs, T, hidden)
        if fine_attention == "spatial":
            weights = video_mask.to(spatial_embeds.dtype).unsqueeze(-1)
            return (spatial_embeds * weights).sum(dim=1) / weights.sum(dim=1)

        if self.config.use_temporal_difference_tokens:
            # Motion for the temporal pass only: it selects among V_t and V_t - V_{t-1}; the spatial pass stays
            # per-frame appearance, as in the paper.
            frame_tokens = temporal_difference_tokens(vision_tokens, video_mask)[valid]  # (F, 2 N, D_v)
        selected = self.token_selector(frame_tokens)  # (F, M, D_v)
        selected_tokens = selected.new_zeros(num_pairs, num_frames, *selected.shape[1:])
        selected_tokens[valid] = selected  # (pairs, T, M, D_v)
        if self.token_frame_embeddings is not None:
            check_num_frames(self.token_frame_embeddings, num_frames)
            selected_tokens = selected_tokens + self.token_frame_embeddings[:num_frames, None]  # V_select(t) + E_t
        token_mask = video_mask.repeat_interleave(selected.shape[1], dim=1)  # (pairs, T * M)
        if fine_attention == "temporal":
            queries = self.query_tokens.expand(num_pairs, -1, -1)  # (pairs, N_Q, hidden)
            query_mask = torch.ones(queries.shape[:2], dtype=video_mask.dtype, device=queries.device)
        else:
            queries, query_mask = spatial_embeds, video_mask
            if self.frame_position_embeddings is not None:
                check_num_frames(self.frame_position_embeddings, num_frames)
                queries = queries + self.frame_position_embeddings[:num_frames]
        with_text = fine_attention == "temporal" or self.config.temporal_text_input
        return self.temporal_text_attention(
            queries,
            query_mask,
            selected_tokens.flatten(1, 2),  # (pairs, T * M, D_v)
            token_mask,
            qformer_input_ids[text_of_pair] if with_text else None,
            qformer_attention_mask[text_of_pair] if with_text else None,
        )



class CrossTVRT2V2TFineModule(CrossTVRFineModule):
    r"""
    Stage 2 of T2V2T (`fine_module="t2v2t"`): text-to-video fusion with bypass cross-attention on every frame
    (`text_to_video_fusion`, [`CrossTVRTextToVideoFusion`]), video-to-text fusion of the caption over the fused frames
    with the BLIP-2 Q-Former's stack (`qformer_embeddings`, `qformer`), and `matching_head` on the first position.
    It uses every parameter it has.
    """

    def __init__(self, config: CrossTVRConfig):
        super().__init__(config)
        self.text_to_video_fusion = CrossTVRTextToVideoFusion(config)
        self.matching_head = nn.Linear(config.qformer_config.hidden_size, 2)

    def fuse(
        self,
        qformer_input_ids: torch.Tensor,
        qformer_attention_mask: torch.Tensor,
        text_of_pair: torch.Tensor,
        vision_tokens: torch.Tensor,
        video_mask: torch.Tensor,
    ) -> torch.Tensor:
        r"""
        T2V2T fusion of (text, video) pairs, up to the matching head:

            F_T = Q-Former(Emb(text))                                   the caption alone (BLIP-2's text path)
            F_T2V[t] = X-Attn(F_V[t], Concat(F_T W_T, F_V[t])) + E_t      every real frame, [`CrossTVRTextToVideoFusion`]
            F_T2V2T = Q-Former(Emb(text), cross-attending to Concat_t F_T2V[t])     video-to-text fusion

        and the first position of F_T2V2T goes to the matching head (VindLU's and ALBEF's matching heads read [CLS]).
        The video-to-text pass runs the caption's embeddings as the Q-Former's query rows, so that one stack plays
        VindLU's text encoder and its fusion layers at once: every layer's self-attention over the caption, the
        cross-attention (in the layers that have it) to the fused tokens of all real frames, and the query
        feed-forward. All of a BLIP-2 Q-Former's weights initialise both passes and the matching head; only W_T, the
        fusion block and E_t are new. The poster's V2T fusion is cross-attention then self-attention; the Q-Former
        alternates the two, self-attention first.

        Args:
            qformer_input_ids, qformer_attention_mask: `(texts, L)`, the distinct captions.
            text_of_pair: `(pairs,)`, the caption of each pair.
            vision_tokens: `(pairs, T, N, D_v)`, F_V (with `use_temporal_difference_tokens`, each frame's tokens are
                followed by their differences to the previous frame's, see [`temporal_difference_tokens`]);
                video_mask: `(pairs, T)`.

        Returns:
            `(pairs, qformer_hidden_size)`.
        """
        if self.config.use_temporal_difference_tokens:
            vision_tokens = temporal_difference_tokens(vision_tokens, video_mask)  # (pairs, T, 2 N, D_v)
        num_pairs, num_frames, num_tokens = vision_tokens.shape[:3]
        text_embeds = self.qformer_embeddings(input_ids=qformer_input_ids)  # (texts, L, hidden)
        text_features = self.qformer(
            query_embeds=text_embeds, query_length=0, attention_mask=qformer_attention_mask
        ).last_hidden_state  # (texts, L, hidden): F_T
        valid = video_mask.bool()  # (pairs, T)
        pair_of_frame = torch.arange(num_pairs, device=valid.device).unsqueeze(1).expand_as(valid)[valid]  # (F,)
        frame_index = torch.arange(num_frames, device=valid.device).expand_as(valid)[valid]  # (F,)
        text_of_frame = text_of_pair[pair_of_frame]
        fused = self.text_to_video_fusion(
            vision_tokens[valid],
            text_features.index_select(0, text_of_frame),
            qformer_attention_mask[text_of_frame],
            frame_index,
        )  # (F, N, D_v)
        fused_tokens = fused.new_zeros(num_pairs, num_frames, num_tokens, fused.shape[-1])
        fused_tokens[valid] = fused  # (pairs, T, N, D_v); padding frames stay zero and are masked
        token_mask = video_mask.repeat_interleave(num_tokens, dim=1)  # (pairs, T * N)
        embeds = text_embeds.index_select(0, text_of_pair)  # (pairs, L, hidden)
        attention_mask = qformer_attention_mask[text_of_pair]
        encoder_attention_mask = create_bidirectional_mask(
            config=self.qformer.config,
            inputs_embeds=embeds,
            attention_mask=token_mask,
            encoder_hidden_states=fused_tokens.flatten(1, 2),
        )
        hidden_states = qformer_query_outputs(
            self.qformer,
            embeds,
            attention_mask,
            embeds.shape[1],
            encoder_hidden_states=fused_tokens.flatten(1, 2),  # (pairs, T * N, D_v)
            encoder_attention_mask=encoder_attention_mask,
        )  # (pairs, L, hidden): F_T2V2T
        return hidden_states[:, 0]


FINE_MODULE_CLASSES = {"crosstvr": CrossTVRDecoupledFineModule, "t2v2t": CrossTVRT2V2TFineModule}


class CrossTVRPreTrainedModel(PreTrainedModel):
    config: CrossTVRConfig
    config_class = CrossTVRConfig
    base_model_prefix = "crosstvr"
    main_input_name = "input_ids"
    input_modalities = ("video", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    # Flash and flex attention run in the CLIP towers, the temporal transformer and the stage-2 vision tower, where
    # encoding time goes; the Q-Former, whose query rows read slices of the attention masks (see
    # `qformer_query_outputs`), keeps sdpa (see `set_attn_implementation`).
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # Stage 2 stays in float32 under `dtype=torch.float16` and `torch.bfloat16`: the towers run in half precision
    # and `get_fine_logits` casts their tokens to float32 on entry. Stricter than BLIP-2's `_keep_in_fp32_modules`
    # (float16 only): the matching head ranks near duplicates, whose probabilities bfloat16's 8-bit mantissa merges.
    # (transformers searches these as regular expressions in parameter names: anchored at the top level.)
    _keep_in_fp32_modules_strict = [rf"^{name}\b" for name in STAGE_TWO_TRAINABLE_MODULES]
    _no_split_modules = [
        "CLIPEncoderLayer",
        "CLIPTextEmbeddings",
        "CLIPVisionEmbeddings",
        "Blip2EncoderLayer",
        "Blip2QFormerLayer",
        "Blip2TextEmbeddings",
    ]

    @classmethod
    def from_pretrained(cls, *args, key_mapping: dict[str, str] | None = None, **kwargs):
        """
        As in transformers; checkpoints written before the fine modules became sub-modules load too (their top-level
        stage-2 parameters are renamed into `fine_module`, see `LEGACY_FINE_MODULE_KEYS`), and are saved again in
        today's layout.
        """
        key_mapping = {**LEGACY_FINE_MODULE_KEYS, **(key_mapping or {})}
        loaded = super().from_pretrained(*args, key_mapping=key_mapping, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        # transformers keeps the renamings a checkpoint used, to write it back in its own layout on saving.
        model._weight_conversions = [
            conversion
            for conversion in getattr(model, "_weight_conversions", None) or []
            if conversion.source_patterns != list(LEGACY_FINE_MODULE_KEYS)
        ] or None
        return loaded

    def set_attn_implementation(self, attn_implementation: str | dict, allow_all_kernels: bool = False):
        """
        As in transformers, except that an implementation other than eager or sdpa, given as one string, applies to
        every sub-model but the Q-Former, which then uses sdpa.
        """
        if isinstance(attn_implementation, str) and attn_implementation not in QFORMER_ATTENTION_IMPLEMENTATIONS:
            attn_implementation = {"": attn_implementation} | {
                key: "sdpa" if key == "qformer_config" else attn_implementation for key in self.config.sub_configs
            }
        super().set_attn_implementation(attn_implementation, allow_all_kernels=allow_all_kernels)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        config = self.config
        if isinstance(module, CrossTVRModel):
            init.constant_(module.logit_scale, config.logit_scale_init_value)
            init.normal_(module.text_projection.weight, std=config.text_config.hidden_size**-0.5)
            init.normal_(module.visual_projection.weight, std=config.vision_config.hidden_size**-0.5)
        elif module is getattr(self, "fine_vision_projection", None):
            # Orthogonal, scaled to keep each coordinate's variance (orthonormal columns when widening spread a token's
            # norm over more coordinates): layer-normalised tower tokens arrive at the scale of the layer-normalised
            # tokens the cross-attention was pre-trained on.
            widening = max(module.out_features / module.in_features, 1.0)
            init.orthogonal_(module.weight, gain=widening**0.5)
            init.zeros_(module.bias)
        elif isinstance(module, CrossTVRDecoupledFineModule):
            init.normal_(module.query_tokens, std=config.initializer_range)
            if module.frame_position_embeddings is not None:
                if config.frame_position_embeddings_init_std > 0:
                    init.normal_(module.frame_position_embeddings, std=config.frame_position_embeddings_init_std)
                else:  # draws no random numbers: the rest of the initialisation is what it was before the option
                    init.zeros_(module.frame_position_embeddings)
            if module.token_frame_embeddings is not None:
                init.zeros_(module.token_frame_embeddings)
        elif isinstance(module, CrossTVRTextToVideoFusion):
            init.zeros_(module.frame_embeddings)
        elif isinstance(module, CrossTVRCRETSimilarity):
            init.normal_(module.centers, std=config.initializer_range)
        elif isinstance(module, nn.MultiheadAttention):  # CRET's CCM; its output projection is a Linear
            init.xavier_uniform_(module.in_proj_weight)
            init.zeros_(module.in_proj_bias)
        elif isinstance(module, Blip2TextEmbeddings):
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))


class CrossTVRModel(CrossTVRPreTrainedModel):
    r"""
    CrossTVR: a CLIP dual encoder (stage 1) and a decoupled video-text cross-attention re-ranker (stage 2) over the
    tokens of a frozen vision tower.

    Its parts are sub-modules that the configuration chooses: `temporal_aggregator` and `similarity_head` (stage 1:
    how frame features become a video's representation and meet the text's) and `fine_module` (stage 2: how a (text,
    video tokens) pair becomes matching logits — [`CrossTVRDecoupledFineModule`] or [`CrossTVRT2V2TFineModule`]).

    Public verbs, as in CLIP: [`get_text_features`], [`get_video_features`], [`get_vision_tokens`] and
    [`encode_video`] (both at once); [`get_fine_scores`] scores given (text, video) pairs with stage 2;
    [`rerank_text_to_video`], [`rerank_video_to_text`] and [`retrieve`] run two-stage retrieval; `forward` computes
    the training losses.
    """

    def __init__(self, config: CrossTVRConfig):
        super().__init__(config)
        # Stage 1: CLIP dual encoder with a temporal aggregator.
        self.text_model = CLIPTextModel._from_config(config.text_config)
        self.vision_model = CLIPVisionModel._from_config(config.vision_config)
        self.has_token_shift = config.temporal_aggregator == "token_shift_select" and config.token_shift_layers > 0
        if self.has_token_shift:
            layers = self.vision_model.encoder.layers
            for layer in layers[len(layers) - config.token_shift_layers :]:
                layer.self_attn = CrossTVRTokenShiftAttention(config.vision_config, config.token_shift_fold_div)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.temporal_aggregator = TEMPORAL_AGGREGATOR_CLASSES[config.temporal_aggregator](config)
        self.similarity_head = SIMILARITY_HEAD_CLASSES[config.similarity_head](config)

        # Stage 2: a frozen vision tower and the fine module (pair -> matching logits) over its tokens.
        if config.share_vision_tower:
            self.fine_vision_model = None
        else:
            fine_vision_class = FINE_VISION_MODEL_CLASSES[config.fine_vision_config.model_type]
            self.fine_vision_model = fine_vision_class._from_config(config.fine_vision_config)
        qformer_config = config.qformer_config
        if qformer_config._attn_implementation not in QFORMER_ATTENTION_IMPLEMENTATIONS:
            logger.info(f"The Q-Former runs with sdpa; {qformer_config._attn_implementation} runs in the towers.")
            qformer_config._attn_implementation = "sdpa"
        if config.fine_vision_projection:
            self.fine_vision_projection = nn.Linear(config.fine_vision_hidden_size, config.fine_token_hidden_size)
        else:
            self.fine_vision_projection = None
        self.fine_module = FINE_MODULE_CLASSES[config.fine_module](config)

        self.post_init()
        self.train(self.training)  # freezes the separate stage-2 tower

    def train(self, mode: bool = True):
        """
        Like `nn.Module.train`, except that the separate stage-2 vision tower stays frozen: in eval mode and without
        gradients. (`from_pretrained` re-creates parameters while loading and ends with `eval()`, so this is also
        what keeps a loaded tower frozen.)
        """
        super().train(mode)
        if self.fine_vision_model is not None:
            self.fine_vision_model.requires_grad_(False).eval()
        return self

    def unused_parameter_names(self) -> list[str]:
        """
        Parameters that no output depends on: the text feed-forward of each Q-Former's last layer (only the query
        positions of the last layer are read, see [`qformer_query_outputs`]) and, when a separate temporal Q-Former
        reads no text (Eq. 5), its text embeddings and all its text feed-forwards. They stay in checkpoints, as in
        BLIP-2's; training freezes them, since distributed data parallel expects a gradient for every trainable
        parameter. T2V2T (`fine_module="t2v2t"`) uses every parameter it has: its text pass runs all text
        feed-forwards.
        """
        unused = tuple(f"fine_module.{prefix}" for prefix in self.fine_module.unused_parameter_prefixes())
        return [name for name, _ in self.named_parameters() if name.startswith(unused)]

    # ----------------------------------------------------------------------------------------------------------------
    # Input checks
    # ----------------------------------------------------------------------------------------------------------------

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        vision_config = self.config.vision_config
        expected = (vision_config.num_channels, vision_config.image_size, vision_config.image_size)
        if pixel_values.dim() != 5 or tuple(pixel_values.shape[2:]) != expected:
            raise ValueError(
                "pixel_values must be shaped (batch, frames, channels, height, width) = (*, *, "
                f"{', '.join(map(str, expected))}), got {tuple(pixel_values.shape)}. Use CrossTVRProcessor to sample "
                "and resize the frames of a video."
            )

    def _video_mask(self, video_mask: torch.Tensor | None, batch_size: int, num_frames: int, device) -> torch.Tensor:
        if video_mask is None:
            return torch.ones(batch_size, num_frames, dtype=torch.long, device=device)
        if tuple(video_mask.shape) != (batch_size, num_frames):
            raise ValueError(
                f"video_mask must be shaped (batch, frames) = ({batch_size}, {num_frames}), got {tuple(video_mask.shape)}."
            )
        if not video_mask.bool().any(dim=1).all():
            raise ValueError("video_mask marks a video with no real frame; every video needs at least one frame.")
        return video_mask

    @staticmethod
    def _check_text_length(input_ids: torch.Tensor, max_length: int, name: str) -> None:
        if input_ids.shape[-1] > max_length:
            raise ValueError(
                f"{name} has {input_ids.shape[-1]} tokens but its text encoder takes at most {max_length}; tokenize "
                "with CrossTVRProcessor, which truncates to max_text_length."
            )

    # ----------------------------------------------------------------------------------------------------------------
    # Stage 1: dual encoder
    # ----------------------------------------------------------------------------------------------------------------

    @staticmethod
    def _check_processor_keys(other_inputs: dict, verb: str) -> None:
        """The verbs accept every key of a `CrossTVRProcessor` output (as CLIP's accept its processor's), no other."""
        unknown = sorted(set(other_inputs) - set(PROCESSOR_OUTPUT_KEYS))
        if unknown:
            raise TypeError(
                f"{verb}() got unexpected keyword arguments {unknown}; it ignores only the other keys of a "
                f"CrossTVRProcessor output, {list(PROCESSOR_OUTPUT_KEYS)}."
            )

    def _text_tower(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, **tower_kwargs
    ) -> BaseModelOutputWithPooling:
        self._check_text_length(input_ids, self.config.text_config.max_position_embeddings, "input_ids")
        return self.text_model(input_ids=input_ids, attention_mask=attention_mask, **tower_kwargs)

    def get_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **other_inputs
    ) -> torch.Tensor:
        r"""
        Stage-1 text embeddings: the CLIP text tower's EOS state, projected and L2-normalised. Unlike transformers 5's
        `CLIPModel.get_text_features`, which returns the tower's output with the projected, unnormalised embedding as
        `pooler_output`, this returns the normalised embedding itself, ready for cosine similarity.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): CLIP token ids.
            attention_mask (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*).
            other_inputs: the other keys of a `CrossTVRProcessor` output (Q-Former tokens, videos), ignored, so that
                `get_text_features(**processor(text=...))` works.

        Returns:
            `torch.FloatTensor` of shape `(batch_size, projection_dim)`.
        """
        self._check_processor_keys(other_inputs, "get_text_features")
        return self._text_embeds(self._text_tower(input_ids, attention_mask), attention_mask)

    def _text_embeds(self, text_outputs: BaseModelOutputWithPooling, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The text tower's pooled (EOS) state, projected and L2-normalised, `(batch, projection_dim)`, as the
        similarity head stores a text (with "cret", also from the projected word tokens)."""
        text_embeds = F.normalize(self.text_projection(text_outputs.pooler_output), dim=-1)
        if not self.similarity_head.reads_tokens:
            return text_embeds
        word_tokens = self.text_projection(text_outputs.last_hidden_state)  # (batch, length, projection_dim)
        return self.similarity_head.pool_text(text_embeds, word_tokens, attention_mask)

    def _vision_tower_tokens(
        self, vision_model: nn.Module, pixel_values: torch.Tensor, video_mask: torch.Tensor | None, **tower_kwargs
    ) -> tuple[torch.Tensor, BaseModelOutputWithPooling]:
        """All tokens of every frame, after the tower's final LayerNorm, `(batch, frames, tokens, width)`, and the
        tower's output."""
        self._check_pixel_values(pixel_values)
        batch_size, num_frames = pixel_values.shape[:2]
        video_mask = self._video_mask(video_mask, batch_size, num_frames, pixel_values.device)
        # Only the token-shift layers read `video_mask`; the other towers are called exactly as in transformers.
        if vision_model is self.vision_model and self.has_token_shift:
            tower_kwargs["video_mask"] = video_mask
        outputs = vision_model(pixel_values=pixel_values.flatten(0, 1), **tower_kwargs)
        tokens = outputs.last_hidden_state
        if isinstance(vision_model, CLIPVisionModel):
            # CLIP normalises only its pooled CLS state; BLIP-2's tower already normalises every token.
            tokens = vision_model.post_layernorm(tokens)
        return tokens.view(batch_size, num_frames, *tokens.shape[1:]), outputs

    def _encode_video(
        self, pixel_values: torch.Tensor, video_mask: torch.Tensor | None, with_tokens: bool, **tower_kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None, BaseModelOutputWithPooling]:
        """Stage-1 embeddings, stage-2 tokens when asked (one tower pass when the tower is shared) and the stage-1
        tower's output."""
        tokens, outputs = self._vision_tower_tokens(self.vision_model, pixel_values, video_mask, **tower_kwargs)
        video_mask = self._video_mask(video_mask, *pixel_values.shape[:2], pixel_values.device)
        projected = self.visual_projection(tokens)  # (batch, frames, tokens, dim)
        frame_embeds = self.temporal_aggregator(projected, video_mask)  # (batch, frames, dim)
        video_embeds = self.similarity_head.pool(frame_embeds, video_mask, projected)
        if not with_tokens:
            vision_tokens = None
        elif self.fine_vision_model is None:
            vision_tokens = tokens.detach()
        else:
            vision_tokens = self.get_vision_tokens(pixel_values, video_mask)
        return video_embeds, vision_tokens, outputs

    def get_similarity(self, text_embeds: torch.Tensor, video_embeds: torch.Tensor) -> torch.Tensor:
        r"""
        Stage-1 similarity of every text with every video, by the configured `similarity_head`: the cosine
        `t @ v.T` ("mean") or TS2-Net's text-conditioned pooling of frame cosines ("text_conditioned", see
        [`text_conditioned_frame_similarity`]).

        Args:
            text_embeds (`(texts, projection_dim)`): from [`get_text_features`].
            video_embeds (`(videos, projection_dim)` or `(videos, frames, projection_dim)`): from
                [`get_video_features`].

        Returns:
            `torch.FloatTensor` of shape `(texts, videos)`, in [-1, 1] (not temperature-scaled).
        """
        return self.similarity_head(text_embeds, video_embeds)

    def get_video_features(
        self, pixel_values: torch.Tensor, video_mask: torch.Tensor | None = None, **other_inputs
    ) -> torch.Tensor:
        r"""
        Stage-1 video embeddings: every frame through the CLIP vision tower, projected, aggregated over time by the
        configured aggregator and L2-normalised (the video counterpart of CLIP's `get_image_features`, normalised as
        [`get_text_features`] is). With `similarity_head="mean"` a video is one vector; with "text_conditioned" it is
        its frame embeddings (zero rows for padding frames), which [`get_similarity`] pools per text.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, frames, channels, height, width)`).
            video_mask (`torch.LongTensor` of shape `(batch_size, frames)`, *optional*): 0 marks padding frames.
            other_inputs: the text keys of a `CrossTVRProcessor` output, ignored.

        Returns:
            `torch.FloatTensor` of shape `(batch_size, projection_dim)`, or `(batch_size, frames, projection_dim)` with
            `similarity_head="text_conditioned"`.
        """
        self._check_processor_keys(other_inputs, "get_video_features")
        return self._encode_video(pixel_values, video_mask, with_tokens=False)[0]

    # ----------------------------------------------------------------------------------------------------------------
    # Stage 2: the fine module over the frozen tower's tokens
    # ----------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def get_vision_tokens(
        self, pixel_values: torch.Tensor, video_mask: torch.Tensor | None = None, **other_inputs
    ) -> torch.Tensor:
        r"""
        The frozen stage-2 vision tokens V_t of every frame (never differentiated; cacheable).

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, frames, channels, height, width)`).
            video_mask (`torch.LongTensor` of shape `(batch_size, frames)`, *optional*): read only by a shared tower
                with token shift.
            other_inputs: the text keys of a `CrossTVRProcessor` output, ignored.

        Returns:
            `torch.FloatTensor` of shape `(batch_size, frames, tokens, fine_vision_hidden_size)`.
        """
        self._check_processor_keys(other_inputs, "get_vision_tokens")
        tower = self.vision_model if self.fine_vision_model is None else self.fine_vision_model
        return self._vision_tower_tokens(tower, pixel_values, video_mask)[0]

    def encode_video(
        self, pixel_values: torch.Tensor, video_mask: torch.Tensor | None = None, **other_inputs
    ) -> CrossTVRVideoOutput:
        """
        Stage-1 embeddings and stage-2 vision tokens of videos, with one tower pass when the tower is shared. Other
        keys of a `CrossTVRProcessor` output are ignored.
        """
        self._check_processor_keys(other_inputs, "encode_video")
        video_embeds, vision_tokens, _ = self._encode_video(pixel_values, video_mask, with_tokens=True)
        return CrossTVRVideoOutput(video_embeds=video_embeds, vision_tokens=vision_tokens)

    def get_fine_logits(
        self,
        qformer_input_ids: torch.Tensor,
        qformer_attention_mask: torch.Tensor | None,
        vision_tokens: torch.Tensor,
        video_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        r"""
        Matching logits of (text_i, video_i) pairs from `fine_module`, the part `config.fine_module` names:
        `"crosstvr"`, [`CrossTVRDecoupledFineModule`] (the paper's decoupled spatial and temporal text attention), or
        `"t2v2t"`, [`CrossTVRT2V2TFineModule`] (T2V2T fusion). This method checks the inputs, projects the tokens
        (`fine_vision_projection`) and runs each distinct caption's text-side computation once.

        Args:
            qformer_input_ids (`torch.LongTensor` of shape `(pairs, text_length)`): Q-Former (BERT) token ids.
            qformer_attention_mask (`torch.LongTensor` of shape `(pairs, text_length)`, *optional*).
            vision_tokens (`torch.FloatTensor` of shape `(pairs, frames, tokens, fine_vision_hidden_size)`): from
                [`get_vision_tokens`] or a token cache (any float dtype).
            video_mask (`torch.LongTensor` of shape `(pairs, frames)`, *optional*).

        Returns:
            `torch.FloatTensor` of shape `(pairs, 2)`.
        """
        self._check_text_length(
            qformer_input_ids, self.config.qformer_config.max_position_embeddings, "qformer_input_ids"
        )
        if vision_tokens.dim() != 4 or vision_tokens.shape[-1] != self.config.fine_vision_hidden_size:
            raise ValueError(
                "vision_tokens must be shaped (pairs, frames, tokens, fine_vision_hidden_size = "
                f"{self.config.fine_vision_hidden_size}), got {tuple(vision_tokens.shape)}."
            )
        num_pairs, num_frames = vision_tokens.shape[:2]
        if qformer_input_ids.shape[0] != num_pairs:
            raise ValueError(f"Got {qformer_input_ids.shape[0]} texts for {num_pairs} videos; pairs must align.")
        if qformer_attention_mask is None:
            qformer_attention_mask = torch.ones_like(qformer_input_ids)
        video_mask = self._video_mask(video_mask, num_pairs, num_frames, vision_tokens.device)
        vision_tokens = vision_tokens.to(self.fine_module.matching_head.weight.dtype)
        if self.fine_vision_projection is not None:
            vision_tokens = self.fine_vision_projection(vision_tokens)  # (pairs, T, N, fine_token_hidden_size)
        qformer_input_ids, qformer_attention_mask = trim_text_padding(qformer_input_ids, qformer_attention_mask)
        # Each distinct text goes through the text-side computation once (re-ranking pairs one text with K videos).
        text_length = qformer_input_ids.shape[1]
        texts, text_of_pair = torch.unique(
            torch.cat([qformer_input_ids, qformer_attention_mask], dim=1), dim=0, return_inverse=True
        )  # (texts, 2 L), (pairs,)
        texts = (texts[:, :text_length], texts[:, text_length:])
        return self.fine_module(*texts, text_of_pair, vision_tokens, video_mask)  # (pairs, 2)

    def get_fine_scores(
        self,
        qformer_input_ids: torch.Tensor,
        qformer_attention_mask: torch.Tensor | None,
        vision_tokens: torch.Tensor,
        video_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        r"""
        Stage-2 score s_fine of (text_i, video_i) pairs, from the matching head's probability of a match
        p = softmax(matching_head(...))[match], as `config.fine_score` says:

            "probability": p        "log_probability": log p        "logit": log(p / (1 - p)) = l_match - l_no_match

        Only differences of the two logits are trained by the matching loss, so all three are well defined. Arguments
        as in [`get_fine_logits`].

        Returns:
            `torch.FloatTensor` of shape `(pairs,)`.
        """
        logits = self.get_fine_logits(qformer_input_ids, qformer_attention_mask, vision_tokens, video_mask)
        if self.config.fine_score == "logit":
            return logits[:, 1] - logits[:, 0]
        log_probability = logits.log_softmax(dim=-1)[:, 1]
        return log_probability.exp() if self.config.fine_score == "probability" else log_probability

    # ----------------------------------------------------------------------------------------------------------------
    # Two-stage retrieval
    # ----------------------------------------------------------------------------------------------------------------

    def _pair_scorer(
        self,
        qformer_input_ids: torch.Tensor,
        qformer_attention_mask: torch.Tensor | None,
        vision_tokens: torch.Tensor,
        video_mask: torch.Tensor | None,
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """A function (text indices, video indices) -> s_fine of those pairs, reading only the rows it needs (so
        `vision_tokens` may live on another device or be memory-mapped)."""
        if qformer_attention_mask is None:
            qformer_attention_mask = torch.ones_like(qformer_input_ids)

        def score_pairs(texts: torch.Tensor, videos: torch.Tensor) -> torch.Tensor:
            rows, texts = videos.to(vision_tokens.device), texts.to(qformer_input_ids.device)
            return self.get_fine_scores(
                qformer_input_ids[texts].to(self.device),
                qformer_attention_mask[texts].to(self.device),
                vision_tokens[rows].to(self.device),
                None if video_mask is None else video_mask[rows.to(video_mask.device)].to(self.device),
            )

        return score_pairs

    def _rerank(
        self,
        similarity: torch.Tensor,
        score_pairs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        top_k: int | None,
        fine_score_weight: float | None,
        batch_size: int,
        coarse_scores: torch.Tensor | None = None,
    ) -> CrossTVRRerankOutput:
        """Re-rank the top K candidates of every row of `similarity` (queries x candidates) with `score_pairs`."""
        top_k = self.config.rerank_top_k if top_k is None else top_k
        weight = self.config.fine_score_weight if fine_score_weight is None else fine_score_weight
        num_queries, num_candidates = similarity.shape
        top_k = min(top_k, num_candidates)
        # A stable sort breaks ties by candidate index, so the stage-1 order is deterministic.
        coarse_ranking = similarity.sort(dim=1, descending=True, stable=True).indices
        top_k_indices = coarse_ranking[:, :top_k]  # (queries, K)
        query_index = torch.arange(num_queries, device=similarity.device).unsqueeze(1).expand_as(top_k_indices)
        flat_queries, flat_candidates = query_index.reshape(-1), top_k_indices.reshape(-1)
        fine_scores = torch.cat(
            [
                score_pairs(flat_queries[start : start + batch_size], flat_candidates[start : start + batch_size])
                for start in range(0, flat_queries.numel(), batch_size)
            ]
        ).view(num_queries, top_k).to(similarity.device)  # stage 2 may run on another device than `similarity`
        return fuse_reranking(similarity, coarse_ranking, fine_scores, weight, coarse_scores)

    @torch.no_grad()
    def rerank_text_to_video(
        self,
        similarity: torch.Tensor,
        qformer_input_ids: torch.Tensor,
        qformer_attention_mask: torch.Tensor | None,
        vision_tokens: torch.Tensor,
        video_mask: torch.Tensor | None = None,
        top_k: int | None = None,
        fine_score_weight: float | None = None,
        batch_size: int = 32,
        coarse_scores: torch.Tensor | None = None,
    ) -> CrossTVRRerankOutput:
        r"""
        Text-to-video re-ranking: for every text, its stage-1 top-K videos are scored by stage 2 and re-ordered by
        s = s_coarse + w * s_fine; the other videos keep their stage-1 order below them.

        Args:
            similarity (`torch.FloatTensor` of shape `(texts, videos)`): stage-1 scores (cosine, or post-processed),
                which choose the K candidates and order the rest.
            qformer_input_ids, qformer_attention_mask (`(texts, text_length)`): Q-Former tokens of the texts.
            vision_tokens (`(videos, frames, tokens, width)`): stage-2 tokens of the videos; only the candidates'
                rows are read, so a memory-mapped cache works.
            video_mask (`(videos, frames)`, *optional*).
            top_k (`int`, *optional*): K, defaults to `config.rerank_top_k`.
            fine_score_weight (`float`, *optional*): w, defaults to `config.fine_score_weight`.
            batch_size (`int`, *optional*, defaults to 32): (text, video) pairs per stage-2 call.
            coarse_scores (`(texts, videos)`, *optional*): s_coarse of the fused score, defaults to `similarity`;
                pass the cosine when `similarity` is post-processed (see [`fuse_reranking`]).
        """
        score_pairs = self._pair_scorer(qformer_input_ids, qformer_attention_mask, vision_tokens, video_mask)
        return self._rerank(similarity, score_pairs, top_k, fine_score_weight, batch_size, coarse_scores)

    @torch.no_grad()
    def rerank_video_to_text(
        self,
        similarity: torch.Tensor,
        qformer_input_ids: torch.Tensor,
        qformer_attention_mask: torch.Tensor | None,
        vision_tokens: torch.Tensor,
        video_mask: torch.Tensor | None = None,
        top_k: int | None = None,
        fine_score_weight: float | None = None,
        batch_size: int = 32,
        coarse_scores: torch.Tensor | None = None,
    ) -> CrossTVRRerankOutput:
        r"""
        Video-to-text re-ranking: for every video, its stage-1 top-K texts are scored by stage 2 and re-ordered.
        `similarity` (and `coarse_scores`) are texts x videos, as for [`rerank_text_to_video`]; the output has one row
        per video.
        """
        score_text_video = self._pair_scorer(qformer_input_ids, qformer_attention_mask, vision_tokens, video_mask)
        return self._rerank(
            similarity.t(),
            lambda videos, texts: score_text_video(texts, videos),
            top_k,
            fine_score_weight,
            batch_size,
            None if coarse_scores is None else coarse_scores.t(),
        )

    @torch.no_grad()
    def retrieve(
        self,
        input_ids: torch.Tensor,
        qformer_input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        video_mask: torch.Tensor | None = None,
        top_k: int | None = None,
        fine_score_weight: float | None = None,
        batch_size: int = 32,
    ) -> CrossTVRRetrievalOutput:
        r"""
        Full two-stage retrieval of a batch of texts against a set of videos, in both directions: stage 1 scores every
        pair ([`get_similarity`]), stage 2 re-ranks the top K of every text and of every video.

        Args:
            input_ids, attention_mask (`(texts, length)`): CLIP tokens of the texts.
            qformer_input_ids, qformer_attention_mask (`(texts, length)`): Q-Former tokens of the texts.
            pixel_values (`(videos, frames, channels, height, width)`), video_mask (`(videos, frames)`).
            top_k, fine_score_weight, batch_size: as in [`rerank_text_to_video`].
        """
        text_embeds = self.get_text_features(input_ids, attention_mask)
        video = self.encode_video(pixel_values, video_mask)
        similarity = self.get_similarity(text_embeds, video.video_embeds)  # (texts, videos)
        rerank_inputs = (similarity, qformer_input_ids, qformer_attention_mask, video.vision_tokens, video_mask)
        return CrossTVRRetrievalOutput(
            logits_per_text=similarity,
            text_to_video=self.rerank_text_to_video(*rerank_inputs, top_k, fine_score_weight, batch_size),
            video_to_text=self.rerank_video_to_text(*rerank_inputs, top_k, fine_score_weight, batch_size),
            text_embeds=text_embeds,
            video_embeds=video.video_embeds,
        )

    # ----------------------------------------------------------------------------------------------------------------
    # Training
    # ----------------------------------------------------------------------------------------------------------------

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        video_mask: torch.Tensor | None = None,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        video_embeds: torch.Tensor | None = None,
        vision_tokens: torch.Tensor | None = None,
        video_ids: torch.Tensor | None = None,
        negative_vision_tokens: torch.Tensor | None = None,
        negative_video_mask: torch.Tensor | None = None,
        listwise_loss_weight: float = 0.0,
        process_group=None,
        generator: torch.Generator | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> CrossTVROutput:
        r"""
        Training losses on a batch of (text_i, video_i) pairs.

        - Stage 1, always: the similarity head's loss — symmetric InfoNCE on the temperature-scaled similarities (see
          [`contrastive_loss`]), or with "cret" L_GEES + alpha L_CCM (see [`CrossTVRCRETSimilarity`]).
        - Stage 2, when `qformer_input_ids` is given: for every text a hard negative video and for every video a hard
          negative text are sampled from the stage-1 similarities (see [`sample_hard_negatives`]), and the matching
          head is trained with cross-entropy on the B positive and 2B negative pairs (see [`matching_pairs`]).
        - Stage 2 with `negative_vision_tokens`: the n given negatives of every text join the matching loss's pairs,
          and the listwise loss ranks each text's video above them (see [`listwise_matching_loss`]).

        `loss` is the sum of the computed losses; freeze the parameters of the stage you do not train.

        With a `process_group` (data-parallel training), the batch is the union of the batches of its processes:
        embeddings are gathered with gradient, the contrastive loss is the global one, negatives are drawn from the
        whole global batch, and each process scores the pairs of its own rows. Pass the same `generator` state on every
        process so that all draw the same negatives; the losses and DDP-averaged gradients then equal those of one
        process holding the global batch.

        Args:
            input_ids, attention_mask (`(batch, length)`): CLIP tokens.
            pixel_values (`(batch, frames, channels, height, width)`, *optional*): needed unless both `video_embeds`
                and (for stage 2) `vision_tokens` are given.
            video_mask (`(batch, frames)`, *optional*).
            qformer_input_ids, qformer_attention_mask (`(batch, length)`, *optional*): Q-Former tokens; enable stage 2.
            video_embeds (`(batch, projection_dim)` or `(batch, frames, projection_dim)`, *optional*): precomputed
                stage-1 video embeddings (a frozen stage 1 during stage-2 training).
            vision_tokens (`(batch, frames, tokens, width)`, *optional*): precomputed stage-2 tokens (a token cache).
            video_ids (`(batch,)`, *optional*): video identities; captions of the same video are then not used as each
                other's negatives.
            negative_vision_tokens (`(batch, n, frames, tokens, width)`, *optional*): stage 2: n more negative videos
                for every text, chosen by the caller (e.g. among the text's stage-1 top K, as re-ranking will face),
                scored as (text_i, negative_ij) with label 0 beside the in-batch pairs; `negative_video_mask`
                `(batch, n, frames)` is their frame mask.
            listwise_loss_weight (`float`, *optional*, defaults to 0): the weight of `loss_listwise` in `loss`.
            process_group (`torch.distributed.ProcessGroup`, *optional*): compute the losses over the global batch of
                this group's processes (e.g. `torch.distributed.group.WORLD`); every process must pass the same batch
                size.
            generator (`torch.Generator`, *optional*): randomness of the hard-negative sampling.
            output_attentions, output_hidden_states (`bool`, *optional*): return the attentions and hidden states of
                the stage-1 towers in `text_model_output` and `vision_model_output`, as CLIP does.
            return_dict (`bool`, *optional*): `False` returns a tuple, as in transformers.
        """
        batch_size = input_ids.shape[0]
        needs_tokens = qformer_input_ids is not None and vision_tokens is None
        if pixel_values is None and (video_embeds is None or needs_tokens):
            raise ValueError(
                "forward needs pixel_values, unless video_embeds (and, with qformer_input_ids, vision_tokens) are given."
            )
        switches = {"output_attentions": output_attentions, "output_hidden_states": output_hidden_states}
        tower_kwargs = {key: value for key, value in switches.items() if value is not None}
        text_outputs = self._text_tower(input_ids, attention_mask, **tower_kwargs)
        text_embeds = self._text_embeds(text_outputs, attention_mask)
        vision_outputs = None
        if video_embeds is None:
            video_embeds, tokens, vision_outputs = self._encode_video(
                pixel_values, video_mask, with_tokens=needs_tokens, **tower_kwargs
            )
            vision_tokens = tokens if needs_tokens else vision_tokens
        elif needs_tokens:
            vision_tokens = self.get_vision_tokens(pixel_values, video_mask)

        if process_group is not None:
            gather = lambda tensor: all_gather_with_grad(tensor, process_group)  # noqa: E731
            gather_data = lambda tensor: all_gather_no_grad(tensor, process_group)  # noqa: E731
            offset = torch.distributed.get_rank(process_group) * batch_size  # this process's rows in the global batch
        else:
            gather = gather_data = lambda tensor: tensor  # noqa: E731
            offset = 0
        all_text_embeds, all_video_embeds = gather(text_embeds), gather(video_embeds)
        # The temperature scales the texts before they meet the videos: both heads are linear in t (S(c t) = c S(t)).
        logit_scale = self.logit_scale.exp().clamp(max=100)
        logits_per_text = self.get_similarity(logit_scale * all_text_embeds, all_video_embeds)  # (B, B)
        if video_ids is None:
            positive_mask = torch.eye(len(all_text_embeds), dtype=torch.bool, device=logits_per_text.device)
        else:
            all_video_ids = gather_data(video_ids)
            positive_mask = all_video_ids.unsqueeze(1) == all_video_ids.unsqueeze(0)
        loss_contrastive = self.similarity_head.loss(
            all_text_embeds, all_video_embeds, logit_scale, positive_mask, logits_per_text
        )
        loss, loss_matching, loss_listwise, matching_logits, matching_labels = loss_contrastive, None, None, None, None

        if qformer_input_ids is not None:
            if qformer_attention_mask is None:
                qformer_attention_mask = torch.ones_like(qformer_input_ids)
            if video_mask is None:
                video_mask = torch.ones(vision_tokens.shape[:2], dtype=torch.long, device=vision_tokens.device)
            negative_video, negative_text = sample_hard_negatives(logits_per_text, positive_mask, generator)
            *pair_inputs, matching_labels = matching_pair_inputs(
                gather_data(qformer_input_ids),
                gather_data(qformer_attention_mask),
                gather_data(vision_tokens),
                gather_data(video_mask),
                negative_video,
                negative_text,
                slice(offset, offset + batch_size),
                negative_vision_tokens,
                negative_video_mask,
            )
            matching_logits = self.get_fine_logits(*pair_inputs)
            loss_matching = F.cross_entropy(matching_logits, matching_labels)
            loss = loss + loss_matching
            if negative_vision_tokens is not None:
                loss_listwise = listwise_matching_loss(matching_logits, batch_size)
                loss = loss + listwise_loss_weight * loss_listwise

        return CrossTVROutput(
            loss=loss,
            loss_contrastive=loss_contrastive,
            loss_matching=loss_matching,
            loss_listwise=loss_listwise,
            logits_per_text=logits_per_text,
            logits_per_video=logits_per_text.t(),
            text_embeds=text_embeds,
            video_embeds=video_embeds,
            matching_logits=matching_logits,
            matching_labels=matching_labels,
            text_model_output=text_outputs,
            vision_model_output=vision_outputs,
        )

# `save_pretrained` copies this file next to the weights and records it in `auto_map`.
CrossTVRModel.register_for_auto_class("AutoModel")


__all__ = ["CrossTVRModel", "CrossTVRPreTrainedModel"]
