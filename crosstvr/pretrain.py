"""Image-text pre-training: `python -m crosstvr.pretrain --task {contrastive,qformer} [options]`.

The vision towers CLIP-style and the Q-Former BLIP-2-style, on any LAVIS-format image-caption file (see
`crosstvr.pretraining`). Besides this module's options (`--task`, `--model_name_or_path`, `--train_file`,
`--image_root`, `--images_per_group`, ...), every option of transformers' `TrainingArguments` applies; `--help` lists
them all. The same command runs under `accelerate launch -m crosstvr.pretrain ...`.

    # BLIP-2's first stage over a frozen tower, with batches of near-duplicate frames and a curriculum of negatives
    python -m crosstvr.pretrain --task qformer --model_name_or_path blip2-start --train_file frame_captions.json \\
        --image_root data --images_per_group 4 --uniform_negative_steps 300 --output_dir blip2-itm \\
        --per_device_train_batch_size 64 --max_steps 1500 --learning_rate 1e-3
"""

import logging
import sys

from transformers import HfArgumentParser, TrainingArguments

from .pretraining import PretrainingArguments, pretrain


def parse_arguments(argv: list[str] | None = None) -> tuple[PretrainingArguments, TrainingArguments]:
    parser = HfArgumentParser((PretrainingArguments, TrainingArguments))
    return parser.parse_args_into_dataclasses(args=sys.argv[1:] if argv is None else argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    output_dir = pretrain(*parse_arguments(argv))
    logging.getLogger(__name__).info("pre-trained model written to %s", output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
