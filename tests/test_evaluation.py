import json
import threading

import numpy as np
import pytest
import torch

from crosstvr.cli import main
from crosstvr.data import load_retrieval_dataset, write_fixture
from crosstvr.default_model import build_tiny_model
from crosstvr.evaluation import (
    EncodedSplit,
    compute_retrieval_metrics,
    dual_softmax,
    evaluate_retrieval,
    load_retrieval_metric,
    querybank_normalize,
)
from crosstvr.evaluation.report import format_table


def test_identity_is_perfect():
    metrics = compute_retrieval_metrics(np.eye(20))
    for prefix in ("t2v", "v2t"):
        assert metrics[f"{prefix}_R1"] == metrics[f"{prefix}_R10"] == 100.0
        assert metrics[f"{prefix}_MdR"] == metrics[f"{prefix}_MnR"] == 1.0


def test_reversed_ranks():
    # Text i ranks video i last among 12: every rank is 12.
    scores = np.ones((12, 12)) - np.eye(12)
    metrics = compute_retrieval_metrics(scores)
    assert metrics["t2v_R1"] == metrics["t2v_R10"] == 0.0
    assert metrics["t2v_MdR"] == metrics["t2v_MnR"] == 12.0
    assert metrics["v2t_MnR"] == 12.0


def test_hand_computed_ranks():
    scores = np.array(
        [
            [0.9, 0.1, 0.2],  # video 0 first: rank 1
            [0.8, 0.7, 0.1],  # video 1 second: rank 2
            [0.5, 0.6, 0.4],  # video 2 third: rank 3
        ]
    )
    metrics = compute_retrieval_metrics(scores)
    assert metrics["t2v_R1"] == pytest.approx(100 / 3)
    assert (metrics["t2v_MdR"], metrics["t2v_MnR"]) == (2.0, 2.0)
    # Columns: video 0 -> text 0 first (rank 1); video 1 -> text 1 (0.7) after text 2 (0.6)? no: 0.7 > 0.6, rank 1;
    # video 2 -> text 2 (0.4) after text 0 (0.2)? 0.4 > 0.2 and 0.4 > 0.1: rank 1.
    assert metrics["v2t_R1"] == 100.0


def test_ties_are_broken_by_candidate_index():
    metrics = compute_retrieval_metrics(np.zeros((4, 4)))
    # All scores equal: the target's rank is its index + 1 (ranks 1, 2, 3, 4).
    assert metrics["t2v_R1"] == 25.0 and metrics["t2v_MnR"] == 2.5 and metrics["t2v_MdR"] == 2.5
    assert compute_retrieval_metrics(np.zeros((4, 4))) == metrics  # deterministic


def test_multi_caption_protocol():
    # Three videos; captions 0-1 describe video 0, captions 2-4 video 1, caption 5 video 2.
    index = np.array([0, 0, 1, 1, 1, 2])
    scores = np.array(
        [
            [0.9, 0.1, 0.0],  # rank 1
            [0.2, 0.5, 0.1],  # rank 2
            [0.1, 0.8, 0.0],  # rank 1
            [0.3, 0.2, 0.1],  # rank 2
            [0.0, 0.3, 0.6],  # rank 2
            [0.1, 0.0, 0.2],  # rank 1
        ]
    )
    metrics = compute_retrieval_metrics(scores, index)
    assert metrics["t2v_R1"] == 50.0 and metrics["t2v_MnR"] == 1.5
    # Video-to-text: each video scores a video's captions by the best of them.
    # Video 0: own best 0.9; video 1's best 0.3; video 2's 0.1 -> rank 1.
    # Video 1: own best 0.8; video 0's best 0.5 -> rank 1. Video 2: own 0.2; video 1's best 0.6 -> rank 2.
    assert metrics["v2t_R1"] == pytest.approx(200 / 3) and metrics["v2t_MnR"] == pytest.approx(4 / 3)


def test_evaluate_module_matches_the_plain_function():
    rng = np.random.default_rng(0)
    scores, index = rng.normal(size=(30, 10)), np.repeat(np.arange(10), 3)
    metric = load_retrieval_metric()
    from_module = metric.compute(predictions=scores.astype(np.float32), references=index)
    assert from_module == pytest.approx(compute_retrieval_metrics(scores.astype(np.float32), index))
    reverse = rng.normal(size=(10, 30))
    with_reverse = metric.compute(predictions=scores, references=index, video_to_text_scores=reverse)
    assert with_reverse["v2t_MnR"] == pytest.approx(compute_retrieval_metrics(scores, index, reverse)["v2t_MnR"])


def test_metric_input_errors():
    with pytest.raises(ValueError, match="needs text_to_video_index"):
        compute_retrieval_metrics(np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"videos \[2\] have no caption"):
        compute_retrieval_metrics(np.zeros((3, 3)), [0, 1, 1])
    with pytest.raises(ValueError, match="NaN"):
        compute_retrieval_metrics(np.full((2, 2), np.nan))


def hubness_case():
    """Video 0 is a hub: every text scores it high, although only text 0 describes it."""
    return torch.tensor(
        [
            [0.90, 0.10, 0.20, 0.10],
            [0.85, 0.80, 0.10, 0.20],
            [0.86, 0.20, 0.84, 0.10],
            [0.70, 0.10, 0.20, 0.60],
        ]
    )


def test_dual_softmax_demotes_a_hub():
    similarity = hubness_case()
    assert compute_retrieval_metrics(similarity.numpy())["t2v_R1"] == 25.0
    processed = dual_softmax(similarity, temperature=0.05)
    assert compute_retrieval_metrics(processed.numpy())["t2v_R1"] == 100.0
    # Each video's column is re-weighted by a softmax over texts: the hub's weight concentrates on text 0.
    assert processed[0, 0] > processed[1, 0] and processed[0, 0] > processed[2, 0]


def test_querybank_normalisation_demotes_a_hub_for_the_queries_it_attracts():
    similarity = hubness_case()
    bank = torch.tensor([[0.9, 0.2, 0.2, 0.2], [0.8, 0.1, 0.3, 0.2], [0.85, 0.3, 0.1, 0.1]])  # the hub attracts all
    processed = querybank_normalize(similarity, bank, beta=20.0, k=1)
    # Every test query's best video is the hub, so every row is renormalised and the hub falls behind the true video
    # for texts 1-3, while text 0 keeps it first.
    assert compute_retrieval_metrics(processed.numpy())["t2v_R1"] == 100.0
    # Only video 0 is in the activation set; rows whose best video is elsewhere are left unchanged.
    untouched = similarity.clone()
    untouched[:, 0] = 0.0
    torch.testing.assert_close(querybank_normalize(untouched, bank), untouched)
    expected = similarity - torch.logsumexp(20.0 * bank, dim=0) / 20.0
    torch.testing.assert_close(processed[1], expected[1])
    with pytest.raises(ValueError, match="same videos"):
        querybank_normalize(similarity, bank[:, :3])


@pytest.fixture(scope="module")
def msvd_test_split(tmp_path_factory):
    root = tmp_path_factory.mktemp("msvd")
    fixture = write_fixture("msvd", root)
    return load_retrieval_dataset("msvd", fixture.annotations_dir, fixture.videos_dir, cache_dir=root / "cache")


def test_two_stage_equals_stage_one_when_stage_two_cannot_reorder(msvd_test_split):
    model, processor = build_tiny_model()
    test = msvd_test_split["test"]
    for kwargs in ({"top_k": 1}, {"fine_score_weight": 0.0}):
        evaluation = evaluate_retrieval(model, processor, test, progress=False, **kwargs)
        assert evaluation.metrics["two_stage"] == evaluation.metrics["stage1"], kwargs
    stage_one_only = evaluate_retrieval(model, processor, test, rerank=False, progress=False)
    assert stage_one_only.metrics["two_stage"] is None and stage_one_only.top_k is None
    assert "CrossTVR" not in format_table(stage_one_only)
    assert (stage_one_only.num_texts, stage_one_only.num_videos) == (test.num_rows, 2)


def test_evaluation_options_are_checked(msvd_test_split):
    model, processor = build_tiny_model()
    with pytest.raises(ValueError, match="needs querybank_captions"):
        evaluate_retrieval(model, processor, msvd_test_split["test"], post_processing="qb_norm", progress=False)
    with pytest.raises(ValueError, match="post_processing='zscore'"):
        evaluate_retrieval(model, processor, msvd_test_split["test"], post_processing="zscore", progress=False)


def test_evaluate_command_end_to_end(tmp_path, capsys):
    fixture = write_fixture("msrvtt", tmp_path / "msrvtt")
    model, processor = build_tiny_model(seed=2)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    common = ["--dataset", "msrvtt", "--annotations", fixture.annotations_dir, "--videos", fixture.videos_dir]
    common += ["--cache-dir", str(tmp_path / "cache"), "--num-workers", "0", "--model", str(tmp_path / "model")]

    assert main(["evaluate", *common, "--top-k", "2", "--output", str(tmp_path / "results.json")]) == 0
    table = capsys.readouterr().out
    assert "MSR-VTT test_1k" in table and "CrossTVR (two-stage)" in table and "K = 2" in table
    results = json.loads((tmp_path / "results.json").read_text())
    assert (results["dataset"], results["split"], results["num_texts"], results["num_videos"]) == (
        "msrvtt",
        "test_1k",
        3,
        3,
    )
    assert set(results["metrics"]) == {"stage1", "two_stage"}
    assert set(results["metrics"]["two_stage"]) == {
        f"{p}_{m}" for p in ("t2v", "v2t") for m in ("R1", "R5", "R10", "MdR", "MnR")
    }

    assert main(["evaluate", *common, "--no-rerank", "--dsl", "--output", str(tmp_path / "dsl.json")]) == 0
    dsl = json.loads((tmp_path / "dsl.json").read_text())
    assert dsl["post_processing"] == "dsl" and dsl["metrics"]["two_stage"] is None

    bank = ["--qb-norm", "--qb-norm-size", "40", "--output", str(tmp_path / "qb.json")]
    assert main(["evaluate", *common, *bank]) == 0
    assert json.loads((tmp_path / "qb.json").read_text())["post_processing"] == "qb_norm"


def test_depth_sweep_equals_separate_evaluations(msvd_test_split):
    from crosstvr.evaluation import encode_split, rerank_depth_sweep

    model, processor = build_tiny_model()
    test = msvd_test_split["test"]
    encoded = encode_split(model, processor, test, progress=False)
    similarity = encoded.text_embeds @ encoded.video_embeds.t()
    sweep = rerank_depth_sweep(model, encoded, similarity, depths=[1, 2], progress=False)
    for depth in (1, 2):
        separate = evaluate_retrieval(model, processor, test, top_k=depth, progress=False)
        assert sweep[depth] == pytest.approx(separate.metrics["two_stage"])


def test_dual_softmax_for_video_to_text_takes_its_prior_over_videos():
    # Transposed hub case: text 0 attracts every video, so video-to-text R@1 is 25 % on the plain matrix.
    similarity = hubness_case().t().contiguous()  # (texts, videos)
    assert compute_retrieval_metrics(similarity.numpy())["v2t_R1"] == 25.0
    video_to_text = dual_softmax(similarity, temperature=0.05, dim=1)
    # By hand: S'[0, 1] = 0.85 * exp(0.85 / 0.05) / sum_v exp(S[0, v] / 0.05).
    expected = 0.85 * torch.exp(torch.tensor(0.85 / 0.05)) / torch.exp(similarity[0] / 0.05).sum()
    torch.testing.assert_close(video_to_text[0, 1], expected)
    assert compute_retrieval_metrics(similarity.numpy(), video_to_text_scores=video_to_text.t().numpy())["v2t_R1"] == 100.0
    # The text-to-video prior (over texts) only rescales each video's column: the video-to-text ranking is unchanged.
    text_prior = dual_softmax(similarity, temperature=0.05, dim=0)
    assert compute_retrieval_metrics(similarity.numpy(), video_to_text_scores=text_prior.t().numpy())["v2t_R1"] == 25.0


def encoded_from_similarity(similarity: torch.Tensor) -> EncodedSplit:
    """A split whose stage-1 similarity is `similarity` (texts x videos, one caption per video)."""
    num_texts, num_videos = similarity.shape
    return EncodedSplit(
        text_embeds=similarity,
        qformer_input_ids=torch.ones(num_texts, 4, dtype=torch.long),
        qformer_attention_mask=torch.ones(num_texts, 4, dtype=torch.long),
        text_to_video_index=torch.arange(num_texts),
        video_embeds=torch.eye(num_videos),
        vision_tokens=torch.zeros(num_videos, 1, 1, 1, dtype=torch.float16),
        video_mask=torch.ones(num_videos, 1, dtype=torch.long),
    )


def test_evaluation_with_dsl_improves_both_directions():
    model, processor = build_tiny_model()
    similarity = hubness_case()  # video 0 is a hub for text-to-video ...
    similarity[0] = similarity[:, 0]  # ... and text 0 one for video-to-text
    encoded = encoded_from_similarity(similarity)
    plain = evaluate_retrieval(model, processor, None, rerank=False, encoded=encoded).metrics["stage1"]
    dsl = evaluate_retrieval(
        model, processor, None, rerank=False, post_processing="dsl", dsl_temperature=0.05, encoded=encoded
    ).metrics["stage1"]
    assert dsl["t2v_R1"] > plain["t2v_R1"] and dsl["v2t_R1"] > plain["v2t_R1"]


def test_dsl_chooses_the_candidates_and_the_cosine_stays_in_the_fused_score():
    from crosstvr.evaluation import rerank_text_to_video, rerank_video_to_text

    model, processor = build_tiny_model()
    config = model.config
    cosine = torch.full((6, 6), 0.1) + 0.5 * torch.eye(6)
    cosine[:, 0] = torch.tensor([0.9, 0.8, 0.8, 0.8, 0.8, 0.8])  # video 0 is a hub ...
    cosine[0] = cosine[:, 0]  # ... and text 0 one
    text = processor(text=[f"a {colour} dot flashes" for colour in ("red", "blue", "green", "black", "yellow", "purple")])
    encoded = EncodedSplit(
        text_embeds=cosine,
        qformer_input_ids=text["qformer_input_ids"],
        qformer_attention_mask=text["qformer_attention_mask"],
        text_to_video_index=torch.arange(6),
        video_embeds=torch.eye(6),
        vision_tokens=torch.randn(6, config.num_frames, 17, config.fine_vision_hidden_size),
        video_mask=torch.ones(6, config.num_frames, dtype=torch.long),
    )
    dsl = dual_softmax(cosine, 0.01, dim=0)
    out = rerank_text_to_video(model, encoded, dsl, top_k=3, progress=False, coarse_scores=cosine)
    torch.testing.assert_close(out.top_k_indices, dsl.sort(dim=1, descending=True, stable=True).indices[:, :3])
    # DSL shrinks most scores by orders of magnitude; the fused score still adds the fine score to the cosine.
    torch.testing.assert_close(
        out.fused_scores, cosine.gather(1, out.top_k_indices) + config.fine_score_weight * out.fine_scores
    )
    # evaluate_retrieval wires it so, in both directions. With w = 0 the cosine alone orders the top K, so the hub
    # comes first again among the candidates DSL chose.
    kwargs = {"top_k": 3, "fine_score_weight": 0.0, "progress": False}
    evaluation = evaluate_retrieval(model, processor, None, post_processing="dsl", encoded=encoded, **kwargs)

    def metrics(coarse_scores):
        text_to_video = rerank_text_to_video(model, encoded, dsl, coarse_scores=coarse_scores, **kwargs)
        video_to_text = rerank_video_to_text(
            model, encoded, dual_softmax(cosine, 0.01, dim=1), coarse_scores=coarse_scores, **kwargs
        )
        return compute_retrieval_metrics(text_to_video.logits.numpy(), np.arange(6), video_to_text.logits.numpy())

    assert evaluation.metrics["two_stage"] == metrics(cosine) != metrics(None)


def test_evaluate_module_and_function_agree_on_near_ties():
    # Differences below float32's resolution: the function (float64) separates them, and so must the module.
    scores = np.array([[1.0, 1.0 + 1e-9, 0.0], [0.0, 1.0, 1.0 - 1e-9], [1e-9, 0.0, 0.0]])
    expected = compute_retrieval_metrics(scores, [0, 1, 2])
    assert expected["t2v_R1"] == pytest.approx(100 / 3)  # float32 would make rows 0 and 1 ties: 66.7
    assert load_retrieval_metric().compute(predictions=scores, references=[0, 1, 2]) == expected


def test_sharded_evaluation_equals_one_process(msvd_test_split):
    # Two "processes" (threads) each encode and re-rank their half; `gather` exchanges the parts, as
    # accelerate's gather_object does between processes.
    model, processor = build_tiny_model()
    test = msvd_test_split["test"]
    expected = evaluate_retrieval(model, processor, test, top_k=2, progress=False)
    barrier, exchanged, encoded_videos = threading.Barrier(2), {}, {0: 0, 1: 0}
    results = [None, None]
    encode_video = model.encode_video

    def counting_encode_video(pixel_values, video_mask=None):
        encoded_videos[threading.current_thread().shard] += len(pixel_values)
        return encode_video(pixel_values, video_mask)

    def run(shard: int):
        threading.current_thread().shard = shard

        def gather(value):
            exchanged[shard] = value
            barrier.wait()
            parts = [exchanged[0], exchanged[1]]
            barrier.wait()  # both have read before the next exchange overwrites
            return parts

        results[shard] = evaluate_retrieval(
            model, processor, test, top_k=2, progress=False, num_shards=2, shard_index=shard, gather=gather
        )

    model.encode_video = counting_encode_video
    threads = [threading.Thread(target=run, args=(shard,)) for shard in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert encoded_videos == {0: 1, 1: 1}  # each process decoded and encoded its own video
    for result in results:
        assert result.metrics == expected.metrics
        assert (result.num_texts, result.num_videos) == (expected.num_texts, expected.num_videos)
