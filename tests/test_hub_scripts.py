import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import HfApi, ModelCard
from transformers import (
    AutoModel,
    Blip2Config,
    Blip2ForImageTextRetrieval,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
)

from crosstvr import CrossTVRModel, CrossTVRProcessor
from crosstvr.synthetic import MovingShape, render, write_video


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "hub_scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


convert_checkpoint = load_script("convert_checkpoint")
make_model_card = load_script("make_model_card")
push_to_hub = load_script("push_to_hub")


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tester):
    """A tiny CLIP checkpoint and a tiny BLIP-2 image-text matching checkpoint, saved with their preprocessors."""
    root = tmp_path_factory.mktemp("sources")
    clip_tokenizer, bert_tokenizer = tester.clip_tokenizer, tester.bert_tokenizer
    torch.manual_seed(0)
    clip = CLIPModel(
        CLIPConfig(
            text_config={
                "vocab_size": len(clip_tokenizer),
                "hidden_size": 32,
                "intermediate_size": 37,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "max_position_embeddings": 16,
                "bos_token_id": clip_tokenizer.bos_token_id,
                "eos_token_id": clip_tokenizer.eos_token_id,
                "pad_token_id": clip_tokenizer.pad_token_id,
            },
            vision_config={
                "hidden_size": 32,
                "intermediate_size": 37,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "image_size": 32,
                "patch_size": 8,
            },
            projection_dim=32,
        )
    ).eval()
    clip.save_pretrained(root / "clip")
    clip_tokenizer.save_pretrained(root / "clip")
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        root / "clip"
    )
    blip2 = Blip2ForImageTextRetrieval(
        Blip2Config(
            vision_config={
                "hidden_size": 24,
                "intermediate_size": 48,
                "num_hidden_layers": 1,
                "num_attention_heads": 4,
                "image_size": 32,
                "patch_size": 16,
            },
            qformer_config={
                "vocab_size": len(bert_tokenizer),
                "hidden_size": 32,
                "intermediate_size": 37,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "max_position_embeddings": 16,
                "use_qformer_text_input": True,
            },
            text_config={"model_type": "opt", "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "ffn_dim": 32},
            num_query_tokens=3,
            image_text_hidden_size=16,
        )
    ).eval()
    torch.nn.init.normal_(blip2.query_tokens)
    blip2.save_pretrained(root / "blip2")
    bert_tokenizer.save_pretrained(root / "blip2")
    bert_tokenizer.save_pretrained(root / "bert")
    return {"root": root, "clip": clip, "blip2": blip2}


def run_conversion(sources, output, *extra) -> dict:
    argv = ["--clip", str(sources["root"] / "clip"), "--output", str(output), "--num-frames", "4",
            "--temporal-layers", "2", "--temporal-positions", "32", "--max-text-length", "8", *extra]
    assert convert_checkpoint.main(argv) == 0
    with open(output / "conversion_report.json") as file:
        return json.load(file)


def test_conversion_keeps_clip_embeddings_and_blip2_weights(sources, tmp_path, tester):
    output = tmp_path / "large"
    args = ["--blip2", str(sources["root"] / "blip2"), "--stage2-tower", "blip2", "--temporal-aggregator", "mean"]
    report = run_conversion(sources, output, *args)
    model = CrossTVRModel.from_pretrained(output).eval()
    assert set(report["weights"]) == set(model.state_dict())
    new = {tuple(name.split(".")[:2]) for name, origin in report["weights"].items() if origin.startswith("new")}
    # Everything else comes from CLIP or BLIP-2.
    assert new == {("fine_module", "token_selector"), ("fine_module", "frame_position_embeddings")}

    positions = model.fine_module.frame_position_embeddings
    assert not positions.any() and report["weights"]["fine_module.frame_position_embeddings"] == "new: initialised (zeros)"
    drawn = run_conversion(sources, tmp_path / "drawn", *args, "--frame-position-init-std", "1.0")
    assert drawn["weights"]["fine_module.frame_position_embeddings"] == "new: initialised (random)"
    positions = CrossTVRModel.from_pretrained(tmp_path / "drawn").fine_module.frame_position_embeddings
    assert positions.shape == (4, model.config.qformer_config.hidden_size) and 0.6 < positions.std().item() < 1.4

    # Stage 1 is CLIP: texts, single frames, and the mean of normalised frames.
    clip = sources["clip"]
    inputs = tester.get_inputs(batch_size=2)
    with torch.no_grad():
        expected_text = F.normalize(clip.get_text_features(input_ids=inputs["input_ids"]).pooler_output, dim=-1)
        torch.testing.assert_close(model.get_text_features(inputs["input_ids"]), expected_text)
        frames = inputs["pixel_values"][1]  # (4, 3, 32, 32)
        frame_features = F.normalize(clip.get_image_features(pixel_values=frames).pooler_output, dim=-1)
        torch.testing.assert_close(model.get_video_features(frames[:1][None]), frame_features[:1])
        mask = torch.tensor([[1, 1, 1, 0]])
        torch.testing.assert_close(
            model.get_video_features(frames[None], mask), F.normalize(frame_features[:3].mean(0, keepdim=True), dim=-1)
        )

    # Stage 2 is BLIP-2's: Q-Former, its text embeddings, query tokens, ITM head and EVA tower.
    blip2_state, state = sources["blip2"].state_dict(), model.state_dict()
    for name, tensor in state.items():
        top, _, rest = name.removeprefix("fine_module.").partition(".")
        counterpart = {
            "qformer": f"qformer.{rest}",
            "qformer_embeddings": f"embeddings.{rest}",
            "matching_head": f"itm_head.{rest}",
            "fine_vision_model": f"vision_model.{rest}",
            "query_tokens": "query_tokens",
        }.get(top)
        if counterpart is not None:
            torch.testing.assert_close(tensor, blip2_state[counterpart], msg=name)

    processor = CrossTVRProcessor.from_pretrained(output)
    assert AutoModel.from_pretrained(output, trust_remote_code=True).config.fine_vision_config.hidden_size == 24
    assert processor(text="a red circle")["qformer_input_ids"].shape == (1, 8)


def test_t2v2t_conversion_takes_the_qformer_and_matching_head_from_blip2(sources, tmp_path, tester):
    output = tmp_path / "t2v2t"
    args = ["--blip2", str(sources["root"] / "blip2"), "--stage2-tower", "blip2", "--temporal-aggregator", "mean",
            "--fine-module", "t2v2t", "--similarity-head", "text_conditioned"]
    report = run_conversion(sources, output, *args, "--naive-t2v2t")
    model = AutoModel.from_pretrained(output, trust_remote_code=True).eval()
    assert (model.config.fine_module, model.config.t2v2t_bypass) == ("t2v2t", False)
    assert model.config.similarity_head == "text_conditioned"
    new = {name for name, origin in report["weights"].items() if origin.startswith("new")}
    assert {name.split(".")[1] for name in new} == {"text_to_video_fusion"}
    assert report["weights"]["fine_module.text_to_video_fusion.frame_embeddings"] == "new: initialised (zeros)"
    blip2_state = sources["blip2"].state_dict()
    torch.testing.assert_close(model.fine_module.matching_head.weight, blip2_state["itm_head.weight"])
    torch.testing.assert_close(
        model.fine_module.qformer.encoder.layer[1].output_query.dense.weight,
        blip2_state["qformer.encoder.layer.1.output_query.dense.weight"],
    )
    inputs = tester.get_inputs(batch_size=2)
    with torch.no_grad():
        tokens = model.get_vision_tokens(inputs["pixel_values"])
        scores = model.get_fine_scores(inputs["qformer_input_ids"], None, tokens, inputs["video_mask"])
    assert tokens.shape[-1] == 24 and torch.isfinite(scores).all()
    assert make_model_card.main([str(output), "--repo-id", "someone/t2v2t"]) == 0
    card = ModelCard.load(output / "README.md").text
    assert "T2V2T fusion: each frame's tokens attend to the caption (naive T2V2T, no bypass)" in card
    assert "| Stage-2 fine module | T2V2T fusion (naive, no bypass), BLIP-2 Q-Former of 2 layers" in card
    assert "TS2-Net's text-conditioned softmax pooling of its frames' cosine similarities" in card
    with pytest.raises(SystemExit, match="give --fine-module t2v2t"):
        run_conversion(sources, tmp_path / "refused", "--naive-t2v2t")


def test_cross_attention_to_a_narrower_tower_is_reinitialised_and_reported(sources, tmp_path):
    report = run_conversion(sources, tmp_path / "base", "--blip2", str(sources["root"] / "blip2"))
    reinitialised = {name for name, origin in report["weights"].items() if "re-initialised" in origin}
    assert reinitialised == {
        f"fine_module.qformer.encoder.layer.0.crossattention.attention.{kind}.weight" for kind in ("key", "value")
    }
    assert "24-wide tower but the stage-2 tower is 32 wide" in report["weights"][
        "fine_module.qformer.encoder.layer.0.crossattention.attention.key.weight"
    ]
    model = CrossTVRModel.from_pretrained(tmp_path / "base")
    torch.testing.assert_close(
        model.fine_module.qformer.encoder.layer[0].crossattention.attention.query.weight,
        sources["blip2"].qformer.encoder.layer[0].crossattention.attention.query.weight,
    )


def test_conversion_without_blip2_initialises_the_temporal_transformer_from_clip_text(sources, tmp_path):
    output = tmp_path / "clip-only"
    args = ["--qformer-tokenizer", str(sources["root"] / "bert"), "--temporal-aggregator", "transformer",
            "--temporal-layers", "1", "--temporal-positions", "20"]  # the last options win
    report = run_conversion(sources, output, *args)
    model = CrossTVRModel.from_pretrained(output)
    clip = sources["clip"]
    temporal = model.temporal_aggregator.temporal_transformer
    torch.testing.assert_close(temporal.encoder.layers[0].mlp.fc1.weight, clip.text_model.encoder.layers[0].mlp.fc1.weight)
    torch.testing.assert_close(
        temporal.position_embeddings.weight[:16], clip.text_model.embeddings.position_embedding.weight
    )
    assert report["weights"]["temporal_aggregator.temporal_transformer.position_embeddings.weight"].endswith(
        "[:16] (rest new)"
    )
    assert all(
        origin.startswith("new")
        for name, origin in report["weights"].items()
        if name.startswith(("fine_module.qformer.", "fine_module.query"))
    )


def test_conversion_errors_name_the_conflict(sources, tmp_path, capsys):
    argv = ["--clip", str(sources["root"] / "clip"), "--output", str(tmp_path / "x")]
    bert = ["--qformer-tokenizer", str(sources["root"] / "bert")]
    cases = [
        ([], "give --qformer-tokenizer"),
        ([*bert], "--max-text-length 32 exceeds the 16 positions"),
        ([*bert, "--max-text-length", "8"], "--temporal-layers 4 exceeds the 2 layers"),
        ([*bert, "--max-text-length", "8", "--stage2-tower", "blip2"], "give --blip2"),
    ]
    for extra, message in cases:
        assert convert_checkpoint.main([*argv, *extra]) == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def evaluation_results(tmp_path) -> str:
    from crosstvr.evaluation import RetrievalEvaluation
    from crosstvr.evaluation.report import write_results

    metrics = {f"{p}_{m}": v for p in ("t2v", "v2t") for m, v in (("R1", 41.0), ("R5", 70.5), ("R10", 80.25),
                                                                  ("MdR", 2.0), ("MnR", 12.5))}
    evaluation = RetrievalEvaluation(1000, 1000, 15, 1.0, None, {"stage1": metrics, "two_stage": {**metrics, "t2v_R1": 49.6}})
    path = tmp_path / "evaluation_msrvtt_test_1k.json"
    write_results(path, evaluation, model="m", dataset="msrvtt", split="test_1k")
    return str(path)


def test_model_card_carries_metadata_and_metrics(sources, tmp_path):

    folder = tmp_path / "model"
    run_conversion(sources, folder, "--blip2", str(sources["root"] / "blip2"), "--stage2-tower", "blip2")
    results = evaluation_results(tmp_path)
    assert make_model_card.main([str(folder), "--repo-id", "someone/crosstvr-large-test", "--results", results]) == 0
    card = ModelCard.load(folder / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["license"] == "mit"
    assert "pipeline_tag" not in data and {"crosstvr", "text-video-retrieval"} <= set(data["tags"])
    assert data["datasets"] == ["friedrichor/MSR-VTT"] and data["base_model"] == [str(sources["root"] / "clip"), str(sources["root"] / "blip2")]
    values = {(r.task_type, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert len(card.data.eval_results) == 10
    assert values[("text-to-video-retrieval", "recall_at_1")] == 49.6  # the two-stage row
    assert values[("video-to-text-retrieval", "mean_rank")] == 12.5
    text = card.text
    assert "CrossTVR Large" in text and "BLIP-2 EVA ViT-g" in text and "| CrossTVR (K = 15) | 49.6 |" in text
    assert "| Stage-2 fine module | CrossTVR decoupled attention, BLIP-2 Q-Former of 2 layers" in text
    assert 'AutoModel.from_pretrained("someone/crosstvr-large-test", trust_remote_code=True)' in text
    assert "arXiv:2307.09972" in text
    own = ["--dataset-id", "msrvtt=someone/msr-vtt-frames", "--output", str(tmp_path / "card.md")]
    assert make_model_card.main([str(folder), "--repo-id", "someone/x", "--results", results, *own]) == 0
    assert ModelCard.load(tmp_path / "card.md").data.to_dict()["datasets"] == ["someone/msr-vtt-frames"]
    with pytest.raises(SystemExit):
        make_model_card.main([str(folder), "--repo-id", "someone/x", "--dataset-id", "msrvtt"])


class FakeHubApi(HfApi):
    """`HfApi` with its network calls replaced: records them and keeps the committed files in a folder, so that
    `upload_folder`'s own file selection runs as it does against the Hub."""

    def __init__(self, remote):
        super().__init__(token="hf_fake")
        self.remote, self.calls = remote, []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, branch, **kwargs):
        self.calls.append(("create_branch", repo_id, branch))

    def _validate_yaml(self, content, **kwargs):
        ModelCard(content)  # the Hub validates the card's metadata; here it must at least parse

    def create_commit(self, repo_id, operations, commit_message, revision=None, **kwargs):
        self.calls.append(("create_commit", repo_id, commit_message, revision))
        for operation in operations:
            target = self.remote / operation.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(operation.path_or_fileobj, target)
        return type("Commit", (), {"commit_url": f"https://hub.invalid/{repo_id}/commit/1"})()


@pytest.fixture(autouse=True)
def single_commit_uploads(monkeypatch):
    """Without hf_xet, `upload_folder` makes one `create_commit`, which `FakeHubApi` records."""
    monkeypatch.setattr("huggingface_hub.hf_api.is_xet_available", lambda: False)


def test_push_uploads_exactly_the_files_that_load(sources, tmp_path):
    folder = tmp_path / "model"
    run_conversion(sources, folder, "--blip2", str(sources["root"] / "blip2"))
    make_model_card.main([str(folder), "--repo-id", "someone/crosstvr"])
    expected = sorted(
        os.path.relpath(os.path.join(root, name), folder) for root, _, names in os.walk(folder) for name in names
    )
    expected.remove("conversion_report.json")
    # Training leftovers beside the checkpoint must stay home.
    (folder / "logs.jsonl").write_text("{}\n")
    (folder / "optimizer.bin").write_bytes(b"pickle")
    (folder / "checkpoints" / "step-1").mkdir(parents=True)
    (folder / "checkpoints" / "step-1" / "model.safetensors").write_bytes(b"x")
    (folder / "token_cache").mkdir()
    (folder / "token_cache" / "shard-00000.safetensors").write_bytes(b"x")
    api = FakeHubApi(tmp_path / "remote")
    push_to_hub.push(str(folder), "someone/crosstvr", private=True, revision="v1", commit_message="first", api=api)
    assert [call[0] for call in api.calls] == ["create_repo", "create_branch", "create_commit"]
    assert api.calls[0][2]["private"] is True and api.calls[2][2:] == ("first", "v1")
    uploaded = sorted(
        os.path.relpath(os.path.join(root, name), api.remote) for root, _, names in os.walk(api.remote) for name in names
    )
    assert uploaded == expected
    assert {"model.safetensors", "modeling_crosstvr.py", "qformer_tokenizer/tokenizer.json"} <= set(uploaded)
    push_to_hub.check_loads(str(api.remote))  # what was uploaded is a complete checkpoint


def test_push_refuses_a_folder_that_does_not_load(sources, tmp_path):
    folder = tmp_path / "model"
    run_conversion(sources, folder, "--qformer-tokenizer", str(sources["root"] / "bert"))
    (folder / "modeling_crosstvr.py").write_text("this is not python\n")
    api = FakeHubApi(tmp_path / "remote")
    with pytest.raises(push_to_hub.CheckpointLoadError, match="does not load with trust_remote_code=True"):
        push_to_hub.push(str(folder), "someone/crosstvr", api=api)
    os.remove(folder / "modeling_crosstvr.py")
    with pytest.raises(push_to_hub.CheckpointLoadError, match="modeling_crosstvr.py missing"):
        push_to_hub.push(str(folder), "someone/crosstvr", api=api)
    assert api.calls == []


def test_didemo_preset_sets_the_papers_frames_words_and_positions(sources, tmp_path, capsys):
    base = ["--clip", str(sources["root"] / "clip"), "--output", str(tmp_path / "x")]
    args = convert_checkpoint.parse_arguments([*base, "--preset", "didemo"])
    assert (args.num_frames, args.max_text_length, args.temporal_positions) == (64, 64, 256)
    args = convert_checkpoint.parse_arguments([*base, "--preset", "didemo", "--num-frames", "32"])  # explicit wins
    assert (args.num_frames, args.max_text_length) == (32, 64)
    args = convert_checkpoint.parse_arguments(base)
    assert (args.num_frames, args.max_text_length, args.temporal_positions) == (12, 32, 128)
    # DiDeMo's 64 words need a text tower with at least 64 positions (this tiny CLIP has 16).
    bert = ["--qformer-tokenizer", str(sources["root"] / "bert")]
    assert convert_checkpoint.main([*base, *bert, "--preset", "didemo"]) == 1
    assert "--max-text-length 64 exceeds the 16 positions" in capsys.readouterr().err


def test_cross_attention_can_keep_blip2_weights_behind_a_projection(sources, tmp_path, tester):
    report = run_conversion(sources, tmp_path / "base", "--blip2", str(sources["root"] / "blip2"),
                            "--cross-attention", "project")
    assert not any("re-initialised" in origin for origin in report["weights"].values())
    assert report["weights"]["fine_vision_projection.weight"].startswith("new: projection of the 32-wide tower")
    model = CrossTVRModel.from_pretrained(tmp_path / "base").eval()
    assert model.config.fine_vision_projection and model.config.fine_token_hidden_size == 24
    blip2_layer = sources["blip2"].qformer.encoder.layer[0].crossattention.attention
    cross_attention = model.fine_module.qformer.encoder.layer[0].crossattention.attention
    torch.testing.assert_close(cross_attention.key.weight, blip2_layer.key.weight)
    # The projection keeps a coordinate's variance: unit-variance tokens stay at unit variance.
    tokens = torch.randn(4096, 32)
    projected = tokens @ model.fine_vision_projection.weight.t()
    assert abs(projected.var().item() - 1) < 0.1
    inputs = tester.get_inputs()
    scores = model.get_fine_scores(inputs["qformer_input_ids"], inputs["qformer_attention_mask"],
                                   model.get_vision_tokens(inputs["pixel_values"]), inputs["video_mask"])
    assert scores.isfinite().all()


CARD_SCRIPT_PRELUDE = 'import sys\nsys.modules["crosstvr"] = None  # as on a machine with only the card\'s requirements\n'


def test_model_card_usage_runs_as_written_without_the_package(tester, tmp_path):

    folder = tmp_path / "model"
    tester.get_model().save_pretrained(folder)
    tester.get_processor().save_pretrained(folder)
    assert make_model_card.main([str(folder), "--repo-id", str(folder)]) == 0
    usage = re.search(r"## Usage\n.*?```python\n(.*?)```", ModelCard.load(folder / "README.md").text, re.S).group(1)
    work = tmp_path / "work"
    work.mkdir()
    for name, scene in zip(("a.mp4", "b.mp4", "c.mp4"), ("red", "blue", "green")):
        write_video(work / name, render(MovingShape("circle", scene, "left"), num_frames=8))
    result = subprocess.run(
        [sys.executable, "-c", CARD_SCRIPT_PRELUDE + usage], cwd=work, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"tensor\(\[\[[012], [012], [012]\]\]\)", result.stdout), result.stdout
    assert re.search(r"\[\{'video': '[abc].mp4', 'score': .*'reranked': True\}, \{", result.stdout), result.stdout


def test_remote_processor_names_its_requirements_where_pillow_is_missing(tester, tmp_path):
    folder = tmp_path / "model"
    tester.get_processor().save_pretrained(folder)
    hidden = tmp_path / "hidden" / "PIL"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('No module named PIL (hidden by the test)')\n")
    script = CARD_SCRIPT_PRELUDE + (
        "from transformers import AutoProcessor\n"
        f"AutoProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(hidden.parent)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "ImportError: CrossTVRProcessor needs Pillow" in result.stderr and "pip install pillow decord av" in result.stderr


def test_conversion_builds_on_the_meta_device_and_shares_the_sources_storage(sources, tmp_path):
    # No third full copy: the converted model's weights are the loaded checkpoints' tensors, except where one source
    # feeds two weights (CLIP's vision tower as the stage-2 tower too), which must not share storage and train together.
    argv = ["--clip", str(sources["root"] / "clip"), "--blip2", str(sources["root"] / "blip2"), "--output",
            str(tmp_path), "--num-frames", "4", "--temporal-layers", "2", "--temporal-positions", "32",
            "--max-text-length", "8"]
    args = convert_checkpoint.parse_arguments(argv)
    clip, _, _ = convert_checkpoint._load_clip(args.clip)
    blip2, qformer_tokenizer = convert_checkpoint._load_blip2(args.blip2)
    config = convert_checkpoint.build_config(clip, blip2, args, qformer_tokenizer)
    model, _ = convert_checkpoint.build_model(config, clip, blip2, args)
    pairs = {
        "text_model.embeddings.token_embedding.weight": clip.text_model.embeddings.token_embedding.weight,
        "vision_model.encoder.layers.0.mlp.fc1.weight": clip.vision_model.encoder.layers[0].mlp.fc1.weight,
        "fine_module.qformer.encoder.layer.0.attention.attention.query.weight":
            blip2.qformer.encoder.layer[0].attention.attention.query.weight,
    }
    for name, source in pairs.items():
        assert model.get_parameter(name).data_ptr() == source.data_ptr(), name
    twin = model.get_parameter("fine_vision_model.encoder.layers.0.mlp.fc1.weight")
    assert twin.data_ptr() != clip.vision_model.encoder.layers[0].mlp.fc1.weight.data_ptr()
    torch.testing.assert_close(twin, clip.vision_model.encoder.layers[0].mlp.fc1.weight)
    assert not any(tensor.is_meta for tensor in [*model.parameters(), *model.buffers()])


push_space = load_script("push_space")


def test_space_is_assembled_and_pushed_as_a_gradio_space(tmp_path):
    pytest.importorskip("gradio", reason='assembling the Space reads the Gradio version: pip install -e ".[app]"')
    from huggingface_hub import metadata_load

    folder = push_space.assemble(str(tmp_path / "space"))
    assert metadata_load(os.path.join(folder, "README.md"))["sdk"] == "gradio"
    with open(os.path.join(folder, "requirements.txt")) as file:
        requirements = file.read().split()
    assert any(r.startswith("gradio") for r in requirements) and any(r.startswith("transformers") for r in requirements)
    assert os.path.exists(os.path.join(folder, "crosstvr", "default_checkpoint", "model.safetensors"))
    assert not any("__pycache__" in root for root, _, _ in os.walk(folder))
    # The app imports the package copied beside it, not the installed one.
    check = "import app, crosstvr, os; assert os.path.dirname(crosstvr.__file__) == os.path.abspath('crosstvr')"
    subprocess.run([sys.executable, "-c", check], cwd=folder, check=True)
    with pytest.raises(FileExistsError, match="give a new folder"):
        push_space.assemble(folder)

    api = FakeHubApi(tmp_path / "remote")
    push_space.push("someone/crosstvr-search", private=True, api=api)
    assert api.calls[0][0] == "create_repo" and api.calls[0][2]["repo_type"] == "space"
    assert (tmp_path / "remote" / "app.py").exists() and (tmp_path / "remote" / "crosstvr" / "serve.py").exists()


def test_model_card_links_the_space(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(os.path.join(ROOT, "crosstvr", "default_checkpoint"), folder)
    output = tmp_path / "README.md"
    make_model_card.main([str(folder), "--repo-id", "someone/x", "--space-id", "someone/search", "--output", str(output)])
    assert "https://huggingface.co/spaces/someone/search" in output.read_text()
    make_model_card.main([str(folder), "--repo-id", "someone/x", "--output", str(output)])
    assert "huggingface.co/spaces" not in output.read_text() and "crosstvr serve INDEX" in output.read_text()


def test_cret_conversion_initialises_the_centres_and_their_attention(sources, tmp_path):
    report = run_conversion(sources, tmp_path / "cret", "--blip2", str(sources["root"] / "blip2"), "--stage2-tower",
                            "blip2", "--temporal-aggregator", "mean", "--similarity-head", "cret")
    new = {name for name, origin in report["weights"].items() if origin.startswith("new")}
    assert {"similarity_head.centers", "similarity_head.attention.in_proj_weight"} <= new
    model = AutoModel.from_pretrained(tmp_path / "cret", trust_remote_code=True)
    assert model.config.similarity_head == "cret" and model.similarity_head.centers.abs().sum() > 0
