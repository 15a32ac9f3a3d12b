"""The GPU paths: the same model on CUDA as on the CPU, half-precision towers, evaluation and indexing on the GPU
(mixed-precision training on the GPU: `tests/test_training.py`). Skipped where there is no CUDA device (CI has none); run on a GPU machine with
`pytest tests/test_cuda.py`. Written without access to a GPU: not yet run on one (README, *Devices and precision*)."""

import json

import pytest
import torch

from crosstvr.cli import main
from crosstvr.data import write_fixture
from crosstvr.indexing import VideoIndex
from crosstvr.loading import load_model
from crosstvr.synthetic import write_sample_library


pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    return write_fixture("msrvtt", tmp_path_factory.mktemp("cuda") / "msrvtt")


def test_the_model_computes_the_same_on_the_gpu(tester):
    model = tester.get_model(seed=0, temporal_aggregator="transformer").eval()
    inputs = tester.get_inputs(seed=1)
    fine_inputs = ("qformer_input_ids", "qformer_attention_mask")

    def outputs(device: str) -> tuple[torch.Tensor, ...]:
        moved = {key: value.to(device) for key, value in inputs.items()}
        model.to(device)
        with torch.no_grad():
            video = model.encode_video(moved["pixel_values"], moved["video_mask"])
            text = model.get_text_features(moved["input_ids"], moved["attention_mask"])
            fine = model.get_fine_scores(*(moved[key] for key in fine_inputs), video.vision_tokens, moved["video_mask"])
        return tuple(t.cpu() for t in (model.get_similarity(text, video.video_embeds), video.vision_tokens, fine))

    for on_gpu, on_cpu in zip(outputs("cuda"), outputs("cpu")):
        torch.testing.assert_close(on_gpu, on_cpu, atol=1e-4, rtol=1e-4)


def test_bfloat16_towers_with_a_float32_stage_two_rank_as_float32_does():
    full, processor = load_model(device="cuda", dtype="float32")
    half, _ = load_model(device="cuda", dtype="bfloat16")
    assert half.text_model.embeddings.token_embedding.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in half.fine_module.matching_head.parameters())
    captions = ["a red circle moves left", "a blue square moves up", "a green triangle moves down"]
    text = processor(text=captions)
    with torch.no_grad():
        embeds = [m.get_text_features(text["input_ids"].cuda(), text["attention_mask"].cuda()).float() for m in (full, half)]
    torch.testing.assert_close(embeds[1], embeds[0], atol=3e-2, rtol=0)


def test_evaluation_on_the_gpu_matches_the_cpu(fixture, tmp_path, capsys):
    common = ["evaluate", "--dataset", "msrvtt", "--annotations", fixture.annotations_dir, "--videos",
              fixture.videos_dir, "--num-workers", "0", "--cache-dir", str(tmp_path / "rows")]
    for device in ("cpu", "cuda"):
        assert main([*common, "--device", device, "--output", str(tmp_path / f"{device}.json")]) == 0
    results = [json.load(open(tmp_path / f"{device}.json")) for device in ("cpu", "cuda")]
    assert results[0]["metrics"] == results[1]["metrics"]
    assert main([*common, "--dtype", "bfloat16", "--output", str(tmp_path / "bf16.json")]) == 0


def test_an_index_built_on_the_gpu_in_bfloat16_searches_there(tmp_path):
    write_sample_library(tmp_path / "videos", count=6, seed=3)
    assert main(["index", str(tmp_path / "videos"), "--index", str(tmp_path / "index"), "--dtype", "bfloat16",
                 "--num-workers", "0"]) == 0
    index = VideoIndex.open(tmp_path / "index")  # loads the model in the index's precision, on the GPU
    assert index.model.device.type == "cuda" and index.model.dtype == torch.bfloat16
    result = index.search("a red circle moves left", k=6, top_k_rerank=3)
    assert [hit.reranked for hit in result.hits] == [True] * 3 + [False] * 3
