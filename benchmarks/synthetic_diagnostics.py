"""Why the re-ranker does or does not beat stage 1 on the synthetic benchmark: per kind of fine detail.

    python benchmarks/synthetic_diagnostics.py [--output runs/synthetic] [--seed 0] [--split test] [--model shared]

Reads what `synthetic_benchmark.py` left in `--output` (the data and the seed's model of the row `--model` names:
`shared`, CrossTVR, by default; any other trained row, e.g. `t2v2t` of `--systems`) and measures, for
each kind of hard negative (the dot's colour, a movement's direction, the order of the movements):

- how far the frozen tower's tokens of a scene move when that one detail changes, relative to how far they move to
  another scene group: mean |X(scene) - X(variant)| / mean |X(scene) - X(other group's scene)| (0 means the tower
  cannot see the detail at all);
- within-group accuracy: for each caption, whether its own video scores highest among the four videos of its group,
  by stage 1 (cosine) and by stage 2 (s_fine) — chance is 25 %.

Prints a table and one JSON line.
"""

import argparse
import json
import os
import sys

import torch


VARIANTS = ("dot_colour", "direction", "order")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/synthetic")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="test")
    parser.add_argument("--model", default="shared", help="the row whose stage-2 model to read (a folder of the seed)")
    args = parser.parse_args(argv)

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
        group_list = list(groups.values())
        for position, members in enumerate(group_list):
            other = group_list[(position + 1) % len(group_list)]["base"]
            to_other = (tokens[members["base"]] - tokens[other]).abs().mean()
            for name in VARIANTS:
                distance[name].append(float((tokens[members["base"]] - tokens[members[name]]).abs().mean() / to_other))
            order = list(members.values())
            for name, query in members.items():
                coarse = model.get_similarity(text_embeds[query][None], video_embeds[order])[0]
                ids = text["qformer_input_ids"][query].expand(len(order), -1)
                mask = text["qformer_attention_mask"][query].expand(len(order), -1)
                fine = model.get_fine_scores(ids, mask, tokens[order])
                stage1[name].append(float(order[int(coarse.argmax())] == query))
                stage2[name].append(float(order[int(fine.argmax())] == query))

    mean = lambda values: sum(values) / len(values)  # noqa: E731
    report = {
        "token_distance_vs_other_group": {name: mean(v) for name, v in distance.items()},
        "stage1_within_group_accuracy": {name: mean(v) for name, v in stage1.items()},
        "stage2_within_group_accuracy": {name: mean(v) for name, v in stage2.items()},
        "groups": len(groups),
    }
    print(f"| {args.split} split, seed {args.seed}, {args.model}, {len(groups)} groups | base | dot colour | direction "
          "| order |")
    print("| --- | --- | --- | --- | --- |")
    print("| frozen-token change / change to another group | - | "
          + " | ".join(f"{report['token_distance_vs_other_group'][n]:.3f}" for n in VARIANTS) + " |")
    for key, label in (("stage1_within_group_accuracy", "stage 1 within-group accuracy"),
                       ("stage2_within_group_accuracy", "stage 2 within-group accuracy")):
        print(f"| {label} | " + " | ".join(f"{100 * report[key][n]:.0f} %" for n in ("base", *VARIANTS)) + " |")
    print(json.dumps({"benchmark": "synthetic_diagnostics", **report}))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
