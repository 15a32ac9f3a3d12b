"""Write the model card (README.md) of a CrossTVR checkpoint folder from `model_cards/crosstvr_template.md`.

    python hub_scripts/make_model_card.py runs/stage2/final --repo-id your-name/crosstvr-base \\
        --results evaluation_msrvtt_test_1k.json [--results evaluation_msvd_test.json ...] [--variant base|large]

The card's metadata block (license, library_name, pipeline_tag, datasets, base_model, tags) and its `model-index` are
built with `huggingface_hub.ModelCardData` / `EvalResult` from the checkpoint's configuration and the results JSON files
that `crosstvr evaluate` writes (the two-stage metrics when present, else stage 1), so the Hub parses them; the body
states the architecture, the results tables, usage, training, limitations and the citation. The card is re-parsed
before it is written.
"""

import argparse
import json
import os
import sys

from huggingface_hub import EvalResult, ModelCard, ModelCardData


TEMPLATE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model_cards", "crosstvr_template.md")
DATASET_NAMES = {"msrvtt": "MSR-VTT", "msvd": "MSVD", "vatex": "VATEX", "lsmdc": "LSMDC", "didemo": "DiDeMo"}
# The card's `datasets` metadata: Hub ids where a Hub copy of the benchmark's annotations exists (the community mirrors
# with the retrieval splits; the videos' own licences apply), the benchmark's name otherwise (LSMDC may not be
# redistributed). `--dataset-id name=owner/repo` overrides.
DATASET_HUB_IDS = {"msrvtt": "friedrichor/MSR-VTT", "msvd": "friedrichor/MSVD", "didemo": "friedrichor/DiDeMo"}
METRICS = (("R1", "recall_at_1", "R@1"), ("R5", "recall_at_5", "R@5"), ("R10", "recall_at_10", "R@10"),
           ("MdR", "median_rank", "MdR"), ("MnR", "mean_rank", "MnR"))
DIRECTIONS = (("t2v", "text-to-video-retrieval", "Text-to-Video Retrieval"),
              ("v2t", "video-to-text-retrieval", "Video-to-Text Retrieval"))
DEFAULT_TRAINING = (
    "Stage 1 (the dual encoder) is fine-tuned contrastively with `python -m crosstvr.train --stage 1` (symmetric "
    "InfoNCE, learnable temperature); stage 2 (the fine module) with `python -m crosstvr.train --stage 2` on the "
    "video-text matching loss with hard negatives sampled from the stage-1 similarities of each batch, the vision tower "
    "frozen and read from a token cache. AdamW, lr 1e-4 (CLIP towers 1e-7 in stage 1), cosine schedule with 10 % "
    "warm-up, batch 128, 5 epochs."
)


def _parameter_count(folder: str) -> int:
    from safetensors import safe_open

    total = 0
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="pt") as file:
                for key in file.keys():
                    count = 1
                    for size in file.get_slice(key).get_shape():
                        count *= size
                    total += count
    return total


def _human(count: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f}{unit}"
    return str(count)


def eval_results(results: list[dict]) -> list[EvalResult]:
    """`EvalResult`s (the model-index) of `crosstvr evaluate` results: two-stage metrics when present, else stage 1."""
    entries = []
    for result in results:
        metrics = result["metrics"].get("two_stage") or result["metrics"]["stage1"]
        dataset = result["dataset"]
        for prefix, task_type, task_name in DIRECTIONS:
            for key, metric_type, metric_name in METRICS:
                entries.append(
                    EvalResult(
                        task_type=task_type,
                        task_name=task_name,
                        dataset_type=dataset,
                        dataset_name=DATASET_NAMES.get(dataset, dataset),
                        dataset_split=result["split"],
                        metric_type=metric_type,
                        metric_name=metric_name,
                        metric_value=round(metrics[f"{prefix}_{key}"], 2),
                    )
                )
    return entries


def _result_tables(results: list[dict]) -> list[dict]:
    tables = []
    for result in results:
        rows = []
        for key, name in (("stage1", "stage 1"), ("two_stage", f"CrossTVR (K = {result.get('top_k')})")):
            metrics = result["metrics"].get(key)
            if metrics is not None:
                cells = [f"{metrics[f'{prefix}_{column}']:.1f}" for prefix in ("t2v", "v2t") for column, _, _ in METRICS]
                rows.append({"name": name, "cells": cells})
        tables.append(
            {
                "dataset_name": DATASET_NAMES.get(result["dataset"], result["dataset"]),
                "split": result["split"],
                "num_texts": result["num_texts"],
                "num_videos": result["num_videos"],
                "post_processing": result.get("post_processing"),
                "rows": rows,
            }
        )
    return tables


def build_card(
    folder: str,
    repo_id: str,
    results_files: list[str] = (),
    variant: str | None = None,
    base_models: list[str] | None = None,
    license: str = "mit",
    training: str = DEFAULT_TRAINING,
    limitations: str = "It inherits the biases of CLIP and BLIP-2 and of the captions it was fine-tuned on.",
    dataset_ids: dict[str, str] | None = None,
    space_id: str | None = None,
) -> ModelCard:
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as file:
        config = json.load(file)
    with open(os.path.join(folder, "processor_config.json"), encoding="utf-8") as file:
        processor_config = json.load(file)
    results = []
    for path in results_files:
        with open(path, encoding="utf-8") as file:
            results.append(json.load(file))
    report_path = os.path.join(folder, "conversion_report.json")
    if base_models is None:
        base_models = []
        if os.path.exists(report_path):
            with open(report_path, encoding="utf-8") as file:
                report = json.load(file)
            base_models = [name for name in (report.get("clip"), report.get("blip2")) if name]

    fine_tower = config.get("fine_vision_config") or config["vision_config"]
    is_large = fine_tower.get("model_type") == "blip_2_vision_model"
    variant = variant or ("large" if is_large else "base")
    vision = config["vision_config"]
    qformer = config["qformer_config"]
    aggregator = {
        "mean": "frames mean-pooled (CLIP4Clip meanP)",
        "transformer": "a temporal transformer over frames (CLIP4Clip seqTransf)",
        "token_shift_select": "TS2-Net token shift and token selection",
    }[config.get("temporal_aggregator", "token_shift_select")]
    qformer_size = f"BLIP-2 Q-Former of {qformer.get('num_hidden_layers')} layers, hidden {qformer.get('hidden_size')}"
    if config.get("fine_module", "crosstvr") == "t2v2t":
        bypass = config.get("t2v2t_bypass", True)
        fine_module_description = (
            "T2V2T fusion: each frame's tokens attend to the caption"
            + (" and to themselves (bypass cross-attention)" if bypass else " (naive T2V2T, no bypass)")
            + ", then the caption, run through a BLIP-2 Q-Former, cross-attends to the fused tokens of all frames"
        )
        fine_module_row = f"T2V2T fusion ({'bypass' if bypass else 'naive, no bypass'}), {qformer_size}"
    else:
        fine_module_description = (
            "a BLIP-2 Q-Former run as decoupled spatial text attention (per frame) and temporal text attention (over "
            f"the {config.get('num_selected_tokens', 4)} most informative tokens of each frame)"
        )
        shared = "shared" if config.get("share_spatial_temporal", True) else "separate"
        fine_module_row = (
            f"CrossTVR decoupled attention, {qformer_size}, {config.get('num_query_tokens')} query tokens, {shared} "
            "spatial / temporal"
        )
    datasets = sorted({result["dataset"] for result in results})
    card_data = ModelCardData(
        license=license,
        library_name="transformers",
        # No `pipeline_tag`: the Hub has no text-video retrieval task, and feature-extraction's pipeline cannot run a
        # two-tower model. The checkpoint's own pipeline is `text-video-retrieval` (config.custom_pipelines).
        tags=[
            "crosstvr",
            "text-video-retrieval",
            "video-text-retrieval",
            "text-to-video-retrieval",
            "clip",
            "blip-2",
            "custom_code",
        ],
        datasets=[
            {**DATASET_HUB_IDS, **(dataset_ids or {})}.get(name, DATASET_NAMES.get(name, name)) for name in datasets
        ]
        or None,
        base_model=base_models or None,
        model_name=repo_id,
        eval_results=eval_results(results) or None,
    )
    card = ModelCard.from_template(
        card_data,
        template_path=TEMPLATE,
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        variant_name=variant.capitalize(),
        stage1_description=aggregator,
        stage1_similarity={
            "mean": "cosine similarity",
            "text_conditioned": "TS2-Net's text-conditioned softmax pooling of its frames' cosine similarities",
            "cret": "CRET's global cosine plus the local similarity of the features its query centres gather from the "
            "patch and word tokens (trained with GEES)",
        }[config.get("similarity_head", "mean")],
        stage1_towers=f"CLIP ViT, {vision.get('image_size')} px, patch {vision.get('patch_size')}, width {vision.get('hidden_size')}",
        stage2_tower=(
            f"BLIP-2 EVA ViT-g (width {fine_tower.get('hidden_size')})"
            if is_large
            else ("the stage-1 tower" if config.get("share_vision_tower") else f"CLIP ViT (width {fine_tower.get('hidden_size')})")
        ),
        top_k=config.get("rerank_top_k", 15),
        fine_score_weight=config.get("fine_score_weight", 1.0),
        fine_module_description=fine_module_description,
        fine_module_row=fine_module_row,
        num_frames=processor_config.get("num_frames"),
        max_text_length=processor_config.get("max_text_length"),
        num_parameters=_human(_parameter_count(folder)),
        base_models=base_models,
        results=_result_tables(results),
        training=training,
        limitations=limitations,
        space_id=space_id,
    )
    # Re-parse, as the Hub will: the metadata and the model-index must read back.
    parsed = ModelCard(str(card))
    if results and len(parsed.data.eval_results or []) != len(card_data.eval_results):
        raise ValueError("the generated model-index does not parse back")
    return card


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="the CrossTVR checkpoint folder")
    parser.add_argument("--repo-id", required=True, help="the Hub repository the card describes")
    parser.add_argument("--results", action="append", default=[], help="a results JSON of `crosstvr evaluate`")
    parser.add_argument("--variant", choices=("base", "large"), help="default: from the stage-2 tower")
    parser.add_argument("--base-model", action="append", help="base checkpoints (default: the conversion report's)")
    parser.add_argument("--license", default="mit", help="SPDX id (CLIP and BLIP-2 weights are MIT)")
    parser.add_argument("--training", default=DEFAULT_TRAINING, help="the training paragraph")
    parser.add_argument("--dataset-id", action="append", default=[], metavar="NAME=HUB_ID",
                        help=f"the Hub id to list for a dataset of the results (default: {DATASET_HUB_IDS})")
    parser.add_argument("--space-id", help="a Space running the search page (hub_scripts/push_space.py), to link")
    parser.add_argument("--output", help="where to write the card (default: <folder>/README.md)")
    args = parser.parse_args(argv)
    malformed = [item for item in args.dataset_id if "=" not in item]
    if malformed:
        parser.error(f"--dataset-id takes NAME=HUB_ID (e.g. msrvtt=friedrichor/MSR-VTT), got {malformed}")
    card = build_card(
        args.folder,
        args.repo_id,
        args.results,
        args.variant,
        args.base_model,
        args.license,
        args.training,
        dataset_ids=dict(item.split("=", 1) for item in args.dataset_id),
        space_id=args.space_id,
    )
    output = args.output or os.path.join(args.folder, "README.md")
    card.save(output)
    print(f"model card written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
