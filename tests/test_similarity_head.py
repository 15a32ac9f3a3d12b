"""Stage 1's similarity head: CLIP4Clip's mean (one vector per video) or TS2-Net's text-conditioned pooling of frame
similarities (`similarity_head="text_conditioned"`), through the model, training, evaluation and the index."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from crosstvr import CrossTVRConfig
from crosstvr.data import load_retrieval_dataset, write_fixture
from crosstvr.default_model import build_tiny_model
from crosstvr.evaluation import compute_retrieval_metrics, encode_split, evaluate_retrieval
from crosstvr.indexing import VideoIndex, search_frames
from crosstvr.modeling_crosstvr import text_conditioned_frame_similarity
from crosstvr.synthetic import write_sample_library


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def unit(*shape, generator):
    return F.normalize(torch.randn(*shape, generator=generator), dim=-1)


def test_text_conditioned_similarity_equals_a_hand_computation():
    # TS2-Net's get_frame_similarity, written out frame by frame: s_f = <t, f_f>, a = softmax(4 s / ||s||) over the
    # real frames, S = sum_f a_f s_f. The second video has two padding frames (zero rows).
    generator = torch.Generator().manual_seed(0)
    texts, frames = unit(3, 8, generator=generator), unit(2, 4, 8, generator=generator)
    frames[1, 2:] = 0
    expected = torch.zeros(3, 2)
    for t in range(3):
        for v, real in enumerate((4, 2)):
            s = [float(texts[t] @ frames[v, f]) for f in range(real)]
            norm = sum(x * x for x in s) ** 0.5
            weights = torch.softmax(torch.tensor([4 * x / norm for x in s]), dim=0)
            expected[t, v] = sum(float(w) * x for w, x in zip(weights, s))
    torch.testing.assert_close(text_conditioned_frame_similarity(texts, frames), expected)
    # Chunking the texts changes nothing.
    torch.testing.assert_close(text_conditioned_frame_similarity(texts, frames, chunk_size=2), expected)


def test_text_conditioned_similarity_weighs_the_matching_frames():
    generator = torch.Generator().manual_seed(1)
    texts, frames = unit(2, 8, generator=generator), unit(5, 6, 8, generator=generator)
    frames[0, 3:] = 0
    cosines = torch.einsum("td,vfd->tvf", texts, frames)
    real = frames.abs().sum(-1) > 0
    mean = (cosines * real).sum(-1) / real.sum(-1)
    # Scale 0: uniform weights over the real frames, the mean of their cosines (padding frames do not count).
    torch.testing.assert_close(text_conditioned_frame_similarity(texts, frames, scale=0.0), mean)
    # A large scale tends to the best real frame; the default lies between the mean and the maximum.
    best = cosines.masked_fill(~real, -2).amax(-1)
    torch.testing.assert_close(text_conditioned_frame_similarity(texts, frames, scale=1e4), best, atol=1e-3, rtol=0)
    default = text_conditioned_frame_similarity(texts, frames)
    assert torch.all(default >= mean - 1e-6) and torch.all(default <= best + 1e-6)


def test_configuration_names_the_heads():
    with pytest.raises(ValueError, match="similarity_head='max' is not one of"):
        build_tiny_model(similarity_head="max")
    assert CrossTVRConfig().similarity_head == "mean"  # existing checkpoints keep their similarity
    # The heads have no weights: a checkpoint trained with one loads into the other (e.g. to evaluate it both ways).
    mean, text_conditioned = build_tiny_model()[0], build_tiny_model(similarity_head="text_conditioned")[0]
    assert mean.state_dict().keys() == text_conditioned.state_dict().keys()


def test_model_with_the_text_conditioned_head(tester):
    model = tester.get_model(similarity_head="text_conditioned").eval()
    mean_model = tester.get_model(similarity_head="mean").eval()  # same seed: the same weights
    inputs = tester.get_inputs()
    with torch.no_grad():
        frame_embeds = model.get_video_features(inputs["pixel_values"], inputs["video_mask"])
        video_embeds = mean_model.get_video_features(inputs["pixel_values"], inputs["video_mask"])
        text_embeds = model.get_text_features(inputs["input_ids"], inputs["attention_mask"])
    # (videos, frames, dim): unit rows for real frames, zero rows for padding (the first video's last frame).
    assert frame_embeds.shape == (3, tester.num_frames, 16)
    norms = frame_embeds.norm(dim=-1)
    torch.testing.assert_close(norms, inputs["video_mask"].float())
    # The mean head's video embedding is the normalised mean of the same frame embeddings.
    real = inputs["video_mask"].unsqueeze(-1)
    torch.testing.assert_close(video_embeds, F.normalize((frame_embeds * real).sum(1) / real.sum(1), dim=-1))

    outputs = model(**{k: v for k, v in inputs.items() if not k.startswith("qformer")})
    expected = model.logit_scale.exp() * text_conditioned_frame_similarity(text_embeds, frame_embeds)
    torch.testing.assert_close(outputs.logits_per_text, expected)
    outputs.loss.backward()
    assert model.visual_projection.weight.grad.abs().sum() > 0

    with torch.no_grad():
        retrieval = model.retrieve(**inputs, top_k=2)
    torch.testing.assert_close(retrieval.logits_per_text, expected / model.logit_scale.exp())
    assert retrieval.text_to_video.ranking.shape == (3, 3)


@pytest.mark.parametrize("head, own_gradient", [("text_conditioned", "grad/visual_projection.weight"),
                                                ("cret", "grad/similarity_head.centers")])
def test_gradient_caching_computes_the_gradients_of_one_batch(tmp_path, head, own_gradient):
    # Stage 1's accumulated micro-batches (gradient caching) against one batch, with the frame-level head and with
    # CRET's (whose loss is GEES + CCM).
    script = os.path.join(ROOT, "tests", "scripts", "distributed_losses.py")
    grads = {}
    for micro_batches in (1, 2):
        output = tmp_path / f"{micro_batches}.safetensors"
        result = subprocess.run(
            [sys.executable, script, str(output), "1", str(micro_batches), head],
            capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        grads[micro_batches] = load_file(output)
    assert set(grads[1]) == set(grads[2]) and own_gradient in grads[1]
    for name, value in grads[1].items():
        torch.testing.assert_close(grads[2][name], value, atol=1e-5, rtol=1e-4, msg=name)


def test_evaluation_ranks_by_the_head(tmp_path):
    model, processor = build_tiny_model(similarity_head="text_conditioned")
    fixture = write_fixture("msvd", tmp_path / "msvd")
    rows = load_retrieval_dataset("msvd", fixture.annotations_dir, fixture.videos_dir, splits=["test"])["test"]
    encoded = encode_split(model, processor, rows, progress=False)
    assert encoded.video_embeds.shape[1:] == (model.config.num_frames, model.config.projection_dim)
    result = evaluate_retrieval(model, processor, rows, rerank=False, progress=False, encoded=encoded)
    similarity = text_conditioned_frame_similarity(encoded.text_embeds, encoded.video_embeds).numpy()
    index = encoded.text_to_video_index.numpy()
    assert result.metrics["stage1"] == compute_retrieval_metrics(similarity, index, similarity.T)


@pytest.mark.parametrize("faiss_index", ["flat", "hnsw"])
def test_index_searches_frames_exactly(tmp_path, faiss_index):
    if faiss_index == "hnsw":
        pytest.importorskip("faiss")
    model, processor = build_tiny_model(similarity_head="text_conditioned")
    write_sample_library(tmp_path / "library", count=6, seed=3)
    index = VideoIndex.build(tmp_path / "library", tmp_path / "index", model, processor, num_workers=0,
                             faiss_index=faiss_index)
    frame_embeds = index.stage1_embeddings()
    frames = model.config.num_frames
    assert frame_embeds.shape == (6, frames, model.config.projection_dim)
    if faiss_index == "flat":  # would scan every frame anyway: the exact product instead
        assert index.settings["faiss"] is None
    else:  # one entry per frame (HNSW over 24 vectors finds them all: the ranking is the exact one)
        assert index.settings["faiss"]["frames"] == frames and index.settings["faiss"]["count"] == 6 * frames
    query = "a red circle moves left"
    text = processor(text=[query])
    with torch.no_grad():
        text_embeds = model.get_text_features(text["input_ids"], text["attention_mask"])
    similarity = text_conditioned_frame_similarity(text_embeds, frame_embeds)[0]
    order = similarity.sort(descending=True, stable=True).indices.tolist()
    for k in (1, 3, 6):  # a small k stops fetching frames early; the ranking is still the exact one
        stage_one = index.search(query, k=k, rerank=False)
        assert [hit.path for hit in stage_one.hits] == [index.paths[i] for i in order[:k]]
        assert [hit.coarse_score for hit in stage_one.hits] == pytest.approx(similarity[order[:k]].tolist(), abs=1e-5)
    reranked = index.search(query, k=6, top_k_rerank=3)
    assert [hit.reranked for hit in reranked.hits] == [True] * 3 + [False] * 3
    assert {hit.path for hit in reranked.hits[:3]} == {index.paths[i] for i in order[:3]}


def test_frame_search_fetches_more_frames_until_no_unseen_video_can_win():
    # Twelve "spiky" videos (one frame at cosine 0.9, five at 0: S = 0.82) fill the first fetch of 12 frames; the
    # "even" video (six frames at 0.85: S = 0.85) has none in it but scores best. A video's score is at most its best
    # frame's cosine, and 0.82 < 0.9 leaves room for an unseen video: the search must fetch more frames and find it.
    faiss = pytest.importorskip("faiss")
    dim, text = 64, torch.zeros(1, 64)
    text[0, 0] = 1

    def frame(cosine: float, axis: int) -> torch.Tensor:
        vector = torch.zeros(dim)
        vector[0], vector[axis] = cosine, (1 - cosine**2) ** 0.5
        return vector

    spiky = [torch.stack([frame(0.9, 1)] + [frame(0.0, 2 + f) for f in range(5)]) for _ in range(12)]
    even = torch.stack([frame(0.85, 10 + f) for f in range(6)])
    frame_embeds = torch.stack([*spiky, even])  # (13, 6, dim)
    flat = faiss.IndexFlatIP(dim)
    flat.add(frame_embeds.flatten(0, 1).numpy())
    expected = text_conditioned_frame_similarity(text, frame_embeds)[0]
    assert expected[12] > expected[:12].max() and expected[:12].max() < 0.9
    scores, positions = search_frames(flat, frame_embeds, text_conditioned_frame_similarity, text, 1)
    assert positions.tolist() == [12] and scores.tolist() == pytest.approx([expected[12].item()])
