"""Why the re-ranker does or does not beat stage 1 on the synthetic benchmark: per kind of fine detail.

    python benchmarks/synthetic_diagnostics.py [--output runs/synthetic] [--seed 0] [--split test] [--model shared]
    python benchmarks/synthetic_diagnostics.py --output runs/synthetic --pretrained [--split val]

Reads what `synthetic_benchmark.py` left in `--output` (the data and the seed's model of the row `--model` names:
`shared`, CrossTVR, by default; any other trained row, e.g. `t2v2t` of `--systems`) and measures, for
each kind of hard negative (the dot's colour, a movement's direction, the order of the movements):

- how far the frozen tower's tokens of a scene move when that one detail changes, relative to how far they move to
  another scene group: mean |X(scene) - X(variant)| / mean |X(scene) - X(other group's scene)| (0 means the tower
  cannot see the detail at all); for CrossTVR's decoupled module with both passes, the same ratio after each of its
  stages with the scene's caption (X_spatial(t), the fused pair representation, the matching logits), which shows
  where a difference the tokens carry is lost;
- within-group accuracy: for each caption, whether its own video scores highest among the four videos of its group,
  by stage 1 (cosine) and by stage 2 (s_fine) — chance is 25 %; for the direction variant's caption also split by
  the axis of the first movement: an object's rest height is fixed (the top or bottom band), so "up" or "down" shows
  in any single frame of the movement, while its rest x is drawn per scene, so "left" or "right" shows only against
  another frame of the video;
- how sharp stage 2's token selection is in training, against the hard choice evaluation makes (see
  `selection_sharpness`).

With `--pretrained`, the pre-trained parts instead (`<output>/pretrained/tower`, the dual encoder whose vision tower
becomes stage 2's, and `<output>/pretrained/blip2`, the Q-Former's ITM head over it), on single frames of the split
(train or val; the test split has no frame captions): for every frame whose caption differs from the same frame of a
near duplicate, whether the frame's own caption scores it above the near duplicate's frame, and the other way round
(pairwise accuracy, chance 50 %), per kind of detail. This shows where a detail is lost before the video stages. It
also probes the frozen tower for the dot's colour directly: a linear classifier fitted on the training frames that
show the dot, scored on the split's, once on the tower's output token at the patch holding the dot (what stage 2's
Q-Former can attend to) and once on its pooled image embedding (what the dual encoder's caption scores compare).

Prints a table and one JSON line.
"""

import argparse
import json
import os
import sys

import torch


VARIANTS = ("dot_colour", "direction", "order")
AXES = {"left": "horizontal", "right": "horizontal", "up": "vertical", "down": "vertical"}
FINE_STAGES = {"spatial": "X_spatial(t)", "fused": "fused pair representation", "logits": "matching logits"}


def relative_change(base: "torch.Tensor", variant: "torch.Tensor", other: "torch.Tensor") -> float:
    """mean |base - variant| / mean |base - other|: how far a near duplicate moves an output, in units of how far
    another scene group moves it."""
    return float((base - variant).abs().mean() / (base - other).abs().mean())


def first_direction(scene: dict) -> str:
    """The direction of a scene's first movement, from its record in `scenes.json`."""
    return (scene["top"] if scene["top_first"] else scene["bottom"])["direction"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/synthetic")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="test")
    parser.add_argument("--model", default="shared", help="the row whose stage-2 model to read (a folder of the seed)")
    parser.add_argument("--pretrained", action="store_true",
                        help="probe the pre-trained tower and Q-Former on single frames instead of a trained row")
    args = parser.parse_args(argv)
    if args.pretrained:
        return probe_pretrained(args.output, args.split)

    from crosstvr import CrossTVRModel, CrossTVRProcessor

    model_dir = os.path.join(args.output, f"seed-{args.seed}", args.model, "final")
    if not os.path.isdir(model_dir):
        raise SystemExit(f"--model {args.model}: no trained model at {model_dir}; name a row the benchmark trained")
    data = os.path.join(args.output, "data")
    model = CrossTVRModel.from_pretrained(model_dir).eval()
    processor = CrossTVRProcessor.from_pretrained(model_dir)
    with open(os.path.join(data, "annotations", "scenes.json")) as file:
        scenes = json.load(file)
    with open(os.path.join(data, "annotations", "raw-captions.json")) as file:
        captions = json.load(file)
    with open(os.path.join(data, "annotations", f"{args.split}_list.txt")) as file:
        video_ids = [line.strip() for line in file if line.strip()]
    groups = {}
    for position, video_id in enumerate(video_ids):
        groups.setdefault(scenes[video_id]["group"], {})[scenes[video_id]["variant"]] = position

    with torch.no_grad():
        video = [
            model.encode_video(**processor(videos=[os.path.join(data, "videos", f"{v}.mp4") for v in video_ids[i:i + 32]]))
            for i in range(0, len(video_ids), 32)
        ]
        tokens = torch.cat([v.vision_tokens for v in video])  # (videos, frames, tokens, width)
        video_embeds = torch.cat([v.video_embeds for v in video])
        text = processor(text=[captions[v][0] for v in video_ids])
        text_embeds = model.get_text_features(text["input_ids"], text["attention_mask"])

        distance = {name: [] for name in VARIANTS}
        stage1 = {name: [] for name in ("base", *VARIANTS)}
        stage2 = {name: [] for name in ("base", *VARIANTS)}
        direction_axes = []  # the axis of each direction caption, in the order of stage1/stage2["direction"]
        group_list = list(groups.values())
        for position, members in enumerate(group_list):
            other = group_list[(position + 1) % len(group_list)]["base"]
            for name in VARIANTS:
                distance[name].append(relative_change(tokens[members["base"]], tokens[members[name]], tokens[other]))
            order = list(members.values())
            for name, query in members.items():
                coarse = model.get_similarity(text_embeds[query][None], video_embeds[order])[0]
                ids = text["qformer_input_ids"][query].expand(len(order), -1)
                mask = text["qformer_attention_mask"][query].expand(len(order), -1)
                fine = model.get_fine_scores(ids, mask, tokens[order])
                stage1[name].append(float(order[int(coarse.argmax())] == query))
                stage2[name].append(float(order[int(fine.argmax())] == query))
                if name == "direction":
                    direction_axes.append(AXES[first_direction(scenes[video_ids[query]]["scene"])])

    mean = lambda values: sum(values) / len(values)  # noqa: E731
    report = {
        "token_distance_vs_other_group": {name: mean(v) for name, v in distance.items()},
        "stage1_within_group_accuracy": {name: mean(v) for name, v in stage1.items()},
        "stage2_within_group_accuracy": {name: mean(v) for name, v in stage2.items()},
        "direction_within_group_accuracy_by_axis": {
            stage: {axis: mean([hit for hit, a in zip(hits["direction"], direction_axes) if a == axis])
                    for axis in sorted(set(direction_axes))}
            for stage, hits in (("stage1", stage1), ("stage2", stage2))
        },
        "fine_module_change_vs_other_group": fine_module_change(model, text, tokens, group_list),
        "groups": len(groups),
        **selection_sharpness(model, tokens),
    }
    print(f"| {args.split} split, seed {args.seed}, {args.model}, {len(groups)} groups | base | dot colour | direction "
          "| order |")
    print("| --- | --- | --- | --- | --- |")
    print("| frozen-token change / change to another group | - | "
          + " | ".join(f"{report['token_distance_vs_other_group'][n]:.3f}" for n in VARIANTS) + " |")
    for stage, ratios in report["fine_module_change_vs_other_group"].items():
        print(f"| {FINE_STAGES[stage]} change / change to another group | - | "
              + " | ".join(f"{ratios[n]:.3f}" for n in VARIANTS) + " |")
    for key, label in (("stage1_within_group_accuracy", "stage 1 within-group accuracy"),
                       ("stage2_within_group_accuracy", "stage 2 within-group accuracy")):
        print(f"| {label} | " + " | ".join(f"{100 * report[key][n]:.0f} %" for n in ("base", *VARIANTS)) + " |")
    by_axis = report["direction_within_group_accuracy_by_axis"]
    print("\ndirection variant's caption, by the axis of the first movement: " + "; ".join(
        f"{stage.replace('stage', 'stage ')} " + ", ".join(f"{axis} {100 * value:.0f} %" for axis, value in values.items())
        for stage, values in by_axis.items()))
    if "selection_slot_weight" in report:
        print(f"\nstage-2 token selection: a slot's largest weight in training {report['selection_slot_weight']:.2f} "
              f"(1 = the hard choice evaluation makes, {1 / report['selection_candidates']:.3f} = uniform over the "
              f"{report['selection_candidates']} tokens); log p spans {report['selection_log_p_range']:.3f} within a "
              "frame")
    print(json.dumps({"benchmark": "synthetic_diagnostics", **report}))
    return 0


def fine_module_change(model, text: dict, vision_tokens: "torch.Tensor", group_list: list[dict]) -> dict:
    """
    For each stage of CrossTVR's decoupled module (both passes), with a group's base caption: the mean |output(base
    video) - output(variant)| over the mean |output(base video) - output(the next group's base video)|, averaged over
    groups, per kind of variant — the ratio the frozen-token row computes on the module's input. Empty for other fine
    modules.
    """
    from crosstvr.modeling_crosstvr import CrossTVRDecoupledFineModule, trim_text_padding

    module = model.fine_module
    if not isinstance(module, CrossTVRDecoupledFineModule) or model.config.fine_attention != "spatial_temporal":
        return {}
    tokens = vision_tokens.to(module.matching_head.weight.dtype)
    if model.fine_vision_projection is not None:
        tokens = model.fine_vision_projection(tokens)
    num_frames = tokens.shape[1]
    first_pair, all_frames = torch.zeros(num_frames, dtype=torch.long), torch.ones(1, num_frames, dtype=torch.long)

    def stages(ids: torch.Tensor, mask: torch.Tensor, video: int) -> dict[str, torch.Tensor]:
        fused = module.fuse(ids, mask, first_pair[:1], tokens[video:video + 1], all_frames)  # (1, hidden)
        return {
            "spatial": module.spatial_text_attention(ids, mask, tokens[video], first_pair),  # (T, hidden)
            "fused": fused,
            "logits": module.matching_head(fused),
        }

    ratios = {stage: {name: [] for name in VARIANTS} for stage in FINE_STAGES}
    with torch.no_grad():
        for position, members in enumerate(group_list):
            caption = members["base"]
            ids, mask = trim_text_padding(text["qformer_input_ids"][caption:caption + 1],
                                          text["qformer_attention_mask"][caption:caption + 1])
            base = stages(ids, mask, caption)
            other = stages(ids, mask, group_list[(position + 1) % len(group_list)]["base"])
            for name in VARIANTS:
                variant = stages(ids, mask, members[name])
                for stage in FINE_STAGES:
                    ratios[stage][name].append(relative_change(base[stage], variant[stage], other[stage]))
    return {stage: {name: sum(v) / len(v) for name, v in values.items()} for stage, values in ratios.items()}


def selection_sharpness(model, vision_tokens: "torch.Tensor") -> dict:
    """
    How close stage 2's token selection in training (perturbed top-k: each of the M slots a mixture of tokens) is to
    the hard top-k evaluation uses, on these videos: the mean over frames and slots of a slot's largest weight, and
    the mean range of the selector's log p within a frame. With scores flatter than the perturbation (sigma), every
    slot averages many tokens in training while evaluation picks single ones: the fine module is then evaluated on
    inputs unlike those it was trained on. Empty for a fine module without token selection.
    """
    from crosstvr.modeling_crosstvr import PerturbedTopK, temporal_difference_tokens

    selector = getattr(model.fine_module, "token_selector", None)
    if selector is None:
        return {}
    with torch.no_grad():
        tokens = vision_tokens.float()  # (videos, frames, tokens, width)
        if model.fine_vision_projection is not None:
            tokens = model.fine_vision_projection(tokens)
        if model.config.use_temporal_difference_tokens:
            tokens = temporal_difference_tokens(tokens, torch.ones(tokens.shape[:2], dtype=torch.long))
        log_probs = selector.token_log_probs(tokens.flatten(0, 1))  # (frames, candidates)
        torch.manual_seed(0)
        weights = PerturbedTopK.apply(log_probs, selector.num_selected, selector.num_samples, selector.sigma)
    return {
        "selection_slot_weight": float(weights.max(dim=-1).values.mean()),
        "selection_log_p_range": float((log_probs.max(dim=-1).values - log_probs.min(dim=-1).values).mean()),
        "selection_candidates": log_probs.shape[-1],
    }


def _load_pretrained(name: str, folder: str) -> tuple:
    """The pre-trained part `name` ("tower": the dual encoder; "blip2": the Q-Former's ITM) with its preprocessors."""
    from transformers import AutoImageProcessor, AutoTokenizer, Blip2ForImageTextRetrieval, VisionTextDualEncoderModel

    model_class = VisionTextDualEncoderModel if name == "tower" else Blip2ForImageTextRetrieval
    return (model_class.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder),
            AutoImageProcessor.from_pretrained(folder))


def _frame_scores(part: tuple, records: list[dict]) -> "torch.Tensor":
    """`(captions, images)` scores of a pre-trained part on image-caption `records` (every caption against every
    image): the dual encoder's cosine logits, or the log-odds of BLIP-2's ITM head."""
    from transformers import VisionTextDualEncoderModel

    from crosstvr.default_model import MAX_TEXT_LENGTH
    from crosstvr.pretraining import ImageTextCollator

    model, tokenizer, image_processor = part
    batch = ImageTextCollator(image_processor, tokenizer, MAX_TEXT_LENGTH)(records)
    if isinstance(model, VisionTextDualEncoderModel):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"]).logits_per_text
    count = len(records)  # all count x count pairs in one pass, caption-major
    logits = model(pixel_values=batch["pixel_values"].repeat(count, 1, 1, 1),
                   input_ids=batch["input_ids"].repeat_interleave(count, dim=0),
                   attention_mask=batch["attention_mask"].repeat_interleave(count, dim=0),
                   use_image_text_matching_head=True).logits_per_image  # (count * count, 2)
    return (logits[:, 1] - logits[:, 0]).view(count, count)


def probe_pretrained(output: str, split: str) -> int:
    """`--pretrained`: pairwise frame-level accuracy of the pre-trained tower and Q-Former, per kind of detail."""
    from crosstvr.pretraining import register_blip2_vision_tower

    register_blip2_vision_tower()
    data = os.path.join(output, "data")
    path = os.path.join(data, "annotations", f"frame_captions_{split}.json")
    if not os.path.exists(path):
        raise SystemExit(f"--pretrained --split {split}: no frame captions at {path} (only train and val have them)")
    with open(path) as file:
        records_of_split = json.load(file)
    with open(os.path.join(data, "annotations", "scenes.json")) as file:
        scenes = json.load(file)
    frames = {}  # (scene group, frame index) -> {variant: record}
    for record in records_of_split:
        video_id, index = record["image_id"].split("/")
        frames.setdefault((scenes[video_id]["group"], index), {})[scenes[video_id]["variant"]] = record
    report, parts = {}, {}
    with torch.no_grad():
        for name in ("tower", "blip2"):
            part = parts[name] = _load_pretrained(name, os.path.join(output, "pretrained", name))
            correct = {kind: [] for kind in VARIANTS}
            for members in frames.values():
                records = [{**members[variant], "image": os.path.join(data, members[variant]["image"])}
                           for variant in ("base", *VARIANTS)]
                captions = [record["caption"] for record in records]
                scores = _frame_scores(part, records)
                for position, kind in enumerate(VARIANTS, start=1):
                    if captions[position] == captions[0]:
                        continue  # this frame does not show the detail
                    correct[kind] += [float(scores[0, 0] > scores[0, position]),
                                      float(scores[position, position] > scores[position, 0])]
            report[name] = {kind: sum(v) / len(v) for kind, v in correct.items() if v}
        if split == "train":
            training = records_of_split
        else:
            with open(os.path.join(data, "annotations", "frame_captions_train.json")) as file:
                training = json.load(file)
        report["dot_colour_linear_probe"] = dot_colour_probe(parts["tower"], data, scenes, training, records_of_split)
    print(f"| {split} frames, pairwise accuracy (chance 50 %) | dot colour | direction | order |")
    print("| --- | --- | --- | --- |")
    for name, label in (("tower", "pre-trained tower (dual encoder)"), ("blip2", "pre-trained Q-Former (ITM)")):
        print(f"| {label} | " + " | ".join(f"{100 * report[name].get(kind, float('nan')):.0f} %" for kind in VARIANTS) + " |")
    probe = report["dot_colour_linear_probe"]
    print(f"\nthe dot's colour from the frozen tower, linear probe on {split} frames (chance "
          f"{100 / probe['colours']:.0f} %): token at the dot's patch {100 * probe['dot_patch_token']:.0f} %, pooled "
          f"image embedding {100 * probe['pooled_embedding']:.0f} %")
    print(json.dumps({"benchmark": "synthetic_diagnostics_pretrained", "split": split, **report}))
    return 0


def dot_colour_probe(tower: tuple, data: str, scenes: dict, training: list[dict], scored: list[dict],
                     steps: int = 300) -> dict:
    r"""
    Accuracy of a linear classifier of the dot's colour on the frozen tower's features of the `scored` frame records
    that show the dot, fitted (seeded, full-batch Adam on the cross-entropy, features standardised by the fitting
    frames' statistics) on the `training` records that show it. Two features: the tower's output token at the patch
    holding the dot's centre, and the dual encoder's pooled image embedding. `tower` is `_load_pretrained("tower", ...)`.
    """
    from crosstvr.default_model import MAX_TEXT_LENGTH
    from crosstvr.pretraining import ImageTextCollator

    model, tokenizer, image_processor = tower
    collate = ImageTextCollator(image_processor, tokenizer, MAX_TEXT_LENGTH)
    patch, image_size = model.config.vision_config.patch_size, model.config.vision_config.image_size
    colours = sorted({scene["scene"]["dot_colour"] for scene in scenes.values()})

    def features(records: list[dict]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        records = [{**record, "image": os.path.join(data, record["image"])}
                   for record in records if " dot at " in record["caption"]]
        tokens, pooled, labels = [], [], []
        for start in range(0, len(records), 256):
            chunk = records[start:start + 256]
            outputs = model.get_image_features(pixel_values=collate(chunk)["pixel_values"])  # pooler_output: projected
            pooled.append(outputs.pooler_output)
            for row, record in enumerate(chunk):
                scene = scenes[record["image_id"].split("/")[0]]["scene"]
                dot_patch = scene["dot_y"] // patch * (image_size // patch) + scene["dot_x"] // patch
                tokens.append(outputs.last_hidden_state[row, 1 + dot_patch])  # after the [CLS] token
                labels.append(colours.index(scene["dot_colour"]))
        return {"dot_patch_token": torch.stack(tokens), "pooled_embedding": torch.cat(pooled)}, torch.tensor(labels)

    fit, fit_labels = features(training)
    test, test_labels = features(scored)
    report = {"colours": len(colours), "frames": len(test_labels)}
    for name, train_features in fit.items():
        mean, std = train_features.mean(dim=0), train_features.std(dim=0) + 1e-6
        torch.manual_seed(0)
        classifier = torch.nn.Linear(train_features.shape[1], len(colours))
        optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-2)
        with torch.enable_grad():
            for _ in range(steps):
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(classifier((train_features - mean) / std), fit_labels).backward()
                optimizer.step()
        predictions = classifier((test[name] - mean) / std).argmax(dim=-1)
        report[name] = float((predictions == test_labels).float().mean())
    return report


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
