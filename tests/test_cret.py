"""CRET as stage 1's similarity head (`similarity_head="cret"`): the stored vectors, the GEES bound against a
Monte-Carlo estimate of the expectation it bounds, the losses and the index (gradient caching:
`tests/test_similarity_head.py`)."""

import pytest
import torch
import torch.nn.functional as F

from crosstvr import CrossTVRConfig
from crosstvr.default_model import build_tiny_model
from crosstvr.indexing import VideoIndex
from crosstvr.modeling_crosstvr import contrastive_loss, gees_loss
from crosstvr.synthetic import write_sample_library


CRET = {"similarity_head": "cret", "cret_num_centers": 3, "cret_num_heads": 4, "cret_local_weight": 0.5}


@pytest.fixture(scope="module")
def models(tester):
    """A CRET model and a mean-head model with the same stage-1 towers."""
    cret = tester.get_model(seed=0, **CRET).eval()
    mean = tester.get_model(seed=0).eval()
    mean.load_state_dict({k: v for k, v in cret.state_dict().items() if not k.startswith("similarity_head")})
    return cret, mean


def test_configuration_checks_the_cret_settings():
    with pytest.raises(ValueError, match="cret_local_weight=0.0 must be"):
        CrossTVRConfig(similarity_head="cret", cret_local_weight=0.0)
    with pytest.raises(ValueError, match="cret_num_heads=5 does not divide"):
        CrossTVRConfig(similarity_head="cret", cret_num_heads=5)
    with pytest.raises(ValueError, match="cret_gees_bound='tight'"):
        CrossTVRConfig(similarity_head="cret", cret_gees_bound="tight")


def test_one_inner_product_of_the_stored_vectors_is_s_g_plus_beta_s_l(models, tester):
    cret, mean = models
    inputs = tester.get_inputs()
    with torch.no_grad():
        text, video = cret.get_text_features(inputs["input_ids"], inputs["attention_mask"]), cret.get_video_features(
            inputs["pixel_values"], inputs["video_mask"])
        mean_text = mean.get_text_features(inputs["input_ids"], inputs["attention_mask"])
        mean_video = mean.get_video_features(inputs["pixel_values"], inputs["video_mask"])
    dim, centers, beta = 16, 3, 0.5
    assert text.shape == video.shape == (3, (centers + 2) * dim)
    head = cret.similarity_head
    text_global, text_local, text_last = head.split(text)
    video_global, video_local, video_variance = head.split(video)
    # The global parts are the mean head's embeddings (S_g = the CLIP4Clip cosine); the text's last block is zero.
    torch.testing.assert_close(text_global, mean_text)
    torch.testing.assert_close(video_global, mean_video)
    assert torch.equal(text_last, torch.zeros_like(text_last)) and (video_variance >= 0).all()
    s_g = text_global @ video_global.t()
    s_l = torch.stack([F.cosine_similarity(text_local[:, None, c], video_local[None, :, c], dim=-1)
                       for c in range(centers)]).mean(dim=0)
    torch.testing.assert_close(cret.get_similarity(text, video), s_g + beta * s_l)
    torch.testing.assert_close(text @ video.t(), s_g + beta * s_l)


def test_padding_frames_and_padding_words_change_nothing(models, tester):
    cret, _ = models
    inputs = tester.get_inputs()  # the first video's last frame is padding
    other = inputs["pixel_values"].clone()
    other[0, -1] = torch.randn_like(other[0, -1])
    with torch.no_grad():
        video = cret.get_video_features(inputs["pixel_values"], inputs["video_mask"])
        torch.testing.assert_close(cret.get_video_features(other, inputs["video_mask"]), video)
        ids, mask = inputs["input_ids"].clone(), inputs["attention_mask"].clone()
        padded = torch.cat([ids, torch.full((len(ids), 3), 7)], dim=1), torch.cat([mask, torch.zeros(len(ids), 3, dtype=mask.dtype)], 1)
        torch.testing.assert_close(cret.get_text_features(*padded), cret.get_text_features(ids, mask), atol=1e-5, rtol=1e-5)


def test_gees_against_a_monte_carlo_estimate_of_the_expected_nce_loss():
    # v_j ~ N(mu_j, diag sigma_j), one draw per video shared by all texts; the NCE loss of text i against video i.
    generator = torch.Generator().manual_seed(0)
    texts = F.normalize(torch.randn(4, 8, generator=generator), dim=-1)
    means = 0.8 * F.normalize(torch.randn(4, 8, generator=generator), dim=-1)
    variances = 0.05 * torch.rand(4, 8, generator=generator)
    tau, positives = torch.tensor(10.0), torch.eye(4, dtype=torch.bool)
    draws = means + variances.sqrt() * torch.randn(100_000, 4, 8, generator=generator)  # (samples, videos, dim)
    logits = tau * torch.einsum("id,sjd->sij", texts, draws)
    monte_carlo = -logits.log_softmax(dim=-1).diagonal(dim1=1, dim2=2).mean()
    jensen = gees_loss(texts, means, variances, tau, positives, bound="jensen")
    slides = gees_loss(texts, means, variances, tau, positives, bound="slides")
    # Jensen's form bounds the expectation from above; the slides' form is lower by tau^2/2 <t_i^2, sigma_i> on
    # average, and here even below the expectation: it is not a bound.
    assert jensen > monte_carlo + 0.1
    torch.testing.assert_close(slides, jensen - tau**2 / 2 * (texts.square() * variances).sum(-1).mean())
    assert slides < monte_carlo - 0.1
    # Without variance both are the plain NCE loss of the means.
    zero = torch.zeros_like(variances)
    plain = F.cross_entropy(tau * texts @ means.t(), torch.arange(4))
    for bound in ("slides", "jensen"):
        torch.testing.assert_close(gees_loss(texts, means, zero, tau, positives, bound=bound), plain)
    # Another caption of a text's own video is no negative: it leaves the denominator.
    two_captions = positives.clone()
    two_captions[0, 1] = two_captions[1, 0] = True
    masked = gees_loss(texts, means, zero, tau, two_captions, bound="jensen")
    logits = (tau * texts @ means.t()).masked_fill(two_captions & ~positives, float("-inf"))
    torch.testing.assert_close(masked, F.cross_entropy(logits, torch.arange(4)))


def test_the_training_loss_is_gees_plus_alpha_ccm(tester):
    model = tester.get_model(seed=0, **CRET, cret_ccm_loss_weight=0.7).train()
    inputs = {k: v for k, v in tester.get_inputs().items() if not k.startswith("qformer")}
    outputs = model(**inputs)
    head, scale = model.similarity_head, model.logit_scale.exp()
    text_global, text_local, _ = head.split(outputs.text_embeds)
    video_global, video_local, video_variance = head.split(outputs.video_embeds)
    positives = torch.eye(3, dtype=torch.bool)
    s_l = torch.einsum("icd,jcd->ij", text_local, video_local) / 3
    expected = gees_loss(text_global, video_global, video_variance, scale, positives, "slides") + 0.7 * contrastive_loss(
        scale * s_l, positives)
    torch.testing.assert_close(outputs.loss_contrastive, expected)
    outputs.loss.backward()
    for parameter in (head.centers, head.attention.in_proj_weight, model.text_projection.weight, model.logit_scale):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0


@pytest.mark.parametrize("faiss_index", [None, "hnsw"])
def test_the_index_ranks_by_s_with_one_vector_per_video(tmp_path, faiss_index):
    if faiss_index is not None:
        pytest.importorskip("faiss")
    model, processor = build_tiny_model(similarity_head="cret")
    write_sample_library(tmp_path / "library", count=6, seed=3)
    index = VideoIndex.build(tmp_path / "library", tmp_path / "index", model, processor, num_workers=0,
                             faiss_index=faiss_index)
    stored = index.stage1_embeddings()
    assert stored.shape == (6, (model.config.cret_num_centers + 2) * model.config.projection_dim)
    query = "a red circle moves left"
    text = processor(text=[query])
    with torch.no_grad():
        similarity = model.get_similarity(model.get_text_features(text["input_ids"], text["attention_mask"]), stored)[0]
    order = similarity.sort(descending=True, stable=True).indices.tolist()
    result = index.search(query, k=6, rerank=False)
    assert [hit.path for hit in result.hits] == [index.paths[i] for i in order]
    assert [hit.coarse_score for hit in result.hits] == pytest.approx(similarity[order].tolist(), abs=1e-5)
