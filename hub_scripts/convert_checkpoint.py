"""Build a CrossTVR checkpoint from a CLIP checkpoint and, optionally, a BLIP-2 image-text matching checkpoint.

    python hub_scripts/convert_checkpoint.py --clip openai/clip-vit-base-patch32 \\
        --blip2 Salesforce/blip2-itm-vit-g --output crosstvr-base [--temporal-aggregator token_shift_select] \\
        [--preset didemo]

What comes from where (every weight of the new model is listed in the printed table and in
`<output>/conversion_report.json`: loaded from CLIP, loaded from BLIP-2, or newly initialised, with the reason):

- CLIP: the stage-1 text and vision towers, both projections and the temperature; the stage-2 tower when it is CLIP
  (`--stage2-tower clip`, the paper's Base); CLIP4Clip's initialisation of the temporal transformer (its first layers
  and position embeddings from the CLIP text tower).
- BLIP-2 ITM: the query tokens, the Q-Former and its text embeddings (to both Q-Formers when they are not shared), the
  image-text matching head as the matching head, and BLIP-2's EVA ViT-g tower as the stage-2 tower with
  `--stage2-tower blip2` (the paper's Large). The cross-attention keys and values of the Q-Former expect the BLIP-2
  tower's width (1408). With a CLIP stage-2 tower of another width (the paper's Base: ViT-B/32, 768),
  `--cross-attention reinitialise` (default) re-initialises them; `--cross-attention project` keeps them and adds a
  learned projection of the tower's tokens to 1408 (`fine_vision_projection`, orthonormal columns scaled to keep
  each coordinate's variance). The paper says only that the cross-attention is initialised from BLIP-2; the default
  keeps the previous behaviour because nothing here measured which start trains better on real videos. BLIP-2's
  contrastive projections are not used.
- New: the token selectors and the frame position embeddings (zero, or drawn from N(0, std) with
  `--frame-position-init-std std`: `frame_position_embeddings_init_std`).

`--similarity-head text_conditioned` gives stage 1 TS2-Net's released similarity (a text against every frame, pooled
by a softmax over the frames; nothing new to initialise); `--similarity-head cret` gives CRET's (global cosine plus
the local similarity of features its learnable query centres gather from the patch and word tokens; the centres and
their attention are new). `--fine-module t2v2t` builds T2V2T fusion as the fine module instead of CrossTVR's decoupled attention (`--naive-t2v2t`
for its no-bypass ablation). From BLIP-2 it takes the Q-Former, its text embeddings and the matching head (as for
CrossTVR, less the query tokens, which T2V2T has none of); the text-to-video fusion block (its text projection,
cross-attention and feed-forward at the stage-2 tower's width) is new, and its frame embeddings start at zero.

Without `--blip2`, the fine module is newly initialised (BLIP-2's geometry, or `--qformer-config`) and
`--qformer-tokenizer` names the BERT tokenizer to use.
Shapes that cannot be reconciled (other than those documented re-initialisations) stop the conversion with an error.
Memory: the model is built on the meta device and takes the loaded checkpoints' tensors without copying them (see
`build_model`), so the Large conversion holds CLIP, BLIP-2 and the new weights, not a third full copy.
"""

import argparse
import json
import os
import sys

import torch


# The paper's settings per benchmark: 12 frames and 32 words, but 64 and 64 for DiDeMo's paragraphs. The temporal
# transformer of TS2-Net's stage 1 needs frames x (1 + 3 selected patches) positions.
PRESETS = {
    "default": {"num_frames": 12, "max_text_length": 32, "temporal_positions": 128},
    "didemo": {"num_frames": 64, "max_text_length": 64, "temporal_positions": 256},
}


def _load_clip(name_or_path: str):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    return (
        CLIPModel.from_pretrained(name_or_path),
        AutoTokenizer.from_pretrained(name_or_path),
        AutoImageProcessor.from_pretrained(name_or_path),
    )


def _load_blip2(name_or_path: str):
    from transformers import AutoTokenizer, Blip2ForImageTextRetrieval

    return Blip2ForImageTextRetrieval.from_pretrained(name_or_path), AutoTokenizer.from_pretrained(name_or_path)


def build_config(clip, blip2, args, qformer_tokenizer):
    """A CrossTVRConfig whose towers follow the given checkpoints."""
    from transformers import Blip2QFormerConfig, CLIPTextConfig

    from crosstvr import CrossTVRConfig

    if args.stage2_tower == "blip2" and blip2 is None:
        raise ValueError("--stage2-tower blip2 takes BLIP-2's vision tower: give --blip2")
    text_config = clip.config.text_config
    if args.max_text_length > text_config.max_position_embeddings:
        raise ValueError(
            f"--max-text-length {args.max_text_length} exceeds the {text_config.max_position_embeddings} positions of "
            "the CLIP text tower"
        )
    if args.temporal_aggregator != "mean" and args.temporal_layers > text_config.num_hidden_layers:
        raise ValueError(
            f"--temporal-layers {args.temporal_layers} exceeds the {text_config.num_hidden_layers} layers of the CLIP "
            "text tower that initialise them"
        )
    if args.temporal_aggregator != "mean" and text_config.hidden_size != clip.config.projection_dim:
        raise ValueError(
            f"the CLIP text tower is {text_config.hidden_size} wide but its projection {clip.config.projection_dim}: "
            "CLIP4Clip's temporal transformer (on projected frames) cannot start from the text tower's layers"
        )
    # CLIP4Clip's seqTransf: text-tower layers running on projected frame embeddings.
    temporal_config = CLIPTextConfig(
        hidden_size=text_config.hidden_size,
        intermediate_size=text_config.intermediate_size,
        num_hidden_layers=args.temporal_layers,
        num_attention_heads=text_config.num_attention_heads,
        max_position_embeddings=args.temporal_positions,
        hidden_act=text_config.hidden_act,
        layer_norm_eps=text_config.layer_norm_eps,
    )
    if blip2 is not None:
        qformer_config = blip2.config.qformer_config.to_dict()
        num_query_tokens = blip2.config.num_query_tokens
    else:
        # A new Q-Former: BLIP-2's geometry unless --qformer-config says otherwise, the tokenizer's vocabulary.
        overrides = {}
        if args.qformer_config:
            with open(args.qformer_config, encoding="utf-8") as file:
                overrides = json.load(file)
        qformer_config = Blip2QFormerConfig(
            use_qformer_text_input=True,
            **{
                "vocab_size": len(qformer_tokenizer),
                "pad_token_id": qformer_tokenizer.pad_token_id,
                **overrides,
            },
        ).to_dict()
        num_query_tokens = args.num_query_tokens
    if args.stage2_tower == "blip2":
        fine_vision_config = blip2.config.vision_config.to_dict()
        if fine_vision_config["image_size"] != clip.config.vision_config.image_size:
            raise ValueError(
                f"the BLIP-2 tower takes {fine_vision_config['image_size']} px frames and the CLIP tower "
                f"{clip.config.vision_config.image_size} px; both read the same frames"
            )
    else:
        fine_vision_config = None  # a copy of the CLIP vision tower
    fine_width = (fine_vision_config or clip.config.vision_config.to_dict())["hidden_size"]
    project = blip2 is not None and args.cross_attention == "project" and fine_width != qformer_config["encoder_hidden_size"]
    return CrossTVRConfig(
        fine_vision_projection=project,
        text_config=text_config.to_dict(),
        vision_config=clip.config.vision_config.to_dict(),
        qformer_config=qformer_config,
        temporal_config=temporal_config.to_dict(),
        fine_vision_config=fine_vision_config,
        share_vision_tower=args.share_vision_tower,
        projection_dim=clip.config.projection_dim,
        logit_scale_init_value=float(clip.logit_scale.item()),
        num_frames=args.num_frames,
        temporal_aggregator=args.temporal_aggregator,
        similarity_head=args.similarity_head,
        num_query_tokens=num_query_tokens,
        share_spatial_temporal=not args.separate_temporal_qformer,
        fine_module=args.fine_module,
        t2v2t_bypass=not args.naive_t2v2t,
        frame_position_embeddings_init_std=args.frame_position_init_std,
    )


# The fine module's parts that a Blip2ForImageTextRetrieval initialises, and its names for them (both of CrossTVR's
# Q-Formers start as BLIP-2's; T2V2T runs BLIP-2's stack for its text and video-to-text passes).
BLIP2_PARTS = {
    "query_tokens": "query_tokens",
    "matching_head": "itm_head",
    "qformer": "qformer",
    "temporal_qformer": "qformer",
    "qformer_embeddings": "embeddings",
    "temporal_qformer_embeddings": "embeddings",
}


def source_map(model, clip, blip2, args) -> dict[str, tuple[str, torch.Tensor | None]]:
    """For every parameter of the new model: (where it comes from, the tensor to load or None to keep the init)."""
    clip_state, blip2_state = clip.state_dict(), blip2.state_dict() if blip2 is not None else {}
    target = model.state_dict()
    sources = {}

    def take(name: str, origin: str, state: dict, key: str):
        tensor = state[key]
        if tensor.shape != target[name].shape:
            raise ValueError(
                f"cannot load {origin}:{key} {tuple(tensor.shape)} into {name} {tuple(target[name].shape)}; the "
                "configurations disagree"
            )
        sources[name] = (f"{origin}:{key}", tensor)

    for name in target:
        top, _, rest = name.partition(".")
        part, _, part_rest = rest.partition(".")  # within the fine module
        if top in ("text_model", "vision_model", "text_projection", "visual_projection", "logit_scale"):
            take(name, "clip", clip_state, name)
        elif top == "fine_vision_model":
            if args.stage2_tower == "clip":
                take(name, "clip", clip_state, f"vision_model.{rest}")
            else:
                take(name, "blip2", blip2_state, f"vision_model.{rest}")
        elif top == "temporal_aggregator" and ".temporal_transformer.encoder." in name:
            # CLIP4Clip: the temporal transformer starts as the first layers of the CLIP text tower.
            take(name, "clip", clip_state, "text_model.encoder." + name.split(".temporal_transformer.encoder.")[1])
        elif name.endswith("temporal_transformer.position_embeddings.weight"):
            # The first rows (a prefix tensor, shorter than the target: see `build_model`), the rest initialised.
            clip_positions = clip_state["text_model.embeddings.position_embedding.weight"]
            rows = min(len(clip_positions), target[name].shape[0])
            origin = f"clip:text_model.embeddings.position_embedding.weight[:{rows}] (rest new)"
            sources[name] = (origin, clip_positions[:rows])
        elif blip2 is not None and top == "fine_module" and part in BLIP2_PARTS:
            key = BLIP2_PARTS[part] + (f".{part_rest}" if part_rest else "")
            cross_attention_kv = ".crossattention.attention.key." in name or ".crossattention.attention.value." in name
            if cross_attention_kv and blip2_state[key].shape != target[name].shape:
                sources[name] = (
                    f"new: re-initialised, blip2:{key} is {tuple(blip2_state[key].shape)} for a "
                    f"{blip2_state[key].shape[-1]}-wide tower but the stage-2 tower is {target[name].shape[-1]} wide",
                    None,
                )
            else:
                take(name, "blip2", blip2_state, key)
        elif top == "fine_vision_projection":
            sources[name] = (
                f"new: projection of the {target[name].shape[-1]}-wide tower's tokens to the cross-attention's "
                f"{target[name].shape[0]} (orthonormal columns, scaled)" if name.endswith("weight") else "new: zeros",
                None,
            )
        else:
            zeros = name.endswith(("frame_position_embeddings", "frame_embeddings"))  # zero-initialised in the model
            if name.endswith("frame_position_embeddings") and args.frame_position_init_std > 0:
                zeros = False
            sources[name] = ("new: initialised (" + ("zeros" if zeros else "random") + ")", None)
    return sources


def build_model(config, clip, blip2, args):
    """
    The CrossTVR model with its weights taken from `clip` and `blip2` (sharing their storage: no copy) and the rest
    initialised with `args.seed`, and the source map. The model is built on the meta device and loaded with
    `from_pretrained(state_dict=...)`, so that converting the Large model holds CLIP, BLIP-2 and only the new weights in
    memory, not a third full copy.
    """
    from crosstvr import CrossTVRModel

    with torch.device("meta"):
        shapes = CrossTVRModel(config)
    sources = source_map(shapes, clip, blip2, args)
    target = shapes.state_dict()
    state, used = {}, set()
    for name, (_, tensor) in sources.items():
        if tensor is not None:
            # A source feeding two weights (CLIP's vision tower as both towers, its text layers as the temporal
            # transformer) is copied for the second: they train apart.
            state[name] = tensor.clone() if tensor.untyped_storage().data_ptr() in used else tensor
            used.add(tensor.untyped_storage().data_ptr())
    prefixes = {name: state.pop(name) for name in list(state) if state[name].shape != target[name].shape}
    torch.manual_seed(args.seed)
    model = CrossTVRModel.from_pretrained(None, config=config, state_dict=state)
    with torch.no_grad():
        for name, rows in prefixes.items():
            model.get_parameter(name)[: len(rows)] = rows
    return model, sources


def convert(args) -> dict:
    from transformers import AutoTokenizer

    from crosstvr import CrossTVRProcessor

    if not args.blip2 and not args.qformer_tokenizer:
        raise ValueError("without --blip2, give --qformer-tokenizer (a BERT tokenizer, e.g. bert-base-uncased)")
    clip, clip_tokenizer, image_processor = _load_clip(args.clip)
    if args.blip2:
        blip2, qformer_tokenizer = _load_blip2(args.blip2)
    else:
        blip2, qformer_tokenizer = None, AutoTokenizer.from_pretrained(args.qformer_tokenizer)
    config = build_config(clip, blip2, args, qformer_tokenizer)
    model, sources = build_model(config, clip, blip2, args)

    processor = CrossTVRProcessor(
        image_processor, clip_tokenizer, qformer_tokenizer, num_frames=args.num_frames, max_text_length=args.max_text_length
    )
    model.save_pretrained(args.output)
    processor.save_pretrained(args.output)
    report = {
        "clip": args.clip,
        "blip2": args.blip2,
        "weights": {name: origin for name, (origin, _) in sources.items()},
    }
    with open(os.path.join(args.output, "conversion_report.json"), "w", encoding="utf-8") as file:
        json.dump(report, file, indent=1)
    return report


def format_report(report: dict) -> str:
    """The table of every weight and its source, and the counts."""
    lines = [f"{'weight':<72} source"]
    for name, origin in report["weights"].items():
        lines.append(f"{name:<72} {origin}")
    loaded = sum(not origin.startswith("new") for origin in report["weights"].values())
    lines.append(f"{loaded} weights loaded, {len(report['weights']) - loaded} newly initialised")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip", required=True, help="CLIP checkpoint (folder or Hub id)")
    parser.add_argument("--blip2", help="BLIP-2 image-text matching checkpoint (folder or Hub id)")
    parser.add_argument("--qformer-tokenizer", help="BERT tokenizer for the Q-Former when --blip2 is not given")
    parser.add_argument("--qformer-config", help="without --blip2: JSON of Blip2QFormerConfig options (e.g. a small "
                        "hidden_size / num_hidden_layers); default BLIP-2's geometry")
    parser.add_argument("--output", required=True, help="folder to write the CrossTVR checkpoint to")
    parser.add_argument("--stage2-tower", choices=("clip", "blip2"), default="clip",
                        help="the frozen stage-2 tower: CLIP's vision tower (Base) or BLIP-2's EVA tower (Large)")
    parser.add_argument("--share-vision-tower", action="store_true", help="stage 2 reads the stage-1 tower")
    parser.add_argument("--cross-attention", choices=("reinitialise", "project"), default="reinitialise",
                        help="when the stage-2 tower is narrower than BLIP-2's: re-initialise the cross-attention keys "
                        "and values, or keep them and learn a projection of the tower's tokens")
    parser.add_argument("--temporal-aggregator", default="token_shift_select",
                        choices=("mean", "transformer", "token_shift_select"))
    parser.add_argument("--similarity-head", choices=("mean", "text_conditioned", "cret"), default="mean",
                        help="stage 1: cosine with the mean of the frames, TS2-Net's text-conditioned softmax over "
                        "the frames' cosines (its released similarity), or CRET's global cosine plus its CCM local "
                        "similarity (trained with GEES)")
    parser.add_argument("--temporal-layers", type=int, default=4, help="layers of the temporal transformer")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="the paper's frames / words / temporal positions for a benchmark (explicit options win): "
                        + "; ".join(f"{name}: {values}" for name, values in PRESETS.items()))
    parser.add_argument("--temporal-positions", type=int, help="its position embeddings (default: the preset's)")
    parser.add_argument("--separate-temporal-qformer", action="store_true", help="do not share the Q-Former")
    parser.add_argument("--fine-module", choices=("crosstvr", "t2v2t"), default="crosstvr",
                        help="stage 2: CrossTVR's decoupled spatial/temporal attention or T2V2T fusion")
    parser.add_argument("--naive-t2v2t", action="store_true",
                        help="with --fine-module t2v2t: no bypass (the fusion's keys are the caption only)")
    parser.add_argument("--num-query-tokens", type=int, default=32, help="without --blip2")
    parser.add_argument("--num-frames", type=int, help="frames per video (default: the preset's)")
    parser.add_argument("--max-text-length", type=int, help="tokens per caption (default: the preset's)")
    parser.add_argument("--frame-position-init-std", type=float, default=0.0,
                        help="std of the normal distribution CrossTVR's frame position embeddings P_t start from "
                        "(default 0: zeros)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the newly initialised weights")
    return parser


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with the preset's values for the options not given."""
    args = build_parser().parse_args(argv)
    for option, value in PRESETS[args.preset].items():
        if getattr(args, option) is None:
            setattr(args, option, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    if args.share_vision_tower and args.stage2_tower == "blip2":
        raise SystemExit("--share-vision-tower and --stage2-tower blip2 exclude each other")
    if args.naive_t2v2t and args.fine_module != "t2v2t":
        raise SystemExit("--naive-t2v2t is T2V2T's ablation: give --fine-module t2v2t with it")
    try:
        report = convert(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(format_report(report))
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
