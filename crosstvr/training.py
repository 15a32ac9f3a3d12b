"""Fine-tuning CrossTVR with `accelerate`: stage 1 (contrastive dual encoder) and stage 2 (the fine module).

Run with `python -m crosstvr.train ...` on one process, or unchanged with `accelerate launch -m crosstvr.train ...` on
several (see `crosstvr/train.py` for the command line and `TrainingArguments` for every option and its default).

- Stage 1 trains the CLIP towers (at `learning_rate * pretrained_lr_scale`, CLIP4Clip's coef_lr), the projections and
  the temporal aggregator on the symmetric InfoNCE loss; frames are decoded from the videos.
- Stage 2 freezes everything but the fine module (query tokens, Q-Former(s) and their text embeddings, token
  selector, frame positions, matching head) and trains it on the video-text matching loss with ALBEF hard negatives
  drawn from the stage-1 similarities of the batch. The frozen tower's tokens and the stage-1 video embeddings are read
  from a token cache built once (`crosstvr.token_cache`), so no video is decoded during stage-2 training.

The losses of a step are those of the whole global batch (`batch_size`, the paper's 128), however it is split over
processes and accumulated micro-batches, so that the gradients equal those of one device holding it. With one
micro-batch per step, the model's forward gathers the embeddings of all processes with gradient, draws the negatives
from the whole global batch with a generator seeded identically on every process, and each process scores the pairs
of its own rows. With accumulation, [`global_batch_backward`] does the same over all the step's micro-batches, by
gradient caching in stage 1.
"""

import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from accelerate.utils import DistributedType, gather_object, set_seed
from torch.utils.data import DataLoader, RandomSampler, Sampler
from tqdm.auto import tqdm

from .data import FORMATS, load_retrieval_dataset
from .data.transforms import VideoTextCollator, content_generator, rows_to_columns
from .modeling_crosstvr import (
    STAGE_TWO_TRAINABLE_MODULES,
    CrossTVRModel,
    all_gather_no_grad,
    listwise_matching_loss,
    matching_pair_inputs,
    sample_hard_negatives,
)
from .processing_crosstvr import CrossTVRProcessor
from .loading import load_model
from .token_cache import TokenCache, build_token_cache


logger = logging.getLogger(__name__)

# Stage-1 parameters that come from a pretrained CLIP and get the scaled-down learning rate (the temperature
# included: CLIP4Clip and TS2-Net train it as a CLIP weight).
PRETRAINED_STAGE_ONE_MODULES = ("text_model", "vision_model", "text_projection", "visual_projection", "logit_scale")
LORA_TARGETS = {
    "text": r"text_model\.encoder\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)",
    "qformer": r"fine_module\.(temporal_)?qformer\.encoder\.layer\.\d+\.(attention|crossattention)\.attention\."
    r"(query|key|value)",
}
HARD_NEGATIVES = ("in_batch", "stage1_top_k")
# The optimizer is AdamW. Stage 1 follows the code of TS2-Net (the paper's stage 1), whose BertAdam decays weights by
# 0.2, decoupled from the gradient; stage 2 is the paper's own training, "Adam" with lr 1e-4: AdamW without decay.
STAGE_WEIGHT_DECAY = {1: 0.2, 2: 0.0}
# What stays fully trainable beside the LoRA adapters, per stage.
LORA_MODULES_TO_SAVE = {
    1: ["text_projection", "visual_projection", "temporal_aggregator"],
    2: ["fine_module.token_selector", "fine_module.text_to_video_fusion", "fine_module.matching_head"],
}


@dataclass
class TrainingArguments:
    """Options of `python -m crosstvr.train`; defaults follow the paper (and CLIP4Clip / TS2-Net where it is silent)."""

    annotations_dir: str = field(metadata={"help": "folder with the benchmark's annotation files"})
    videos_dir: str = field(metadata={"help": "folder with the benchmark's videos (searched recursively)"})
    stage: int = field(default=1, metadata={"help": "1: contrastive stage-1 training; 2: the fine module"})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "checkpoint folder or Hub id to start from (default: the embedded default)"}
    )
    output_dir: str = field(default="outputs/crosstvr", metadata={"help": "checkpoints, logs and the final model"})
    dataset: str = field(default="msrvtt", metadata={"help": f"one of {sorted(FORMATS)}"})
    train_split: str | None = field(default=None, metadata={"help": "default: train_9k for msrvtt, train otherwise"})
    eval_split: str | None = field(default=None, metadata={"help": "evaluated after every epoch (default: test)"})
    do_eval: bool = field(default=True, metadata={"help": "evaluate after every epoch"})
    eval_top_k: int | None = field(default=None, metadata={"help": "re-ranking depth of the stage-2 evaluation"})
    on_bad_video: str = field(default="error", metadata={"help": "'error' or 'skip' missing / unreadable videos"})
    check_videos: bool = field(default=False, metadata={"help": "decode-check every video while loading"})
    dataset_cache_dir: str | None = field(default=None, metadata={"help": "Arrow cache of the dataset rows"})
    train_frame_sampling: str = field(default="random", metadata={"help": "'random' offsets in segments or 'center'"})
    token_cache_dir: str | None = field(
        default=None, metadata={"help": "stage 2: the token cache (default: <output_dir>/token_cache)"}
    )
    hard_negatives: str = field(
        default="in_batch",
        metadata={
            "help": "stage 2: 'in_batch' (ALBEF's negatives from the batch's stage-1 similarities, the paper) or "
            "'stage1_top_k' (also, for every caption, one negative video drawn from its stage-1 top K over the "
            "whole training split: the near duplicates re-ranking faces, which a random batch rarely holds)"
        },
    )
    hard_negatives_top_k: int = field(default=15, metadata={"help": "K of --hard_negatives stage1_top_k"})
    negatives_per_caption: int = field(
        default=1, metadata={"help": "--hard_negatives stage1_top_k: how many of the caption's top K, drawn without "
                             "replacement, join its pairs"}
    )
    neighbour_batches: int = field(
        default=0,
        metadata={
            "help": "stage 2: > 0 assembles every batch from blocks of this many captions of stage-1 neighbours (a "
            "caption, then one caption of each of its video's nearest videos in its stage-1 top K), so that ALBEF's "
            "in-batch negatives are the near duplicates re-ranking faces; 0: random batches (the paper)"
        },
    )
    listwise_loss_weight: float = field(
        default=0.0,
        metadata={
            "help": "--hard_negatives stage1_top_k: weight of the listwise loss that ranks each caption's video above "
            "its stage-1 negatives (localized contrastive estimation; 0: the paper's matching loss only)"
        },
    )
    num_train_epochs: float = field(default=5.0, metadata={"help": "epochs (TS2-Net: 5)"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps; overrides num_train_epochs when > 0"})
    batch_size: int = field(default=128, metadata={"help": "global batch per optimizer step (paper: 128)"})
    per_device_batch_size: int = field(
        default=32, metadata={"help": "micro-batch per process; batch_size / (this x processes) accumulation steps"}
    )
    learning_rate: float = field(default=1e-4, metadata={"help": "for the new modules (paper: 1e-4)"})
    pretrained_lr_scale: float = field(
        default=1e-3, metadata={"help": "stage 1: learning-rate factor of the pretrained CLIP towers (CLIP4Clip)"}
    )
    weight_decay: float | None = field(
        default=None,
        metadata={
            "help": "decoupled weight decay, not on biases / norms (default: 0.2 in stage 1, TS2-Net's BertAdam; 0 in "
            "stage 2, the paper's Adam)"
        },
    )
    warmup_ratio: float = field(default=0.1, metadata={"help": "fraction of the steps with linear warm-up"})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "a transformers scheduler name"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0: off)"})
    mixed_precision: str = field(default="no", metadata={"help": "'no', 'fp16' or 'bf16'"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "activation checkpointing of the layers"})
    lora_targets: list[str] = field(
        default_factory=list, metadata={"help": "LoRA instead of full fine-tuning: 'text' and/or 'qformer'"}
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    save_steps: int = field(default=500, metadata={"help": "save a resumable checkpoint every N optimizer steps"})
    save_total_limit: int = field(default=2, metadata={"help": "checkpoints to keep (0: all)"})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "'latest' or a checkpoint folder to continue exactly from"}
    )
    logging_steps: int = field(default=10, metadata={"help": "log every N optimizer steps"})
    report_to: list[str] = field(
        default_factory=list, metadata={"help": "extra accelerate trackers (tensorboard, wandb, ...); logs.jsonl always"}
    )
    seed: int = field(default=42, metadata={"help": "seed of initialisation, data order and sampling"})
    num_workers: int = field(default=2, metadata={"help": "DataLoader worker processes"})

    def __post_init__(self):
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage}")
        if self.dataset not in FORMATS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose from {sorted(FORMATS)}")
        unknown = set(self.lora_targets) - set(LORA_TARGETS)
        if unknown:
            raise ValueError(f"lora_targets {sorted(unknown)} unknown; choose from {sorted(LORA_TARGETS)}")
        if self.hard_negatives not in HARD_NEGATIVES:
            raise ValueError(f"hard_negatives must be one of {HARD_NEGATIVES}, got {self.hard_negatives!r}")
        if self.hard_negatives != "stage1_top_k" and self.listwise_loss_weight:
            raise ValueError("listwise_loss_weight needs --hard_negatives stage1_top_k (the negatives it ranks against)")
        if not 1 <= self.negatives_per_caption <= self.hard_negatives_top_k:
            raise ValueError(
                f"negatives_per_caption must be between 1 and hard_negatives_top_k={self.hard_negatives_top_k}, got "
                f"{self.negatives_per_caption}"
            )
        neighbour_range = range(2, self.hard_negatives_top_k + 2)  # a caption and up to K neighbours
        if self.neighbour_batches and (self.stage != 2 or self.neighbour_batches not in neighbour_range):
            raise ValueError(
                f"neighbour_batches={self.neighbour_batches} needs stage 2 and a value between 2 and "
                f"hard_negatives_top_k + 1 = {self.hard_negatives_top_k + 1} (a caption and its K neighbours)"
            )
        if self.train_frame_sampling not in ("random", "center"):
            raise ValueError("train_frame_sampling must be 'random' or 'center'")
        self.train_split = self.train_split or FORMATS[self.dataset].splits[0]
        self.eval_split = self.eval_split or FORMATS[self.dataset].splits[-1]
        self.token_cache_dir = self.token_cache_dir or os.path.join(self.output_dir, "token_cache")
        if self.weight_decay is None:
            self.weight_decay = STAGE_WEIGHT_DECAY[self.stage]


class JSONLinesTracker(GeneralTracker):
    """An `accelerate` tracker that appends every `accelerator.log` call to `<output_dir>/logs.jsonl`."""

    name = "jsonl"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    @property
    def tracker(self):
        return self

    def start(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)

    def store_init_configuration(self, values: dict):
        self._write({"config": values})

    def log(self, values: dict, step: int | None = None, **kwargs):
        self._write({"step": step, **values})

    def finish(self):
        pass

    def _write(self, record: dict):
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")


class CachedVideoTextCollator:
    """
    Stage-2 batches from the token cache: tokenized captions with the cached tokens and embeddings of their videos (no
    video is decoded). Rows with `negative_candidates` (cache indices, see [`stage_one_neighbours`]) also get
    `negatives_per_caption` of them, drawn uniformly without replacement, as `negative_vision_tokens`
    `(rows, negatives_per_caption, frames, tokens, width)` and `negative_video_mask`; the draw is seeded by `seed`,
    the epoch and the batch's content.
    """

    def __init__(self, processor: CrossTVRProcessor, cache: TokenCache, seed: int = 0, negatives_per_caption: int = 1):
        self.processor, self.cache, self.seed, self.epoch = processor, cache, seed, 0
        self.negatives_per_caption = negatives_per_caption

    def set_epoch(self, epoch: int) -> None:
        """Only the negatives' draw varies between epochs: the cache holds one fixed sampling per video."""
        self.epoch = epoch

    @staticmethod
    def _stack(entries: list[dict], prefix: str = "") -> dict[str, torch.Tensor]:
        return {f"{prefix}{key}": torch.stack([entry[key] for entry in entries]) for key in entries[0]}

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        columns = rows_to_columns(rows)
        batch = {
            **self.processor(text=columns["caption"]),
            **self._stack([self.cache[self.cache.index[path]] for path in columns["video_path"]]),
            "video_index": torch.tensor(columns["video_index"], dtype=torch.long),
        }
        if "negative_candidates" in columns:
            generator = content_generator(self.seed, self.epoch, columns)
            rows_of_entries = []
            for candidates in columns["negative_candidates"]:
                remaining, drawn = list(candidates), []
                for _ in range(self.negatives_per_caption):  # one at a time, without replacement
                    drawn.append(remaining.pop(int(torch.randint(len(remaining), (), generator=generator))))
                entries = [self.cache[video] for video in drawn]
                rows_of_entries.append(self._stack([{k: e[k] for k in ("vision_tokens", "video_mask")} for e in entries]))
            batch.update(self._stack(rows_of_entries, "negative_"))  # (rows, negatives, ...)
        return batch


@torch.no_grad()
def stage_one_neighbours(
    model: CrossTVRModel, processor: CrossTVRProcessor, rows, cache: TokenCache, top_k: int, chunk_size: int = 4096
) -> torch.Tensor:
    """
    For every training row (a caption), the cache indices of its stage-1 top-K videos other than its own: the
    candidates that re-ranking will put in front of stage 2 for that caption. `(rows, K)`, computed in chunks of
    captions so that the similarity matrix of a large split is never held whole.
    """
    from .evaluation import encode_texts

    video_embeds = cache.video_embeds().float()  # (videos, D) or (videos, T, D)
    top_k = min(top_k, len(video_embeds) - 1)
    if top_k < 1:
        raise ValueError("hard negatives from the stage-1 top K need at least two training videos")
    captions, own = list(rows["caption"]), torch.tensor([cache.index[path] for path in rows["video_path"]])
    neighbours = []
    for start in range(0, len(own), chunk_size):
        text_embeds = encode_texts(model, processor, captions[start : start + chunk_size], progress=False)[0]
        similarity = model.get_similarity(text_embeds.float(), video_embeds)  # (chunk, videos)
        similarity[torch.arange(len(similarity)), own[start : start + chunk_size]] = float("-inf")
        neighbours.append(similarity.topk(top_k, dim=1).indices)
    return torch.cat(neighbours)


class StageOneNeighbourSampler(Sampler[int]):
    """
    Training rows in blocks of stage-1 neighbours: an anchor row drawn at random, then, for each of its `neighbours`
    (cache indices of its stage-1 top-K videos, nearest first; see [`stage_one_neighbours`]), one row of that video not
    drawn yet, until the block holds `block_size` rows. Every row appears once per epoch (a block is shorter when the
    anchor's neighbours have run out of rows). A DataLoader reading consecutive indices then gets batches whose
    captions and videos are each other's near duplicates, so that ALBEF's in-batch negatives
    ([`sample_hard_negatives`]) are the candidates re-ranking faces. The order follows `generator`, which the training
    loop seeds per epoch.
    """

    def __init__(self, row_videos: list[int], neighbours: torch.Tensor, block_size: int, generator: torch.Generator):
        self.row_videos, self.neighbours = row_videos, neighbours.tolist()
        self.block_size, self.generator = block_size, generator

    def __len__(self) -> int:
        return len(self.row_videos)

    def __iter__(self):
        order = torch.randperm(len(self.row_videos), generator=self.generator).tolist()
        unused = {}  # video -> its rows not drawn yet, in the epoch's random order
        for row in order:
            unused.setdefault(self.row_videos[row], []).append(row)
        for anchor in order:
            rows_of_anchor_video = unused[self.row_videos[anchor]]
            if anchor not in rows_of_anchor_video:
                continue  # drawn into an earlier block
            rows_of_anchor_video.remove(anchor)
            block = [anchor]
            for video in self.neighbours[anchor]:
                if len(block) == self.block_size:
                    break
                if unused.get(video):
                    block.append(unused[video].pop(0))
            yield from block


def set_trainable_parameters(model: CrossTVRModel, stage: int) -> list[str]:
    """Freeze everything but the stage's parameters (the separate stage-2 tower and the parameters no output depends
    on stay frozen); returns the names."""
    trainable, unused = [], set(model.unused_parameter_names())
    for name, parameter in model.named_parameters():
        top = name.split(".")[0]
        stage_two = top in STAGE_TWO_TRAINABLE_MODULES
        wanted = stage_two if stage == 2 else not stage_two and top != "fine_vision_model"
        wanted = wanted and name not in unused
        parameter.requires_grad_(wanted)
        if wanted:
            trainable.append(name)
    return trainable


def apply_lora(model: CrossTVRModel, args: TrainingArguments):
    """Wrap `model` with LoRA adapters on `args.lora_targets` (peft); the stage's small heads stay fully trainable."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules="|".join(f"({LORA_TARGETS[target]})" for target in args.lora_targets),
        modules_to_save=LORA_MODULES_TO_SAVE[args.stage],
    )
    return get_peft_model(model, config)


def parameter_groups(model: torch.nn.Module, args: TrainingArguments) -> list[dict]:
    """
    AdamW groups: no weight decay on biases, norms, embeddings-like parameters and LoRA adapters; in stage 1 the CLIP
    weights (towers, projections, temperature) at `learning_rate * pretrained_lr_scale`. LoRA adapters are new
    weights: they train at the full learning rate, without decay (peft's and the LoRA paper's setting).
    """
    groups = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        adapter = ".lora_" in name
        decay = parameter.ndim >= 2 and "norm" not in name.lower() and "embedding" not in name and not adapter
        local_name = name.split("base_model.model.")[-1]
        pretrained = args.stage == 1 and not adapter and local_name.split(".")[0] in PRETRAINED_STAGE_ONE_MODULES
        key = (decay, pretrained)
        groups.setdefault(key, []).append(parameter)
    return [
        {
            "params": params,
            "weight_decay": args.weight_decay if decay else 0.0,
            "lr": args.learning_rate * (args.pretrained_lr_scale if pretrained else 1.0),
        }
        for (decay, pretrained), params in groups.items()
    ]


def _checkpoint_dirs(output_dir: str) -> list[str]:
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    return sorted(
        (os.path.join(root, name) for name in os.listdir(root) if name.startswith("step-") and "." not in name),
        key=lambda path: int(os.path.basename(path).split("-")[1]),
    )


def _resolve_checkpoint(args: TrainingArguments) -> str | None:
    if args.resume_from_checkpoint is None:
        return None
    if args.resume_from_checkpoint == "latest":
        checkpoints = _checkpoint_dirs(args.output_dir)
        if not checkpoints:
            logger.warning("resume_from_checkpoint='latest' but %s has no checkpoint: starting anew", args.output_dir)
            return None
        return checkpoints[-1]
    if not os.path.isfile(os.path.join(args.resume_from_checkpoint, "trainer_state.json")):
        raise FileNotFoundError(f"{args.resume_from_checkpoint} is not a checkpoint folder (no trainer_state.json)")
    return args.resume_from_checkpoint


def check_distributed_type(distributed_type: DistributedType) -> None:
    """Refuse the parallelisms whose parameters are sharded (FSDP, DeepSpeed): the global-batch losses all-reduce
    gradients by hand (see [`global_batch_backward`]) and the final save reads whole weights."""
    if distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ValueError(
            f"crosstvr.train runs data-parallel (DDP) or on one device, not under {distributed_type.value}: its "
            "global-batch losses all-reduce whole gradients and its final save writes whole weights. Launch with "
            "`accelerate launch --multi_gpu` (or torchrun); a CrossTVR Base model fits one GPU, the frozen stage-2 "
            "tower is read from the token cache in stage 2."
        )


def _save_checkpoint(accelerator, args: TrainingArguments, state: dict) -> None:
    """accelerate's save_state into a temporary folder, renamed once complete; old checkpoints are pruned."""
    final = os.path.join(args.output_dir, "checkpoints", f"step-{state['global_step']:07d}")
    staging = final + ".partial"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(staging)
    if accelerator.is_main_process:
        with open(os.path.join(staging, "trainer_state.json"), "w", encoding="utf-8") as file:
            json.dump(state, file)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        if args.save_total_limit > 0:
            for old in _checkpoint_dirs(args.output_dir)[: -args.save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _negatives_generator(seed: int, micro_step: int) -> torch.Generator:
    """The same generator on every process at a given micro-step: all processes draw the same hard negatives."""
    return torch.Generator().manual_seed(seed * 1_000_003 + micro_step)


def _evaluate(accelerator, model, processor, args: TrainingArguments, dataset, step: int) -> dict | None:
    from .evaluation import evaluate_retrieval

    # Every process encodes and re-ranks its part of the split; the parts are gathered (no process idles at a barrier
    # while another evaluates alone).
    unwrapped = accelerator.unwrap_model(model)
    evaluation = evaluate_retrieval(
        unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped,
        processor,
        dataset[args.eval_split],
        rerank=args.stage == 2,
        top_k=args.eval_top_k,
        num_workers=args.num_workers,
        progress=accelerator.is_local_main_process,
        num_shards=accelerator.num_processes,
        shard_index=accelerator.process_index,
        gather=lambda value: gather_object([value]),
    )
    unwrapped.train()
    metrics = {
        f"eval/{name}/{metric}": value
        for name, values in evaluation.metrics.items()
        if values is not None
        for metric, value in values.items()
    }
    accelerator.log(metrics, step=step)  # trackers log on the main process only
    return metrics


def _model_inputs(batch: dict[str, torch.Tensor], stage: int) -> dict[str, torch.Tensor]:
    """What the model's forward takes from a collated batch (the video identities go to `video_ids`)."""
    inputs = {key: value for key, value in batch.items() if key != "video_index"}
    if stage == 1:
        inputs = {key: value for key, value in inputs.items() if not key.startswith(("qformer", "negative_"))}
    return {**inputs, "video_ids": batch["video_index"]}


def _gather(tensor: torch.Tensor, num_processes: int) -> torch.Tensor:
    """`tensor` of every process, concatenated along dim 0 (no gradient)."""
    return all_gather_no_grad(tensor, torch.distributed.group.WORLD) if num_processes > 1 else tensor


def _random_state(devices: list[torch.device]) -> tuple:
    """The CPU generator's state and those of `devices` (CUDA), to replay a forward's random draws."""
    return torch.random.get_rng_state(), [torch.cuda.get_rng_state(device) for device in devices]


def _set_random_state(state: tuple, devices: list[torch.device]) -> None:
    torch.random.set_rng_state(state[0])
    for device, device_state in zip(devices, state[1]):
        torch.cuda.set_rng_state(device_state, device)


def _sum_gradients_over_processes(parameters: list[torch.Tensor]) -> None:
    """All-reduce (sum) the gradients of `parameters` in one flat buffer; a missing gradient counts as zero."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = _flatten_dense_tensors(grads)
    torch.distributed.all_reduce(flat)
    for parameter, synced in zip(parameters, _unflatten_dense_tensors(flat, grads)):
        parameter.grad = synced


def global_batch_backward(
    accelerator,
    model,
    micro_batches: list[dict[str, torch.Tensor]],
    stage: int,
    generator: torch.Generator,
    listwise_loss_weight: float = 0.0,
) -> torch.Tensor:
    r"""
    Back-propagate the losses of the whole global batch — every process's micro-batches of one optimizer step — so
    that the gradients equal those of one device holding it (what the paper's batch of 128 on one GPU computes).

    - Stage 1, by gradient caching (GradCache, Gao et al., 2021): every micro-batch is embedded without a graph; the
      similarity head's loss of the global batch (symmetric InfoNCE; CRET's L_GEES + alpha L_CCM) is computed on the
      gathered embeddings E and differentiated with respect
      to E (and the temperature); then each micro-batch is embedded again with its graph, replaying its random state
      (token selection draws noise), and dL/dE of its rows is back-propagated through it.
    - Stage 2: stage 1 is frozen, so only the negatives need the global batch: they are drawn from the stage-1
      similarities of all rows, and each process scores the matching pairs of its own rows one micro-batch at a time,
      each chunk's loss normalised by the number of pairs of the global batch (and its listwise loss, with given
      negatives, by the number of rows).

    The gradients of all processes are then summed by hand (the DDP wrapper's reducer expects one forward per
    backward, which gradient caching does not do). Returns the step's loss.
    """
    unwrapped = accelerator.unwrap_model(model)
    num_processes, rank = accelerator.num_processes, accelerator.process_index
    parameters = [p for p in unwrapped.parameters() if p.requires_grad]
    inputs = [_model_inputs(batch, stage) for batch in micro_batches]
    rows = [len(batch["input_ids"]) for batch in inputs]
    offset = rank * sum(rows)  # this process's rows in the global batch (every process holds as many)
    video_ids = _gather(torch.cat([batch["video_ids"] for batch in inputs]), num_processes)
    positive_mask = video_ids.unsqueeze(1) == video_ids.unsqueeze(0)
    with accelerator.no_sync(model):
        if stage == 1:
            devices = [accelerator.device] if accelerator.device.type == "cuda" else []
            random_states, text_embeds, video_embeds = [], [], []
            with torch.no_grad(), accelerator.autocast():
                for batch in inputs:
                    random_states.append(_random_state(devices))
                    text_embeds.append(unwrapped.get_text_features(batch["input_ids"], batch.get("attention_mask")))
                    video_embeds.append(unwrapped.get_video_features(batch["pixel_values"], batch.get("video_mask")))
            local_text = torch.cat(text_embeds).float().requires_grad_()
            local_video = torch.cat(video_embeds).float().requires_grad_()
            # Other processes' embeddings are constants here; this process's own rows carry the gradient.
            all_text, all_video = _gather(local_text, num_processes), _gather(local_video, num_processes)
            own = slice(offset, offset + len(local_text))
            all_text = torch.cat([all_text[: own.start], local_text, all_text[own.stop :]])
            all_video = torch.cat([all_video[: own.start], local_video, all_video[own.stop :]])
            logit_scale = unwrapped.logit_scale.exp().clamp(max=100)  # scales the texts, as `forward` does
            loss = unwrapped.similarity_head.loss(all_text, all_video, logit_scale, positive_mask)
            accelerator.backward(loss)
            # Every process computed the temperature's gradient of the same global loss: count it once in the sum.
            for parameter in parameters:
                if parameter.grad is not None:
                    parameter.grad /= num_processes
            start = 0
            for batch, state in zip(inputs, random_states):
                stop = start + len(batch["input_ids"])
                with torch.random.fork_rng(devices=devices), accelerator.autocast():
                    _set_random_state(state, devices)
                    text = unwrapped.get_text_features(batch["input_ids"], batch.get("attention_mask"))
                    video = unwrapped.get_video_features(batch["pixel_values"], batch.get("video_mask"))
                torch.autograd.backward(
                    [text.float(), video.float()], [local_text.grad[start:stop], local_video.grad[start:stop]]
                )
                start = stop
        else:
            with torch.no_grad(), accelerator.autocast():
                text_embeds = torch.cat(
                    [unwrapped.get_text_features(b["input_ids"], b.get("attention_mask")) for b in inputs]
                )
            video_embeds = torch.cat([b["video_embeds"] for b in inputs]).to(text_embeds.dtype)
            logits_per_text = unwrapped.logit_scale.exp().clamp(max=100) * unwrapped.get_similarity(
                _gather(text_embeds, num_processes), _gather(video_embeds, num_processes)
            )
            negative_video, negative_text = sample_hard_negatives(logits_per_text, positive_mask, generator)
            keys = ("qformer_input_ids", "qformer_attention_mask", "vision_tokens", "video_mask")
            columns = [_gather(torch.cat([b[key] for b in inputs]), num_processes) for key in keys]
            given = inputs[0]["negative_vision_tokens"].shape[1] if "negative_vision_tokens" in inputs[0] else 0
            total_pairs = len(video_ids) * (3 + given)
            loss, start = 0.0, offset
            for batch in inputs:
                *pair_inputs, labels = matching_pair_inputs(
                    *columns,
                    negative_video,
                    negative_text,
                    slice(start, start + len(batch["input_ids"])),
                    batch.get("negative_vision_tokens"),
                    batch.get("negative_video_mask"),
                )
                with accelerator.autocast():
                    logits = unwrapped.get_fine_logits(*pair_inputs)
                chunk_loss = F.cross_entropy(logits.float(), labels, reduction="sum") / total_pairs
                if given:
                    listwise = listwise_matching_loss(logits, len(batch["input_ids"]), reduction="sum")
                    chunk_loss = chunk_loss + listwise_loss_weight * listwise / len(video_ids)
                accelerator.backward(chunk_loss)
                loss = loss + chunk_loss.detach()
                start += len(batch["input_ids"])
            if num_processes > 1:
                torch.distributed.all_reduce(loss)
    if num_processes > 1:
        _sum_gradients_over_processes(parameters)
    return loss.detach()


def train(args: TrainingArguments, callbacks: Sequence[Callable[[int, dict], None]] = ()) -> str:
    """
    Train one stage and write `<output_dir>/final` (a `save_pretrained` folder that loads with
    `trust_remote_code=True`; with LoRA, the adapters merged in) and, with LoRA, `<output_dir>/adapter`. `callbacks` are
    called with `(global_step, logs)` after every optimizer step. Returns the final folder.
    """
    from transformers import get_scheduler

    trackers = [JSONLinesTracker(os.path.join(args.output_dir, "logs.jsonl")), *args.report_to]
    # The scheduler counts optimizer steps; accelerate's default would step it once per process.
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=trackers,
        project_dir=args.output_dir,
        step_scheduler_with_optimizer=False,
    )
    check_distributed_type(accelerator.distributed_type)
    num_processes = accelerator.num_processes
    micro_batch = args.per_device_batch_size * num_processes
    if args.batch_size % micro_batch:
        raise ValueError(
            f"batch_size={args.batch_size} is not a multiple of per_device_batch_size x processes = {micro_batch}"
        )
    accumulation = args.batch_size // micro_batch
    if accelerator.gradient_accumulation_steps not in (1, accumulation):
        raise ValueError(
            f"accelerate was configured with gradient_accumulation_steps={accelerator.gradient_accumulation_steps}, "
            f"but batch_size={args.batch_size} / (per_device_batch_size={args.per_device_batch_size} x "
            f"{num_processes} processes) gives {accumulation}; set --batch_size / --per_device_batch_size instead"
        )
    set_seed(args.seed)
    model, processor = load_model(args.model_name_or_path)

    with accelerator.main_process_first():
        splits = [args.train_split] + ([args.eval_split] if args.do_eval and args.eval_split != args.train_split else [])
        dataset = load_retrieval_dataset(
            args.dataset,
            args.annotations_dir,
            args.videos_dir,
            splits=splits,
            on_bad_video=args.on_bad_video,
            check_videos=args.check_videos,
            cache_dir=args.dataset_cache_dir,
        )
    rows = dataset[args.train_split].with_format(None)
    if args.stage == 2:
        videos = list(dict.fromkeys(rows["video_path"]))
        if accelerator.is_main_process:
            build_token_cache(model, processor, videos, args.token_cache_dir, num_workers=args.num_workers)
        accelerator.wait_for_everyone()
        cache = TokenCache(args.token_cache_dir).check(model, processor)
        if args.hard_negatives == "stage1_top_k" or args.neighbour_batches:
            neighbours = stage_one_neighbours(model, processor, rows, cache, args.hard_negatives_top_k)
        if args.hard_negatives == "stage1_top_k":
            if neighbours.shape[1] < args.negatives_per_caption:
                raise ValueError(
                    f"negatives_per_caption={args.negatives_per_caption}, but the {args.train_split} split has only "
                    f"{neighbours.shape[1]} other videos per caption to draw from; lower negatives_per_caption"
                )
            rows = rows.add_column("negative_candidates", neighbours.tolist())
        collator = CachedVideoTextCollator(
            processor, cache, seed=args.seed, negatives_per_caption=args.negatives_per_caption
        )
    else:
        collator = VideoTextCollator(processor, sampling=args.train_frame_sampling, seed=args.seed)

    model.train()
    set_trainable_parameters(model, args.stage)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    if args.lora_targets:
        model = apply_lora(model, args)
    sampler_generator = torch.Generator()
    if args.neighbour_batches:
        row_videos = [cache.index[path] for path in rows["video_path"]]
        sampler = StageOneNeighbourSampler(row_videos, neighbours, args.neighbour_batches, sampler_generator)
    else:
        sampler = RandomSampler(rows, generator=sampler_generator)
    loader = DataLoader(
        rows,
        batch_size=args.per_device_batch_size,
        sampler=sampler,
        collate_fn=collator,
        num_workers=args.num_workers,
        drop_last=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    batches_per_epoch = len(loader) // num_processes
    if batches_per_epoch < accumulation:
        raise ValueError(
            f"the {args.train_split} split gives {len(loader)} micro-batches of {args.per_device_batch_size}, too few "
            f"for one step of {args.batch_size}; lower batch_size"
        )
    steps_per_epoch = batches_per_epoch // accumulation
    max_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    optimizer = torch.optim.AdamW(parameter_groups(model, args), lr=args.learning_rate)
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=int(args.warmup_ratio * max_steps),
        num_training_steps=max_steps,
    )
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    accelerator.init_trackers("crosstvr", config={k: str(v) for k, v in asdict(args).items()})

    global_step, epoch, steps_in_epoch = 0, 0, 0
    checkpoint = _resolve_checkpoint(args)
    if checkpoint is not None:
        accelerator.load_state(checkpoint)
        with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as file:
            state = json.load(file)
        global_step, epoch, steps_in_epoch = state["global_step"], state["epoch"], state["steps_in_epoch"]
        logger.info("resumed from %s at step %d (epoch %d)", checkpoint, global_step, epoch)

    progress = tqdm(
        total=max_steps, initial=global_step, desc=f"stage {args.stage}", disable=not accelerator.is_local_main_process
    )
    micro_step = global_step * accumulation
    while global_step < max_steps:
        sampler_generator.manual_seed(args.seed + epoch)  # the same data order for the same epoch, resumed or not
        collator.set_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(loader, steps_in_epoch * accumulation) if steps_in_epoch else loader
        pending = []
        for batch in epoch_loader:
            micro_step += 1
            pending.append(batch)
            if len(pending) < accumulation:
                continue
            generator = _negatives_generator(args.seed, micro_step)
            if accumulation > 1:
                loss = global_batch_backward(
                    accelerator, model, pending, args.stage, generator, args.listwise_loss_weight
                )
            else:
                outputs = model(
                    **_model_inputs(batch, args.stage),
                    listwise_loss_weight=args.listwise_loss_weight,
                    process_group=torch.distributed.group.WORLD if num_processes > 1 else None,
                    generator=generator,
                )
                loss = outputs.loss_contrastive if args.stage == 1 else outputs.loss_matching
                if outputs.loss_listwise is not None:
                    loss = loss + args.listwise_loss_weight * outputs.loss_listwise
                accelerator.backward(loss)
            pending = []
            if args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            global_step += 1
            steps_in_epoch += 1
            progress.update(1)
            logs = {"train/loss": loss.item(), "train/lr": max(scheduler.get_last_lr()), "train/epoch": epoch}
            if global_step % args.logging_steps == 0 or global_step == max_steps:
                accelerator.log(logs, step=global_step)
            if global_step % args.save_steps == 0:
                _save_checkpoint(
                    accelerator, args, {"global_step": global_step, "epoch": epoch, "steps_in_epoch": steps_in_epoch}
                )
            for callback in callbacks:
                callback(global_step, logs)
            if global_step >= max_steps or steps_in_epoch >= steps_per_epoch:
                break
        epoch, steps_in_epoch = epoch + 1, 0
        if args.do_eval:
            _evaluate(accelerator, model, processor, args, dataset, global_step)
    progress.close()
    final_dir = _save_final(accelerator, model, processor, args)
    accelerator.end_training()
    return final_dir


def _save_final(accelerator, model, processor: CrossTVRProcessor, args: TrainingArguments) -> str:
    """`<output_dir>/final` (LoRA merged) and, with LoRA, `<output_dir>/adapter`; written atomically."""
    final_dir = os.path.join(args.output_dir, "final")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        if args.lora_targets:
            unwrapped.save_pretrained(os.path.join(args.output_dir, "adapter"))
            unwrapped = unwrapped.merge_and_unload()
        staging = final_dir + ".partial"
        shutil.rmtree(staging, ignore_errors=True)
        unwrapped.save_pretrained(staging)
        processor.save_pretrained(staging)
        shutil.rmtree(final_dir, ignore_errors=True)
        os.replace(staging, final_dir)
    accelerator.wait_for_everyone()
    return final_dir
