import importlib.util
import json
import os

import pytest
import torch
from transformers import Blip2ForImageTextRetrieval, TrainingArguments, VisionTextDualEncoderModel

from crosstvr import CrossTVRModel
from crosstvr.default_model import (
    build_tiny_blip2,
    build_tiny_clip,
    build_tiny_eva_dual_encoder,
    build_tiny_processor,
)
from crosstvr.modeling_crosstvr import sample_hard_negatives
from crosstvr.pretrain import parse_arguments
from crosstvr.pretraining import (
    GroupedRandomSampler,
    ImageTextCollator,
    PretrainingArguments,
    blip2_pretraining_losses,
    load_image_text_records,
    pretrain,
)
from crosstvr.synthetic import frame_caption, frame_layout, scene_groups, write_benchmark


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory):
    directory = tmp_path_factory.mktemp("benchmark")
    write_benchmark(directory, seed=0, groups=(2, 1, 1), num_frames=6)
    return str(directory)


def schedule(output_dir, steps: int, **overrides) -> TrainingArguments:
    kwargs = {
        "output_dir": str(output_dir),
        "max_steps": steps,
        "per_device_train_batch_size": 16,
        "learning_rate": 2e-3,
        "lr_scheduler_type": "constant",
        "report_to": [],
        "save_strategy": "no",
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
    }
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def test_frame_captions_say_what_each_frame_shows(benchmark):
    scene = scene_groups(1, seed=4)[0]["base"]
    captions = [frame_caption(scene, index) for index in range(12)]
    assert [("dot at" in caption) for caption in captions] == [False] * 4 + [True] * 4 + [False] * 4
    (first, x, y), _ = frame_layout(scene, 2)[0]
    assert captions[2].startswith(f"{first.phrase} at {int(x // 4)} {int(y // 4)}")
    records = json.load(open(os.path.join(benchmark, "annotations", "frame_captions_train.json")))
    assert len(records) == 2 * 4 * 6  # every frame of every training video
    assert all(os.path.isfile(os.path.join(benchmark, record["image"])) for record in records)
    # Near duplicates share a group: the same frame of the four videos of a scene group. The test split has no frame
    # captions.
    groups = {}
    for record in records:
        video_id, index = record["image_id"].split("/")
        groups.setdefault(record["group"], set()).add((video_id.split("_")[0], index))
    assert len(groups) == 2 * 6 and all(len(members) == 1 for members in groups.values())
    assert all(len([r for r in records if r["group"] == group]) == 4 for group in groups)
    assert not os.path.exists(os.path.join(benchmark, "annotations", "frame_captions_test.json"))


def test_grouped_sampler_builds_batches_of_whole_groups():
    groups = ["a"] * 5 + ["b"] * 4 + ["c"] * 8 + ["d"]
    sampler = GroupedRandomSampler(groups, images_per_group=2, seed=1)
    order = list(sampler)
    assert len(order) == len(sampler) == 2 * (2 + 2 + 4)  # group d is too small, one image of a waits
    blocks = [order[i : i + 2] for i in range(0, len(order), 2)]
    assert all(groups[i] == groups[j] for i, j in blocks) and len(set(order)) == len(order)
    assert list(sampler) == order  # seeded
    sampler.set_epoch(1)
    assert list(sampler) != order
    with pytest.raises(ValueError, match="images_per_group"):
        GroupedRandomSampler(["a", "b"], images_per_group=2)


def test_missing_images_are_all_listed(benchmark, tmp_path):
    records = [{"image": "frames/nowhere.png", "caption": "x"}, {"image": "also/missing.png", "caption": "y"}]
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(records))
    with pytest.raises(FileNotFoundError, match="2 images .* missing.*--image_root"):
        load_image_text_records(str(path), benchmark)
    path.write_text(json.dumps([{"picture": "x.png"}]))
    with pytest.raises(ValueError, match="LAVIS"):
        load_image_text_records(str(path), benchmark)


def test_rows_of_one_image_are_not_each_others_negatives(benchmark, tmp_path):
    """Two captions of one image (COCO's five, or a frame with its frame caption and its video's caption) must not be
    negatives of each other: the rows of an `image_id` (by default one image file) are positives, like equal
    captions, so ITC leaves them out of its denominators and ITM never draws them as negatives."""
    frames = json.load(open(os.path.join(benchmark, "annotations", "frame_captions_train.json")))
    first, second = frames[0]["image"], frames[1]["image"]
    records = [
        {"image": first, "caption": "one"},
        {"image": first, "caption": "two"},  # the same file: the same image
        {"image": second, "caption": "three", "image_id": "shown"},
        {"image": second, "caption": "four", "image_id": "shown"},
        {"image": second, "caption": "one"},  # another image, but the first row's caption
        {"image": second, "caption": "five", "image_id": "elsewhere"},
    ]
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(records))
    rows = load_image_text_records(str(path), benchmark)
    assert rows[0]["image_id"] == rows[1]["image_id"] == os.path.join(benchmark, first)
    processor = build_tiny_processor()
    mask = ImageTextCollator(processor.image_processor, processor.tokenizer)(rows)["positive_mask"]
    expected = torch.eye(6, dtype=torch.bool)
    # One file; one image_id; one caption. An explicit image_id wins over the file (rows 4 and 5).
    for i, j in ((0, 1), (2, 3), (0, 4)):
        expected[i, j] = expected[j, i] = True
    assert mask.tolist() == expected.tolist()
    for draw in range(64):
        images, texts = sample_hard_negatives(torch.zeros(6, 6), mask, torch.Generator().manual_seed(draw))
        assert not mask[torch.arange(6), images].any() and not mask[texts, torch.arange(6)].any()


def test_a_fresh_eva_style_tower_sees_a_small_detail():
    """Trained from scratch, the tower must start at a scale where a 4-pixel dot changes its tokens: with
    Blip2VisionConfig's default initialisation (1e-10) every weight is about zero, every token is about zero, and
    pre-training hardly moves them."""
    from dataclasses import replace

    from crosstvr.synthetic import render_scene

    processor = build_tiny_processor()
    scene = scene_groups(1, seed=4)[0]["base"]
    other_dot = replace(scene, dot_colour="black" if scene.dot_colour != "black" else "purple")
    frames = [render_scene(s, num_frames=12)[5] for s in (scene, other_dot)]  # the dot is visible in frame 5
    pixel_values = processor.image_processor(images=frames, return_tensors="pt")["pixel_values"]
    torch.manual_seed(0)
    tower = build_tiny_eva_dual_encoder(processor).vision_model.eval()
    with torch.no_grad():
        tokens = tower(pixel_values=pixel_values).last_hidden_state  # (2, 1 + patches, width)
    # The tokens leave a LayerNorm: norm about sqrt(width) when the tower is alive, about 0 when its weights are.
    assert tokens.norm(dim=-1).mean() > 0.5 * tokens.shape[-1] ** 0.5
    change = (tokens[0] - tokens[1]).norm(dim=-1)  # (1 + patches,)
    assert change.max() > 0.05 * tokens.shape[-1] ** 0.5


def test_blip2_losses_train_the_qformer_over_a_frozen_tower():
    processor = build_tiny_processor()
    torch.manual_seed(0)
    model = build_tiny_blip2(processor, build_tiny_eva_dual_encoder(processor).config.vision_config)
    model.vision_model.requires_grad_(False)
    text = processor.qformer_tokenizer(["a", "b", "b", "c"], return_tensors="pt", padding=True)
    positive_mask = torch.tensor([[a == b for b in "abbc"] for a in "abbc"])
    pixel_values = torch.randn(4, 3, 64, 64)
    loss_itc, loss_itm = blip2_pretraining_losses(
        model, pixel_values, text["input_ids"], text["attention_mask"], positive_mask, uniform_negatives=True
    )
    (loss_itc + loss_itm).backward()
    assert loss_itc.isfinite() and loss_itm.isfinite()
    assert model.query_tokens.grad.abs().sum() > 0 and model.itm_head.weight.grad is not None
    assert all(p.grad is None for p in model.vision_model.parameters())
    # A query-token gradient of reasonable size: zero queries (transformers' init) would divide by LayerNorm's eps.
    assert model.query_tokens.grad.norm() < 1e3


def test_pretraining_then_conversion_is_the_blip2_path(benchmark, tmp_path):
    processor = build_tiny_processor()
    train_file = os.path.join(benchmark, "annotations", "frame_captions_train.json")
    starts = {}
    torch.manual_seed(0)
    for name, model, tokenizer in (
        ("clip", build_tiny_clip(processor), processor.tokenizer),
        ("tower", build_tiny_eva_dual_encoder(processor), processor.tokenizer),
    ):
        starts[name] = str(tmp_path / f"{name}-start")
        model.save_pretrained(starts[name])
        tokenizer.save_pretrained(starts[name])
        processor.image_processor.save_pretrained(starts[name])
    contrastive = {"task": "contrastive", "train_file": train_file, "image_root": benchmark, "images_per_group": 4,
                   "max_text_length": 24}
    clip_dir = pretrain(PretrainingArguments(model_name_or_path=starts["clip"], **contrastive), schedule(tmp_path / "clip", 2))
    tower_dir = pretrain(PretrainingArguments(model_name_or_path=starts["tower"], **contrastive), schedule(tmp_path / "tower", 30))
    tower = VisionTextDualEncoderModel.from_pretrained(tower_dir)
    start_tower = VisionTextDualEncoderModel.from_pretrained(starts["tower"])
    assert not torch.equal(tower.vision_model.embeddings.patch_embedding.weight,
                           start_tower.vision_model.embeddings.patch_embedding.weight)

    blip2 = build_tiny_blip2(processor, tower.config.vision_config)
    blip2.vision_model.load_state_dict(tower.vision_model.state_dict())
    starts["blip2"] = str(tmp_path / "blip2-start")
    blip2.save_pretrained(starts["blip2"])
    processor.qformer_tokenizer.save_pretrained(starts["blip2"])
    processor.image_processor.save_pretrained(starts["blip2"])
    blip2_dir = pretrain(
        PretrainingArguments(
            task="qformer", model_name_or_path=starts["blip2"], train_file=train_file, image_root=benchmark,
            images_per_group=4, uniform_negative_steps=2, max_text_length=24,
        ),
        schedule(tmp_path / "blip2", 4),
    )
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in os.listdir(blip2_dir))  # no pickles
    trained = Blip2ForImageTextRetrieval.from_pretrained(blip2_dir)
    torch.testing.assert_close(trained.vision_model.state_dict(), tower.vision_model.state_dict())  # frozen
    assert not torch.equal(trained.query_tokens, blip2.query_tokens)

    # The user's path with a BLIP-2 ITM checkpoint from the Hub: its tower becomes the frozen stage-2 tower.
    spec = importlib.util.spec_from_file_location("convert", os.path.join(ROOT, "hub_scripts", "convert_checkpoint.py"))
    convert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert)
    output = tmp_path / "crosstvr"
    assert convert.main(["--clip", clip_dir, "--blip2", blip2_dir, "--stage2-tower", "blip2", "--output", str(output),
                         "--temporal-layers", "1", "--temporal-positions", "64", "--num-frames", "6",
                         "--max-text-length", "24"]) == 0
    model = CrossTVRModel.from_pretrained(output)
    torch.testing.assert_close(model.fine_vision_model.state_dict(), trained.vision_model.state_dict())
    torch.testing.assert_close(model.fine_module.qformer.state_dict(), trained.qformer.state_dict())
    torch.testing.assert_close(model.fine_module.query_tokens, trained.query_tokens)


def test_command_line_reads_both_option_sets():
    pretraining_args, training_args = parse_arguments(
        ["--task", "qformer", "--model_name_or_path", "m", "--train_file", "f.json", "--image_root", "r",
         "--images_per_group", "4", "--output_dir", "out", "--max_steps", "3", "--learning_rate", "1e-3"]
    )
    assert (pretraining_args.task, pretraining_args.images_per_group) == ("qformer", 4)
    assert (training_args.max_steps, training_args.learning_rate) == (3, 1e-3)
    with pytest.raises(ValueError, match="task"):
        PretrainingArguments(task="itg", model_name_or_path="m", train_file="f", image_root="r")
