"""Every combination of the parts — stage 1's similarity head x stage 2's fine module — end to end: trained (both
stages, the second from the token cache), evaluated, re-ranked, indexed and searched, saved and reloaded through
`AutoModel` with `trust_remote_code=True`."""

import itertools

import pytest
import torch
from transformers import AutoModel

from crosstvr import CrossTVRModel
from crosstvr.configuration_crosstvr import FINE_MODULES, SIMILARITY_HEADS
from crosstvr.data import load_retrieval_dataset, write_fixture
from crosstvr.default_model import build_tiny_config, build_tiny_processor
from crosstvr.evaluation import evaluate_retrieval
from crosstvr.indexing import VideoIndex
from crosstvr.training import TrainingArguments, train


@pytest.fixture(scope="module")
def msvd(tmp_path_factory):
    root = tmp_path_factory.mktemp("combinations")
    return root, write_fixture("msvd", root / "msvd")


@pytest.mark.parametrize("similarity_head, fine_module", list(itertools.product(SIMILARITY_HEADS, FINE_MODULES)))
def test_every_combination_trains_evaluates_indexes_and_reloads(msvd, tmp_path, similarity_head, fine_module):
    root, fixture = msvd
    processor = build_tiny_processor()
    torch.manual_seed(0)
    start = CrossTVRModel(build_tiny_config(processor, similarity_head=similarity_head, fine_module=fine_module))
    start.save_pretrained(tmp_path / "start")
    processor.save_pretrained(tmp_path / "start")
    common = {"annotations_dir": fixture.annotations_dir, "videos_dir": fixture.videos_dir, "dataset": "msvd",
              "dataset_cache_dir": str(root / "rows"), "batch_size": 4, "per_device_batch_size": 4, "max_steps": 2,
              "num_workers": 0, "save_steps": 100, "do_eval": False}
    stage1 = train(TrainingArguments(output_dir=str(tmp_path / "stage1"), model_name_or_path=str(tmp_path / "start"),
                                     stage=1, **common))
    final = train(TrainingArguments(output_dir=str(tmp_path / "stage2"), model_name_or_path=stage1, stage=2,
                                    hard_negatives="stage1_top_k", hard_negatives_top_k=2, **common))
    model = AutoModel.from_pretrained(final, trust_remote_code=True).eval()
    assert (model.config.similarity_head, model.config.fine_module) == (similarity_head, fine_module)
    head = "fine_module.matching_head.weight"
    assert not torch.equal(model.state_dict()[head], start.state_dict()[head])  # stage 2 trained

    rows = load_retrieval_dataset("msvd", fixture.annotations_dir, fixture.videos_dir, splits=["test"],
                                  cache_dir=root / "rows")["test"]
    evaluation = evaluate_retrieval(model, processor, rows, top_k=2, progress=False)
    assert set(evaluation.metrics) >= {"stage1", "two_stage"}

    index = VideoIndex.build(fixture.videos_dir, tmp_path / "index", model, processor, num_workers=0, progress=False)
    result = index.search(rows[0]["caption"], k=3, top_k_rerank=2)
    assert [hit.reranked for hit in result.hits] == [True, True, False]
    # Re-ranking reorders the stage-1 top 2 only: the rest keeps stage 1's order.
    assert {hit.path for hit in result.hits[:2]} == {hit.path for hit in result.stage1_hits[:2]}
    assert result.hits[2].path == result.stage1_hits[2].path
