"""The fine-grained synthetic benchmark: does a frozen image encoder plus the decoupled re-ranker beat the cosine stage?

    python benchmarks/synthetic_benchmark.py [--output runs/synthetic] [--seeds 0 1 2] [--ship-default] [--smoke]

One command, on a 2-core CPU in under 20 minutes, through the normal code paths (the recipe only orchestrates):

0. Data: `crosstvr.synthetic.write_benchmark` writes scenes whose captions have hard negatives in the set that differ in
   one fine detail (a flashing dot's colour, the direction of a movement, the order of two movements), in MSVD's
   layout (train 600 videos x 3 captions, val 100, test 200; 6 frames of 64 px per video).
1. Image encoder: a tiny CLIP pre-trained on single frames and captions (`crosstvr.train`, stage 1 with one frame
   per video), exported as a CLIPModel checkpoint. Like the public CLIP checkpoint of the paper, it is shared by all
   seeds (trained once, with its own fixed seed).
2. Conversion (`hub_scripts/convert_checkpoint.py`): CrossTVR with that CLIP as both the stage-1 towers and the frozen
   stage-2 tower, TS2-Net token shift and selection as stage 1, a tiny Q-Former.
3. Stage 1 on videos (`crosstvr.train --stage 1`).
4. Stage 2 from the token cache (`crosstvr.train --stage 2`) for the paper's ablation: spatial only, temporal only,
   both with shared and with separate parameters.
5. Evaluation on the held-out test split (`crosstvr.evaluation`): stage 1 alone, each variant at K = 5, and R@1/5/10
   against the re-ranking depth K = 2..19 for the full model.

Every seed reruns steps 2-5 (the data and the image encoder are fixed); the tables report mean +- standard deviation
over seeds (and the validation split's numbers, which are what the settings were chosen on) and go to
`<output>/results.md`, `results.json` and `depth_sweep.png`. `--ship-default` copies the first seed's full model, with
a model card, to `crosstvr/default_checkpoint/` (the embedded default). `--smoke` runs the whole recipe at toy sizes.
"""

import argparse
import importlib.util
import json
import logging
import os
import shutil
import statistics
import sys
import time

import torch


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
logger = logging.getLogger("synthetic_benchmark")

VARIANTS = {
    "spatial": {"fine_attention": "spatial"},
    "temporal": {"fine_attention": "temporal"},
    "shared": {"fine_attention": "spatial_temporal", "share_spatial_temporal": True},
    "separate": {"fine_attention": "spatial_temporal", "share_spatial_temporal": False},
}
ROW_NAMES = {
    "stage1": "Stage 1 (TS2-Net)",
    "spatial": "+ spatial only",
    "temporal": "+ temporal only",
    "shared": "+ spatial & temporal, shared (CrossTVR)",
    "separate": "+ spatial & temporal, separate",
}
DEPTHS = list(range(2, 20))
EVAL_TOP_K = 5

# Sizes and schedules: the full recipe and the smoke test's.
SETTINGS = {
    "full": {"groups": (150, 25, 50), "pretrain_steps": 400, "stage1_epochs": 4, "stage2_epochs": 2, "batch": 32},
    "smoke": {"groups": (4, 1, 2), "pretrain_steps": 4, "stage1_epochs": 1, "stage2_epochs": 1, "batch": 8},
}
PRETRAIN_SEED = 1234


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "hub_scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train(output_dir: str, data: str, batch: int, **options) -> str:
    """`crosstvr.training.train` on the benchmark's data, with a global batch of `batch` on one process."""
    from crosstvr.training import TrainingArguments, train

    arguments = TrainingArguments(
        **{
            "annotations_dir": os.path.join(data, "annotations"),
            "videos_dir": os.path.join(data, "videos"),
            "output_dir": output_dir,
            "dataset": "msvd",
            "dataset_cache_dir": os.path.join(data, "rows"),
            "num_workers": 0,
            "save_steps": 10**9,
            "logging_steps": 10,
            "do_eval": False,
            "batch_size": batch,
            "per_device_batch_size": batch,
            **options,
        }
    )
    return train(arguments)


def pretrain_image_encoder(work: str, data: str, settings: dict, seed: int = PRETRAIN_SEED) -> str:
    """A tiny CLIP trained on (single frame, caption) pairs, saved as a CLIPModel checkpoint with its preprocessors."""
    from transformers import CLIPConfig, CLIPModel

    from crosstvr import CrossTVRModel
    from crosstvr.default_model import build_tiny_config, build_tiny_processor
    from crosstvr.training import PRETRAINED_STAGE_ONE_MODULES

    processor = build_tiny_processor(num_frames=1)
    start = os.path.join(work, "pretrain-start")
    torch.manual_seed(seed)
    CrossTVRModel(build_tiny_config(processor, temporal_aggregator="mean")).save_pretrained(start)
    processor.save_pretrained(start)
    trained = _train(
        os.path.join(work, "pretrain"),
        data,
        model_name_or_path=start,
        stage=1,
        seed=seed,
        max_steps=settings["pretrain_steps"],
        batch=settings["batch"],
        learning_rate=3e-4,
        pretrained_lr_scale=1.0,
        warmup_ratio=0.05,
        num_workers=2,
    )
    # Stage 1 with one frame and mean pooling is CLIP: same modules, same names.
    model = CrossTVRModel.from_pretrained(trained)
    config = CLIPConfig(
        text_config=model.config.text_config.to_dict(),
        vision_config=model.config.vision_config.to_dict(),
        projection_dim=model.config.projection_dim,
    )
    clip = CLIPModel(config)
    clip.load_state_dict(
        {k: v for k, v in model.state_dict().items() if k.split(".")[0] in PRETRAINED_STAGE_ONE_MODULES}, strict=True
    )
    clip_dir = os.path.join(work, "clip")
    clip.save_pretrained(clip_dir)
    processor.tokenizer.save_pretrained(clip_dir)
    processor.image_processor.save_pretrained(clip_dir)
    processor.qformer_tokenizer.save_pretrained(os.path.join(work, "bert"))
    return clip_dir


def convert(work: str, clip_dir: str, seed: int) -> str:
    """CrossTVR from the pre-trained CLIP (both towers) and a new tiny Q-Former, via the Hub conversion script."""
    from crosstvr.default_model import MAX_TEXT_LENGTH, NUM_FRAMES, build_tiny_config, build_tiny_processor

    tiny = build_tiny_config(build_tiny_processor())
    os.makedirs(work, exist_ok=True)
    qformer_config = os.path.join(work, "qformer.json")
    with open(qformer_config, "w") as file:
        keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "cross_attention_frequency",
                "max_position_embeddings", "hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range")
        json.dump({key: getattr(tiny.qformer_config, key) for key in keys}, file)
    output = os.path.join(work, "converted")
    status = _load_script("convert_checkpoint").main(
        [
            "--clip", clip_dir, "--qformer-tokenizer", os.path.join(os.path.dirname(clip_dir), "bert"),
            "--qformer-config", qformer_config, "--output", output, "--temporal-aggregator", "token_shift_select",
            "--temporal-layers", "2", "--temporal-positions", "64", "--num-frames", str(NUM_FRAMES),
            "--max-text-length", str(MAX_TEXT_LENGTH), "--num-query-tokens", str(tiny.num_query_tokens),
            "--seed", str(seed),
        ]
    )
    if status != 0:
        raise RuntimeError("the conversion failed")
    # The tiny geometry's remaining settings (its selection, re-ranking depth and initialisation scale).
    config_path = os.path.join(output, "config.json")
    with open(config_path) as file:
        config = json.load(file)
    for key in ("num_selected_tokens", "token_selection_num_samples", "initializer_range"):
        config[key] = getattr(tiny, key)
    config["rerank_top_k"] = EVAL_TOP_K
    with open(config_path, "w") as file:
        json.dump(config, file, indent=2)
    return output


def variant_checkpoint(stage1_dir: str, output: str, overrides: dict, seed: int) -> str:
    """The stage-1 model with a newly initialised fine module of the given configuration."""
    from crosstvr import CrossTVRConfig, CrossTVRModel, CrossTVRProcessor
    from crosstvr.training import FINE_MODULES

    trained = CrossTVRModel.from_pretrained(stage1_dir)
    config = CrossTVRConfig(**{**trained.config.to_dict(), **overrides})
    torch.manual_seed(seed)
    model = CrossTVRModel(config)
    stage_one = {k: v for k, v in trained.state_dict().items() if k.split(".")[0] not in FINE_MODULES}
    missing = model.load_state_dict(stage_one, strict=False).missing_keys
    assert all(key.split(".")[0] in FINE_MODULES for key in missing), missing
    model.save_pretrained(output)
    CrossTVRProcessor.from_pretrained(stage1_dir).save_pretrained(output)
    return output


def evaluate(model_dir: str, data: str, split: str, depths: list[int] | None = None) -> dict:
    """Stage 1 and the two stages (K = 5) on `split`; with `depths`, the re-ranking depth sweep too."""
    from crosstvr import CrossTVRModel, CrossTVRProcessor
    from crosstvr.data import load_msvd
    from crosstvr.evaluation import encode_split, evaluate_retrieval, rerank_depth_sweep

    model = CrossTVRModel.from_pretrained(model_dir).eval()
    processor = CrossTVRProcessor.from_pretrained(model_dir)
    rows = load_msvd(os.path.join(data, "annotations"), os.path.join(data, "videos"), splits=[split],
                     cache_dir=os.path.join(data, "rows"))[split]
    encoded = encode_split(model, processor, rows, progress=False)
    evaluation = evaluate_retrieval(model, processor, rows, top_k=EVAL_TOP_K, progress=False, encoded=encoded)
    result = {"evaluation": evaluation}
    if depths:
        similarity = encoded.text_embeds @ encoded.video_embeds.t()
        result["depths"] = rerank_depth_sweep(model, encoded, similarity, depths, progress=False)
    return result


def run_seed(output: str, data: str, clip_dir: str, seed: int, settings: dict) -> dict:
    """Steps 2-5 for one seed, from the shared pre-trained image encoder."""
    work = os.path.join(output, f"seed-{seed}")
    timings = {}
    converted = convert(work, clip_dir, seed)
    started = time.perf_counter()
    stage1 = _train(
        os.path.join(work, "stage1"),
        data,
        model_name_or_path=converted,
        stage=1,
        seed=seed,
        num_train_epochs=settings["stage1_epochs"],
        batch=settings["batch"],
        learning_rate=3e-4,
        pretrained_lr_scale=0.3,
        num_workers=2,
    )
    timings["stage1"] = time.perf_counter() - started
    results = {"timings": timings, "variants": {}, "val": {}}
    token_cache = os.path.join(work, "token_cache")
    for name, overrides in VARIANTS.items():
        started = time.perf_counter()
        start = variant_checkpoint(stage1, os.path.join(work, f"{name}-start"), overrides, seed)
        final = _train(
            os.path.join(work, name),
            data,
            model_name_or_path=start,
            stage=2,
            seed=seed,
            token_cache_dir=token_cache,
            num_train_epochs=settings["stage2_epochs"],
            batch=settings["batch"],
            learning_rate=5e-4,
        )
        timings[f"stage2-{name}"] = time.perf_counter() - started
        started = time.perf_counter()
        tested = evaluate(final, data, "test", DEPTHS if name == "shared" else None)
        validated = evaluate(final, data, "val")["evaluation"].metrics
        timings[f"eval-{name}"] = time.perf_counter() - started
        metrics = tested["evaluation"].metrics
        results["stage1"], results["val"]["stage1"] = metrics["stage1"], validated["stage1"]
        results["variants"][name], results["val"][name] = metrics["two_stage"], validated["two_stage"]
        if name == "shared":
            results["depths"] = {str(depth): values for depth, values in tested["depths"].items()}
            results["final_model"] = final
            results["evaluation"] = tested["evaluation"]
    return results


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(per_seed: dict[int, dict]) -> dict:
    rows = {"stage1": [r["stage1"] for r in per_seed.values()]}
    rows.update({name: [r["variants"][name] for r in per_seed.values()] for name in VARIANTS})
    table = {
        name: {metric: _mean_std([run[metric] for run in runs]) for metric in runs[0]} for name, runs in rows.items()
    }
    depths = {
        depth: {metric: _mean_std([r["depths"][str(depth)][metric] for r in per_seed.values()])
                for metric in ("t2v_R1", "t2v_R5", "t2v_R10")}
        for depth in DEPTHS
    }
    gains = [r["variants"]["shared"]["t2v_R1"] - r["stage1"]["t2v_R1"] for r in per_seed.values()]
    spread = max(table["stage1"]["t2v_R1"][1], table["shared"]["t2v_R1"][1])
    return {"table": table, "depths": depths, "t2v_R1_gain": _mean_std(gains), "seed_spread": spread}


def format_markdown(summary: dict, per_seed: dict, settings: dict, minutes: float) -> str:
    columns = ("t2v_R1", "t2v_R5", "t2v_R10", "t2v_MdR", "v2t_R1", "v2t_R5", "v2t_R10")
    headers = ("T2V R@1", "R@5", "R@10", "MdR", "V2T R@1", "R@5", "R@10")
    lines = [
        f"Synthetic fine-grained benchmark, test split ({settings['groups'][2] * 4} videos), "
        f"mean ± std over seeds {sorted(per_seed)}; stage 2 re-ranks the top K = {EVAL_TOP_K}.",
        "",
        "| | " + " | ".join(headers) + " |",
        "| --- |" + " --- |" * len(headers),
    ]
    for name, label in ROW_NAMES.items():
        values = summary["table"][name]
        lines.append(f"| {label} | " + " | ".join(f"{values[c][0]:.1f} ± {values[c][1]:.1f}" for c in columns) + " |")
    gain, gain_std = summary["t2v_R1_gain"]
    lines += [
        "",
        f"Text-to-video R@1 gain of the re-ranker over stage 1: {gain:+.1f} ± {gain_std:.1f} points "
        f"(largest seed spread of the two rows: {summary['seed_spread']:.1f}).",
        "",
        "R@k against the re-ranking depth K (CrossTVR, shared):",
        "",
        "| K | T2V R@1 | R@5 | R@10 |",
        "| --- | --- | --- | --- |",
    ]
    for depth, values in summary["depths"].items():
        lines.append(f"| {depth} | " + " | ".join(f"{values[m][0]:.1f} ± {values[m][1]:.1f}"
                                             for m in ("t2v_R1", "t2v_R5", "t2v_R10")) + " |")
    lines += ["", f"Wall time: {minutes:.1f} min."]
    return "\n".join(lines) + "\n"


def plot_depths(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    depths = list(summary["depths"])
    for metric, label in (("t2v_R1", "R@1"), ("t2v_R5", "R@5"), ("t2v_R10", "R@10")):
        means = [summary["depths"][d][metric][0] for d in depths]
        stds = [summary["depths"][d][metric][1] for d in depths]
        axis.plot(depths, means, marker="o", label=label)
        axis.fill_between(depths, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)], alpha=0.2)
        stage1 = summary["table"]["stage1"][metric][0]
        axis.axhline(stage1, linestyle="--", linewidth=1, color=axis.lines[-1].get_color())
    axis.set_xlabel("re-ranking depth K")
    axis.set_ylabel("text-to-video recall (%)")
    axis.set_title("CrossTVR on the synthetic benchmark (dashed: stage 1)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def ship_default(result: dict, output: str) -> str:
    """Copy a full model into crosstvr/default_checkpoint with its results and model card."""
    from crosstvr.default_model import DEFAULT_CHECKPOINT
    from crosstvr.evaluation.report import write_results

    staging = DEFAULT_CHECKPOINT + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(result["final_model"], staging)
    results_path = os.path.join(output, "evaluation_synthetic_test.json")
    write_results(results_path, result["evaluation"], model="crosstvr embedded default", dataset="synthetic",
                  split="test")
    card = _load_script("make_model_card").build_card(
        staging,
        "crosstvr/embedded-default",
        [results_path],
        variant="base",
        base_models=[],
        training=(
            "Trained by `python benchmarks/synthetic_benchmark.py --ship-default` (seed 0) on the synthetic "
            "fine-grained benchmark of `crosstvr.synthetic` (600 training videos): a tiny CLIP pre-trained on single "
            "frames and captions, converted to CrossTVR, stage 1 on videos, stage 2 from the token cache."
        ),
        limitations="It knows only the synthetic scenes' vocabulary and world (coloured shapes on grey, 64 px); it "
        "is a demonstration model, not a general video retriever.",
    )
    card.save(os.path.join(staging, "README.md"))
    shutil.copy(results_path, os.path.join(staging, "evaluation_synthetic_test.json"))
    for folder, _, names in os.walk(staging):  # files written atomically are private (0600); installed data is not
        os.chmod(folder, 0o755)
        for name in names:
            os.chmod(os.path.join(folder, name), 0o644)
    shutil.rmtree(DEFAULT_CHECKPOINT, ignore_errors=True)
    os.replace(staging, DEFAULT_CHECKPOINT)
    return DEFAULT_CHECKPOINT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/synthetic", help="working folder and reports")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--smoke", action="store_true", help="toy sizes and one epoch per step")
    parser.add_argument("--ship-default", action="store_true", help="install the first seed's model as the default")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    settings = SETTINGS["smoke" if args.smoke else "full"]
    started = time.perf_counter()
    os.makedirs(args.output, exist_ok=True)
    data = os.path.join(args.output, "data")
    if not os.path.exists(os.path.join(data, "annotations", "test_list.txt")):
        from crosstvr.synthetic import write_benchmark

        write_benchmark(data, seed=0, groups=settings["groups"])
    clip_dir = os.path.join(args.output, "image-encoder", "clip")
    if not os.path.exists(os.path.join(clip_dir, "model.safetensors")):
        started_pretraining = time.perf_counter()
        pretrain_image_encoder(os.path.join(args.output, "image-encoder"), data, settings)
        logger.info("image encoder pre-trained in %.0f s", time.perf_counter() - started_pretraining)
    per_seed = {}
    for seed in args.seeds:
        logger.info("seed %d", seed)
        per_seed[seed] = run_seed(args.output, data, clip_dir, seed, settings)
        logger.info("seed %d: stage 1 R@1 %.1f, CrossTVR R@1 %.1f; %s", seed, per_seed[seed]["stage1"]["t2v_R1"],
                    per_seed[seed]["variants"]["shared"]["t2v_R1"],
                    {k: round(v) for k, v in per_seed[seed]["timings"].items()})
    summary = summarise(per_seed)
    minutes = (time.perf_counter() - started) / 60
    markdown = format_markdown(summary, per_seed, settings, minutes)
    with open(os.path.join(args.output, "results.md"), "w") as file:
        file.write(markdown)
    report = {
        "settings": settings,
        "minutes": minutes,
        "summary": summary,
        "per_seed": {seed: {k: v for k, v in r.items() if k not in ("evaluation", "final_model")}
                     for seed, r in per_seed.items()},
    }
    with open(os.path.join(args.output, "results.json"), "w") as file:
        json.dump(report, file, indent=1)
    plot_depths(summary, os.path.join(args.output, "depth_sweep.png"))
    print(markdown)
    print(json.dumps({"benchmark": "synthetic", "minutes": round(minutes, 2),
                      "t2v_R1_stage1": summary["table"]["stage1"]["t2v_R1"],
                      "t2v_R1_crosstvr": summary["table"]["shared"]["t2v_R1"],
                      "t2v_R1_gain": summary["t2v_R1_gain"], "seed_spread": summary["seed_spread"]}))
    if args.ship_default:
        print(f"embedded default written to {ship_default(per_seed[args.seeds[0]], args.output)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
