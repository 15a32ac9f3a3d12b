"""Train CrossTVR: `python -m crosstvr.train [--config FILE.yaml|json] [--option value ...]`.

The same command runs on several processes with `accelerate launch -m crosstvr.train ...`. A config file gives
defaults that command-line options override; `--help` lists every option (`crosstvr.training.TrainingArguments`).

    # stage 1 on MSR-VTT 9k, then stage 2 from its result (the token cache is built first, resumably)
    python -m crosstvr.train --dataset msrvtt --annotations_dir A --videos_dir V --output_dir runs/s1
    python -m crosstvr.train --stage 2 --model_name_or_path runs/s1/final --dataset msrvtt \\
        --annotations_dir A --videos_dir V --output_dir runs/s2
"""

import argparse
import json
import logging
import sys

from transformers import HfArgumentParser

from .training import TrainingArguments, train


def parse_arguments(argv: list[str] | None = None) -> TrainingArguments:
    argv = sys.argv[1:] if argv is None else argv
    parser = HfArgumentParser(TrainingArguments)
    parser.add_argument("--config", help="YAML or JSON file of option defaults")
    # The config file is read first, since it may supply required options.
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument("--config")
    known, _ = config_parser.parse_known_args(argv)
    if known.config:
        with open(known.config, encoding="utf-8") as file:
            if known.config.endswith((".yaml", ".yml")):
                import yaml

                defaults = yaml.safe_load(file)
            else:
                defaults = json.load(file)
        unknown = set(defaults) - {action.dest for action in parser._actions}
        if unknown:
            raise SystemExit(f"{known.config}: unknown option(s) {sorted(unknown)}")
        parser.set_defaults(**defaults)
        # Options given in the file are no longer required on the command line.
        for action in parser._actions:
            if action.dest in defaults:
                action.required = False
    (args,) = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=False)[:1]
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    final_dir = train(parse_arguments(argv))
    logging.getLogger(__name__).info("final model written to %s", final_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
