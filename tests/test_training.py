import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from crosstvr import CrossTVRModel, CrossTVRProcessor
from crosstvr.data import load_retrieval_dataset, write_fixture
from crosstvr.data.transforms import VideoTextCollator
from crosstvr.default_model import build_tiny_config, build_tiny_processor
from crosstvr.evaluation import evaluate_retrieval
from crosstvr.token_cache import TokenCache, TokenCacheMismatchError, build_token_cache
from crosstvr.train import parse_arguments
from crosstvr.training import CachedVideoTextCollator, TrainingArguments, train


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAD = "fine_module.matching_head.weight"  # a stage-2 weight


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """An MSR-VTT fixture and two tiny starting checkpoints (TS2-Net and seqTransf stage 1)."""
    root = tmp_path_factory.mktemp("training")
    fixture = write_fixture("msrvtt", root / "msrvtt")
    processor = build_tiny_processor()
    checkpoints = {}
    for name, options in {
        "token_shift_select": {},
        "transformer": {"temporal_aggregator": "transformer"},
        "t2v2t": {"fine_module": "t2v2t"},
    }.items():
        torch.manual_seed(0)
        model = CrossTVRModel(build_tiny_config(processor, **options))
        checkpoints[name] = str(root / f"start-{name}")
        model.save_pretrained(checkpoints[name])
        processor.save_pretrained(checkpoints[name])
    return {"root": root, "fixture": fixture, "checkpoints": checkpoints, "cache": str(root / "rows")}


def arguments(workspace, output_dir, **overrides) -> TrainingArguments:
    fixture = workspace["fixture"]
    kwargs = {
        "annotations_dir": fixture.annotations_dir,
        "videos_dir": fixture.videos_dir,
        "output_dir": str(output_dir),
        "model_name_or_path": workspace["checkpoints"]["token_shift_select"],
        "dataset_cache_dir": workspace["cache"],
        "batch_size": 8,
        "per_device_batch_size": 4,
        "max_steps": 6,
        "learning_rate": 1e-3,
        "pretrained_lr_scale": 1.0,
        "num_workers": 0,
        "logging_steps": 1,
        "save_steps": 100,
        "do_eval": False,
    }
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def fixed_batches(workspace, stage, model, processor, cache=None):
    """Three fixed batches of the training split, as the trainer builds them (centre frames)."""
    fixture = workspace["fixture"]
    rows = load_retrieval_dataset(
        "msrvtt", fixture.annotations_dir, fixture.videos_dir, splits=["train_9k"], cache_dir=workspace["cache"]
    )["train_9k"].with_format(None)
    picks = [[0, 25, 47, 63, 88, 101, 140, 170], [5, 30, 55, 80, 105, 130, 155, 179], [10, 33, 66, 99, 111, 122, 133, 144]]
    collator = CachedVideoTextCollator(processor, cache) if stage == 2 else VideoTextCollator(processor)
    return [collator([rows[i] for i in pick]) for pick in picks]


def mean_loss(model, batches, stage) -> float:
    model.eval()
    losses = []
    with torch.no_grad():
        for batch in batches:
            inputs = {k: v for k, v in batch.items() if k != "video_index"}
            if stage == 1:
                inputs = {k: v for k, v in inputs.items() if not k.startswith("qformer")}
            outputs = model(**inputs, video_ids=batch["video_index"], generator=torch.Generator().manual_seed(0))
            losses.append((outputs.loss_matching if stage == 2 else outputs.loss_contrastive).item())
    return sum(losses) / len(losses)


def test_stage_one_lowers_the_contrastive_loss(workspace, tmp_path):
    start = CrossTVRModel.from_pretrained(workspace["checkpoints"]["token_shift_select"])
    processor = build_tiny_processor()
    batches = fixed_batches(workspace, 1, start, processor)
    final = train(arguments(workspace, tmp_path / "run", max_steps=12))
    trained = CrossTVRModel.from_pretrained(final)
    assert mean_loss(trained, batches, 1) < mean_loss(start, batches, 1) - 0.05
    logs = [json.loads(line) for line in open(tmp_path / "run" / "logs.jsonl")]
    assert [record["step"] for record in logs if "train/loss" in record] == list(range(1, 13))
    assert {"configuration_crosstvr.py", "modeling_crosstvr.py", "model.safetensors"} <= set(os.listdir(final))
    # Only stage 1 moved.
    start_state, trained_state = start.state_dict(), trained.state_dict()
    assert torch.equal(start_state[HEAD], trained_state[HEAD])
    assert not torch.equal(start_state["text_projection.weight"], trained_state["text_projection.weight"])


@pytest.mark.parametrize("fine_module", ["crosstvr", "t2v2t"])
def test_stage_two_from_the_token_cache_lowers_the_matching_loss(workspace, tmp_path, fine_module):
    checkpoint = workspace["checkpoints"]["t2v2t" if fine_module == "t2v2t" else "token_shift_select"]
    start = CrossTVRModel.from_pretrained(checkpoint)
    assert start.config.fine_module == fine_module
    processor = build_tiny_processor()
    final = train(
        arguments(workspace, tmp_path / "run", model_name_or_path=checkpoint, stage=2, max_steps=36, learning_rate=3e-3)
    )
    cache = TokenCache(tmp_path / "run" / "token_cache").check(start, processor)
    assert len(cache) == 9  # the train_9k videos, each encoded once
    batches = fixed_batches(workspace, 2, start, processor, cache)
    trained = CrossTVRModel.from_pretrained(final)
    # 0.02 below the start is below the 0.637 of the best constant guess (a third of the pairs match): it has to
    # tell pairs apart.
    assert mean_loss(trained, batches, 2) < mean_loss(start, batches, 2) - 0.02
    start_state, trained_state = start.state_dict(), trained.state_dict()
    assert torch.equal(start_state["text_projection.weight"], trained_state["text_projection.weight"])
    assert torch.equal(
        start_state["fine_vision_model.embeddings.patch_embedding.weight"],
        trained_state["fine_vision_model.embeddings.patch_embedding.weight"],
    )
    assert not torch.equal(start_state[HEAD], trained_state[HEAD])


def cached_training_rows(workspace, tmp_path):
    """The starting model and processor, the fixture's training rows and their token cache."""
    model = CrossTVRModel.from_pretrained(workspace["checkpoints"]["token_shift_select"]).eval()
    processor = build_tiny_processor()
    fixture = workspace["fixture"]
    rows = load_retrieval_dataset(
        "msrvtt", fixture.annotations_dir, fixture.videos_dir, splits=["train_9k"], cache_dir=workspace["cache"]
    )["train_9k"].with_format(None)
    cache = build_token_cache(model, processor, list(dict.fromkeys(rows["video_path"])), tmp_path / "cache")
    return model, processor, rows, cache


def test_token_cache_gives_the_same_loss_as_pixels(workspace, tmp_path):
    model, processor, rows, cache = cached_training_rows(workspace, tmp_path)
    picked = [rows[i] for i in (0, 21, 42, 63)]
    from_pixels = VideoTextCollator(processor)(picked)
    from_cache = CachedVideoTextCollator(processor, cache)(picked)
    torch.testing.assert_close(from_cache["video_mask"], from_pixels["video_mask"])
    with torch.no_grad():
        pixel_loss = model(
            **{k: v for k, v in from_pixels.items() if k != "video_index"},
            video_ids=from_pixels["video_index"],
            generator=torch.Generator().manual_seed(0),
        )
        cache_loss = model(
            **{k: v for k, v in from_cache.items() if k != "video_index"},
            video_ids=from_cache["video_index"],
            generator=torch.Generator().manual_seed(0),
        )
    torch.testing.assert_close(cache_loss.loss_contrastive, pixel_loss.loss_contrastive, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache_loss.loss_matching, pixel_loss.loss_matching, atol=2e-3, rtol=2e-3)


def test_token_cache_build_resumes_and_refuses_other_models(workspace, tmp_path, monkeypatch):
    model = CrossTVRModel.from_pretrained(workspace["checkpoints"]["token_shift_select"]).eval()
    processor = build_tiny_processor()
    videos = sorted(os.path.join(workspace["fixture"].videos_dir, name) for name in os.listdir(workspace["fixture"].videos_dir))
    reference = build_token_cache(model, processor, videos, tmp_path / "reference", shard_size=4)

    # Interrupt the build after the first shard: decoding the fifth video fails.
    from crosstvr import video_store

    original = video_store._DecodedVideos.__getitem__

    def fail_on_fifth(self, indices):
        if self.paths[indices[0]] == videos[4]:
            raise KeyboardInterrupt
        return original(self, indices)

    monkeypatch.setattr(video_store._DecodedVideos, "__getitem__", fail_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        build_token_cache(model, processor, videos, tmp_path / "resumed", shard_size=4, batch_size=4)
    assert sorted(os.listdir(tmp_path / "resumed")) == ["plan.json", "shard-00000.safetensors"]
    with pytest.raises(FileNotFoundError, match="did not finish"):
        TokenCache(tmp_path / "resumed")
    monkeypatch.setattr(video_store._DecodedVideos, "__getitem__", original)
    first_shard_time = os.path.getmtime(tmp_path / "resumed" / "shard-00000.safetensors")
    resumed = build_token_cache(model, processor, videos, tmp_path / "resumed", shard_size=4, batch_size=4)
    assert os.path.getmtime(tmp_path / "resumed" / "shard-00000.safetensors") == first_shard_time  # kept
    for index in range(len(videos)):
        for key, value in reference[index].items():
            torch.testing.assert_close(resumed[index][key], value)

    other = CrossTVRModel.from_pretrained(workspace["checkpoints"]["token_shift_select"])
    with torch.no_grad():
        other.visual_projection.weight.add_(0.01)
    with pytest.raises(TokenCacheMismatchError, match="another model"):
        resumed.check(other, processor)
    processor_other = build_tiny_processor()
    processor_other.num_frames = 4
    with pytest.raises(TokenCacheMismatchError, match="frame sampling"):
        resumed.check(model, processor_other)
    with pytest.raises(TokenCacheMismatchError, match="other videos, another model"):
        build_token_cache(model, processor, videos[:3], tmp_path / "resumed")
    # The fine module is not part of the cached values: training it leaves the cache valid.
    with torch.no_grad():
        model.fine_module.matching_head.weight.add_(1.0)
    resumed.check(model, processor)


class _Interrupt(Exception):
    pass


def test_resume_continues_exactly(workspace, tmp_path):
    common = {"max_steps": 6, "save_steps": 3, "train_frame_sampling": "random"}
    uninterrupted = train(arguments(workspace, tmp_path / "full", **common))

    def crash_after_step_4(step, logs):
        if step == 4:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train(arguments(workspace, tmp_path / "resumed", **common), callbacks=[crash_after_step_4])
    assert os.listdir(tmp_path / "resumed" / "checkpoints") == ["step-0000003"]
    resumed = train(arguments(workspace, tmp_path / "resumed", resume_from_checkpoint="latest", **common))
    expected, actual = load_file(os.path.join(uninterrupted, "model.safetensors")), load_file(
        os.path.join(resumed, "model.safetensors")
    )
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-6, msg=name)
    losses = lambda run: [  # noqa: E731
        (r["step"], r["train/loss"]) for r in map(json.loads, open(tmp_path / run / "logs.jsonl")) if "train/loss" in r
    ]
    assert dict(losses("resumed"))[5] == pytest.approx(dict(losses("full"))[5], abs=1e-6)


def test_lora_adapters_save_load_and_merge(workspace, tmp_path):
    from peft import PeftModel

    args = arguments(workspace, tmp_path / "run", stage=2, max_steps=4, lora_targets=["qformer"])
    final = train(args)
    adapter = tmp_path / "run" / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(adapter))
    base = CrossTVRModel.from_pretrained(workspace["checkpoints"]["token_shift_select"]).eval()
    with_adapter = PeftModel.from_pretrained(base, adapter).eval()
    merged = CrossTVRModel.from_pretrained(final).eval()
    processor = build_tiny_processor()
    cache = TokenCache(tmp_path / "run" / "token_cache")
    batch = fixed_batches(workspace, 2, base, processor, cache)[0]
    fine = lambda model: model.get_fine_scores(  # noqa: E731
        batch["qformer_input_ids"], batch["qformer_attention_mask"], batch["vision_tokens"], batch["video_mask"]
    )
    with torch.no_grad():
        torch.testing.assert_close(fine(merged), fine(with_adapter), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(fine(merged), fine(CrossTVRModel.from_pretrained(args.model_name_or_path).eval()))


def test_config_file_with_command_line_overrides(workspace, tmp_path):
    config = tmp_path / "config.yaml"
    fixture = workspace["fixture"]
    config.write_text(
        f"annotations_dir: {fixture.annotations_dir}\nvideos_dir: {fixture.videos_dir}\nstage: 2\n"
        "learning_rate: 0.0005\nlora_targets: [qformer]\n"
    )
    args = parse_arguments(["--config", str(config), "--learning_rate", "0.001"])
    assert (args.stage, args.learning_rate, args.lora_targets) == (2, 0.001, ["qformer"])
    assert args.token_cache_dir == os.path.join("outputs/crosstvr", "token_cache")
    config.write_text("annotations_dir: a\nvideos_dir: b\nlearning_rte: 1\n")
    with pytest.raises(SystemExit, match="learning_rte"):
        parse_arguments(["--config", str(config)])
    with pytest.raises(ValueError, match="not a multiple"):
        train(arguments(workspace, tmp_path / "bad", batch_size=6, per_device_batch_size=4))


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("stage", [1, 2])
def test_every_split_of_the_global_batch_computes_the_gradients_of_one(tmp_path, stage):
    # One process holding the batch of 8 is the reference; the same step split over 2 accumulated micro-batches, over
    # 2 processes, and over 2 processes x 2 micro-batches (gradient caching in stage 1) must give its gradients.
    script = os.path.join(ROOT, "tests", "scripts", "distributed_losses.py")

    def single(name: str, micro_batches: int) -> dict:
        result = subprocess.run([sys.executable, script, str(tmp_path / name), str(stage), str(micro_batches)],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        return load_file(tmp_path / name)

    def double(name: str, micro_batches: int) -> dict:
        result = torchrun(script, str(tmp_path / name), str(stage), str(micro_batches))
        assert result.returncode == 0, result.stderr[-3000:]
        return load_file(tmp_path / name)

    reference = single("one.safetensors", 1)
    grads = [name for name in reference if name.startswith("grad/")]
    trained = ("text_model", "logit_scale") if stage == 1 else ("qformer", "matching_head")
    assert all(any(module in name for name in grads) for module in trained), grads
    for split in (single("accumulated.safetensors", 2), double("two.safetensors", 1), double("two-x2.safetensors", 2)):
        assert set(split) == set(reference)
        torch.testing.assert_close(split["loss"], reference["loss"])
        for name in grads:
            torch.testing.assert_close(split[name], reference[name], atol=1e-5, rtol=1e-4, msg=name)


def test_two_process_training_matches_one_process(workspace, tmp_path):
    options = {
        "--annotations_dir": workspace["fixture"].annotations_dir,
        "--videos_dir": workspace["fixture"].videos_dir,
        "--model_name_or_path": workspace["checkpoints"]["transformer"],  # no stochastic token selection
        "--dataset_cache_dir": workspace["cache"],
        "--batch_size": "8",
        "--max_steps": "3",
        "--learning_rate": "0.001",
        "--pretrained_lr_scale": "1",
        "--num_workers": "0",
        "--do_eval": "false",
        "--train_frame_sampling": "center",
    }
    flat = [item for pair in options.items() for item in pair]
    one = train(parse_arguments([*flat, "--per_device_batch_size", "8", "--output_dir", str(tmp_path / "one")]))
    # The same global batch of 8 as 4 accumulated micro-batches of 2 in one process.
    accumulated = train(parse_arguments([*flat, "--per_device_batch_size", "2", "--output_dir", str(tmp_path / "acc")]))
    result = torchrun("-m", "crosstvr.train", *flat, "--per_device_batch_size", "4", "--output_dir", str(tmp_path / "two"))
    assert result.returncode == 0, result.stderr[-3000:]
    expected = load_file(os.path.join(one, "model.safetensors"))
    for actual in (load_file(os.path.join(accumulated, "model.safetensors")),
                   load_file(tmp_path / "two" / "final" / "model.safetensors")):
        for name in expected:
            # A key bias shifts every attention logit of a query equally: its true gradient is 0 and what remains is
            # rounding noise, which Adam scales up to full-size steps of random sign.
            if name.endswith("k_proj.bias"):
                continue
            # Micro-batches sum in another order than one batch, and Adam divides by the root of the squared gradient,
            # so an element whose gradient is nearly zero can move by a few percent of the learning rate more or less
            # (3.7e-5 seen on a 2-core machine in 2026-12; the weights move by up to 3e-3 in these 3 steps at lr 1e-3).
            # A wrong sum or average over processes or micro-batches moves them by the order of the learning rate.
            torch.testing.assert_close(actual[name], expected[name], atol=1e-4, rtol=1e-4, msg=name)
    shutil.rmtree(tmp_path / "two" / "final")


def test_two_processes_train_stage_two(workspace, tmp_path):
    # Distributed data parallel needs a gradient for every trainable parameter: the Q-Former parameters that no output
    # depends on must be frozen, or the backward pass of the second step fails.
    options = [
        "--annotations_dir", workspace["fixture"].annotations_dir,
        "--videos_dir", workspace["fixture"].videos_dir,
        "--model_name_or_path", workspace["checkpoints"]["transformer"],
        "--dataset_cache_dir", workspace["cache"],
        "--stage", "2", "--batch_size", "4", "--per_device_batch_size", "2", "--max_steps", "2",
        "--num_workers", "0", "--do_eval", "true", "--output_dir", str(tmp_path / "two"),
    ]
    result = torchrun("-m", "crosstvr.train", *options)
    assert result.returncode == 0, result.stderr[-3000:]
    final = tmp_path / "two" / "final"
    assert (final / "model.safetensors").exists()
    # Both processes evaluated their half of the split; the gathered metrics are those of one process evaluating all.
    with open(tmp_path / "two" / "logs.jsonl", encoding="utf-8") as file:
        logged = [json.loads(line) for line in file if '"eval/' in line][-1]
    model, processor = CrossTVRModel.from_pretrained(final), CrossTVRProcessor.from_pretrained(final)
    split = load_retrieval_dataset("msrvtt", workspace["fixture"].annotations_dir, workspace["fixture"].videos_dir,
                                   splits=["test_1k"], cache_dir=workspace["cache"])["test_1k"]
    expected = evaluate_retrieval(model, processor, split, progress=False).metrics
    for name in ("stage1", "two_stage"):
        for metric, value in expected[name].items():
            assert logged[f"eval/{name}/{metric}"] == pytest.approx(value, abs=1e-6), (name, metric)


def test_sharded_parallelisms_are_refused_up_front():
    from accelerate.utils import DistributedType

    from crosstvr.training import check_distributed_type

    check_distributed_type(DistributedType.MULTI_GPU)
    for sharded in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        with pytest.raises(ValueError, match="accelerate launch --multi_gpu"):
            check_distributed_type(sharded)


def test_parameter_groups_follow_the_paper_and_its_stage_one(workspace, tmp_path):
    from crosstvr.training import apply_lora, parameter_groups, set_trainable_parameters

    def group_of(model, args):
        ids = {id(p): (g["lr"], g["weight_decay"]) for g in parameter_groups(model, args) for p in g["params"]}
        return {name: ids[id(p)] for name, p in model.named_parameters() if p.requires_grad}

    model = CrossTVRModel(build_tiny_config(build_tiny_processor()))
    stage_one = arguments(workspace, tmp_path, stage=1, learning_rate=1e-4, pretrained_lr_scale=1e-3)
    assert stage_one.weight_decay == 0.2 and arguments(workspace, tmp_path, stage=2).weight_decay == 0.0
    set_trainable_parameters(model, 1)
    groups = group_of(model, stage_one)
    # The temperature is a CLIP weight (CLIP4Clip / TS2-Net): the scaled learning rate, no decay.
    assert groups["logit_scale"] == pytest.approx((1e-7, 0.0))
    assert groups["text_model.encoder.layers.0.self_attn.q_proj.weight"] == pytest.approx((1e-7, 0.2))
    assert groups["temporal_aggregator.token_selector.fc1.weight"] == pytest.approx((1e-4, 0.2))
    # LoRA adapters on the CLIP text tower are new weights: the full learning rate, no decay.
    lora = apply_lora(model, arguments(workspace, tmp_path, stage=1, lora_targets=["text"]))
    adapters = {name: group for name, group in group_of(lora, stage_one).items() if ".lora_" in name}
    assert adapters and all(group == pytest.approx((1e-4, 0.0)) for group in adapters.values())


def test_stage_one_top_k_negatives_are_neighbours_and_never_the_own_video(workspace, tmp_path):
    from crosstvr.training import stage_one_neighbours

    model, processor, rows, cache = cached_training_rows(workspace, tmp_path)
    neighbours = stage_one_neighbours(model, processor, rows, cache, top_k=3, chunk_size=7)  # chunks split the rows
    # By hand: the 3 most similar other videos of every caption.
    text = processor(text=list(rows["caption"]))
    similarity = model.get_text_features(text["input_ids"], text["attention_mask"]) @ cache.video_embeds().t()
    own = torch.tensor([cache.index[path] for path in rows["video_path"]])
    similarity[torch.arange(len(own)), own] = float("-inf")
    torch.testing.assert_close(neighbours, similarity.topk(3, dim=1).indices)

    picked = [{**rows[i], "negative_candidates": neighbours[i].tolist()} for i in (0, 21, 42, 63)]
    collator = CachedVideoTextCollator(processor, cache, seed=3, negatives_per_caption=2)
    batch = collator(picked)
    assert batch["negative_vision_tokens"].shape == (4, 2, *batch["vision_tokens"].shape[1:])
    assert batch["negative_video_mask"].shape == (4, 2, batch["video_mask"].shape[1])
    for row, row_tokens in zip(picked, batch["negative_vision_tokens"]):
        drawn = [video for tokens in row_tokens for video in row["negative_candidates"]
                 if torch.equal(cache[video]["vision_tokens"], tokens)]
        assert len(set(drawn)) == 2 and cache.index[row["video_path"]] not in drawn  # two different neighbours
    torch.testing.assert_close(collator(picked)["negative_vision_tokens"], batch["negative_vision_tokens"])  # seeded
    # The model scores the extra pairs as negatives beside the in-batch ones, and ranks each caption's video above them.
    inputs = {key: value for key, value in batch.items() if key != "video_index"}
    outputs = model(**inputs, video_ids=batch["video_index"], listwise_loss_weight=0.5)
    assert outputs.matching_labels.tolist() == [1] * 4 + [0] * 16
    torch.testing.assert_close(outputs.loss, outputs.loss_contrastive + outputs.loss_matching + 0.5 * outputs.loss_listwise)
    scores = outputs.matching_logits[:, 1] - outputs.matching_logits[:, 0]
    positive, negatives = scores[:4], scores[12:].reshape(4, 2)  # text i's own video, then its two negatives
    by_hand = -(positive - torch.logsumexp(torch.cat([positive[:, None], negatives], dim=1), dim=1)).mean()
    torch.testing.assert_close(outputs.loss_listwise, by_hand)
    with pytest.raises(ValueError, match="listwise_loss_weight needs"):
        arguments(workspace, tmp_path / "bad", stage=2, listwise_loss_weight=1.0)


@pytest.mark.parametrize("per_device_batch_size", [4, 8])  # accumulated micro-batches; one forward
def test_stage_two_trains_with_stage_one_top_k_negatives(workspace, tmp_path, per_device_batch_size):
    def first_loss(name: str, listwise_loss_weight: float) -> float:
        final = train(arguments(workspace, tmp_path / name, stage=2, max_steps=2, hard_negatives="stage1_top_k",
                                hard_negatives_top_k=3, negatives_per_caption=2, per_device_batch_size=per_device_batch_size,
                                listwise_loss_weight=listwise_loss_weight))
        assert os.path.exists(os.path.join(final, "model.safetensors"))
        with open(tmp_path / name / "logs.jsonl", encoding="utf-8") as file:
            return [record for record in map(json.loads, file) if record.get("step") == 1][0]["train/loss"]

    # Same seed, same draws: the listwise term is added to the matching loss of the first step.
    assert first_loss("listwise", 1.0) > first_loss("matching", 0.0)
    with pytest.raises(ValueError, match="hard_negatives"):
        arguments(workspace, tmp_path, hard_negatives="group")


def test_neighbour_batches_hold_each_row_once_in_blocks_of_stage_one_neighbours():
    from crosstvr.training import StageOneNeighbourSampler

    row_videos = [0, 0, 1, 1, 2, 2, 3, 3, 4, 5]  # two captions of videos 0-3, one of 4 and 5
    neighbours = torch.tensor([[1, 2, 3], [1, 2, 3], [0, 2, 3], [0, 2, 3], [3, 0, 1], [3, 0, 1], [2, 0, 1], [2, 0, 1],
                               [5, 0, 1], [4, 0, 1]])  # (rows, K): other videos, nearest first
    generator = torch.Generator()
    sampler = StageOneNeighbourSampler(row_videos, neighbours, block_size=3, generator=generator)
    generator.manual_seed(0)
    order = list(sampler)
    assert sorted(order) == list(range(len(row_videos))) and len(sampler) == len(row_videos)
    # Each block: an anchor, then rows of its nearest videos that still had rows, in that order.
    position, drawn = 0, set()
    while position < len(order):
        anchor = order[position]
        expected = [video for video in neighbours[anchor].tolist()
                    if any(row_videos[row] == video and row not in drawn for row in range(len(row_videos)))][:2]
        block = order[position : position + 1 + len(expected)]
        assert [row_videos[row] for row in block[1:]] == expected
        drawn.update(block)
        position += len(block)
    generator.manual_seed(0)
    assert list(sampler) == order  # seeded
    generator.manual_seed(1)
    assert list(sampler) != order


def test_stage_two_trains_on_neighbour_batches(workspace, tmp_path):
    final = train(arguments(workspace, tmp_path / "neighbours", stage=2, max_steps=2, neighbour_batches=4,
                            hard_negatives_top_k=3))
    assert os.path.exists(os.path.join(final, "model.safetensors"))
    for bad in ({"stage": 1, "neighbour_batches": 4}, {"stage": 2, "neighbour_batches": 5, "hard_negatives_top_k": 3},
                {"stage": 2, "neighbour_batches": 1}):
        with pytest.raises(ValueError, match="neighbour_batches"):
            arguments(workspace, tmp_path / "bad", **bad)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
@pytest.mark.parametrize("stage", [1, 2])
def test_bf16_mixed_precision_training(workspace, tmp_path, monkeypatch, stage, device):
    from accelerate.state import AcceleratorState

    if device == "cpu":
        monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    # accelerate keeps one process-wide state, which refuses another mixed precision than its first: start from none
    # and leave none behind for the tests that train in float32.
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        final = train(arguments(workspace, tmp_path / "run", stage=stage, max_steps=3, mixed_precision="bf16"))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    logs = [json.loads(line) for line in open(tmp_path / "run" / "logs.jsonl")]
    losses = torch.tensor([record["train/loss"] for record in logs if "train/loss" in record])
    assert len(losses) == 3 and torch.isfinite(losses).all()
    weights = load_file(os.path.join(final, "model.safetensors"))
    # The optimizer updates float32 master weights; autocast only lowers the precision of the computation.
    assert all(tensor.dtype == torch.float32 and torch.isfinite(tensor).all() for tensor in weights.values())
    start = load_file(os.path.join(workspace["checkpoints"]["token_shift_select"], "model.safetensors"))
    trained = ("text_model", "logit_scale") if stage == 1 else ("fine_module.qformer", "fine_module.matching_head")
    assert any(not torch.equal(weights[name], start[name]) for name in weights if name.startswith(trained))
