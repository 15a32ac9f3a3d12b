"""Image-text pre-training on image-caption data: vision towers CLIP-style, then a Q-Former BLIP-2-style over them.

CrossTVR's stage 2 starts from a frozen vision tower and a Q-Former that were pre-trained on image-text pairs (CLIP or
EVA-CLIP for the tower, BLIP-2's first stage for the Q-Former). This module reproduces both steps on any image-caption
dataset, so that a user can pre-train on their own frames and captions, and the synthetic benchmark can run the real
regime in miniature:

- `task="contrastive"`: a dual encoder on the symmetric InfoNCE of CLIP. Any `CLIPModel`, or a
  `VisionTextDualEncoderModel` pairing another vision tower with a text tower (e.g. BLIP-2's EVA-style
  `Blip2VisionModel`, the tower family `--stage2-tower blip2` converts).
- `task="qformer"`: BLIP-2's representation-learning stage on a `Blip2ForImageTextRetrieval` whose vision tower stays
  frozen: image-text contrastive learning (ITC: the best of the query outputs against the text's [CLS] output) and
  image-text matching (ITM) on ALBEF's hard negatives. BLIP-2's third objective, image-grounded text generation, needs
  a causal text decoder that `Blip2ForImageTextRetrieval` does not have and that CrossTVR never uses; it is left out.
  The result is an ordinary `Blip2ForImageTextRetrieval` checkpoint: `hub_scripts/convert_checkpoint.py --blip2` takes
  it as it takes `Salesforce/blip2-itm-vit-g`.

Data is LAVIS's image-caption format, a JSON list of `{"image": path relative to the image root, "caption": str}`, with
an optional `"image_id"` and an optional `"group"`. Rows with the same `image_id` (by default, the same image file) show
the same image, as COCO's five captions of one image do: like rows with the same caption, they are not each other's
negatives (ALBEF and BLIP-2 mask negatives by image id the same way). Images of one group are near duplicates that
differ in fine details (e.g. the same frame of videos that differ in one detail). With `images_per_group > 0`, every
batch is made of whole groups, so that the batch holds the hard negatives that a web-scale batch of tens of thousands
would contain by chance.

Training runs on `transformers.Trainer`: its options (`output_dir`, `learning_rate`, `max_steps`, `save_steps`,
`resume_from_checkpoint`, `report_to`, ...) apply unchanged, on one process or under `accelerate launch`. The
contrastive losses are computed over each process's batch.

    python -m crosstvr.pretrain --task qformer --model_name_or_path START --train_file frames.json --image_root DIR \\
        --output_dir blip2-itm --images_per_group 4 --per_device_train_batch_size 64 --learning_rate 1e-3
"""

import json
import logging
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.data import Sampler
from transformers import Trainer

from .modeling_crosstvr import contrastive_loss, sample_hard_negatives


logger = logging.getLogger(__name__)

TASKS = ("contrastive", "qformer")


@dataclass
class PretrainingArguments:
    """What `python -m crosstvr.pretrain` trains and on what; the training schedule is transformers'
    `TrainingArguments`."""

    task: str = field(metadata={"help": f"one of {TASKS}"})
    model_name_or_path: str = field(
        metadata={"help": "checkpoint to start from, with its tokenizer and image processor"}
    )
    train_file: str = field(metadata={"help": "LAVIS-format JSON: [{'image': ..., 'caption': ..., 'group': ...}]"})
    image_root: str = field(metadata={"help": "folder the 'image' paths are relative to"})
    images_per_group: int = field(
        default=0, metadata={"help": "> 0: batches of whole groups, this many images of each (0: random batches)"}
    )
    max_text_length: int = field(default=32, metadata={"help": "tokens per caption (padded, truncated)"})
    itc_temperature: float = field(
        default=0.07, metadata={"help": "qformer: temperature of ITC (BLIP-2's initial value; the checkpoint has none)"}
    )
    uniform_negative_steps: int = field(
        default=0,
        metadata={
            "help": "qformer: ITM negatives drawn uniformly from the batch for the first N steps, then from the ITC "
            "similarities (ALBEF): a curriculum from coarse to fine matching"
        },
    )

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r} is not one of {TASKS}")


def load_image_text_records(train_file: str, image_root: str) -> list[dict]:
    """
    The records of a LAVIS-format annotation file, with `image` resolved against `image_root`, `image_id` defaulting
    to the resolved path (one file, one image) and `group` to the record's own index (no near duplicates). Raises one
    `FileNotFoundError` listing every missing image.
    """
    with open(train_file, encoding="utf-8") as file:
        records = json.load(file)
    if not isinstance(records, list) or not all({"image", "caption"} <= set(record) for record in records):
        raise ValueError(f"{train_file} must hold a JSON list of records with 'image' and 'caption' (LAVIS's format)")
    rows = []
    for index, record in enumerate(records):
        image = os.path.join(image_root, record["image"])
        rows.append({
            "image": image,
            "caption": record["caption"],
            "image_id": str(record.get("image_id", image)),
            "group": str(record.get("group", f"#{index}")),
        })
    missing = [row["image"] for row in rows if not os.path.isfile(row["image"])]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} images of {train_file} are missing under {image_root}, e.g. {missing[:5]}; check "
            "--image_root"
        )
    return rows


class ImageTextCollator:
    """Rows (`image`, `caption`, `image_id`, as [`load_image_text_records`] gives them) to model inputs: pixel values,
    tokenized captions, and `positive_mask`, True where two rows have the same caption or the same `image_id` (those are
    not each other's negatives: a caption of an image also describes every other row of that image)."""

    def __init__(self, image_processor, tokenizer, max_text_length: int = 32):
        self.image_processor, self.tokenizer, self.max_text_length = image_processor, tokenizer, max_text_length

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        from PIL import Image

        images = []
        for row in rows:
            with Image.open(row["image"]) as image:
                images.append(image.convert("RGB"))
        captions = [row["caption"] for row in rows]
        image_ids = [row["image_id"] for row in rows]
        same_image = torch.tensor([[a == b for b in image_ids] for a in image_ids])
        text = self.tokenizer(
            captions, padding="max_length", truncation=True, max_length=self.max_text_length, return_tensors="pt"
        )
        return {
            "pixel_values": self.image_processor(images=images, return_tensors="pt")["pixel_values"],
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
            "positive_mask": torch.tensor([[a == b for b in captions] for a in captions]) | same_image,
        }


class GroupedRandomSampler(Sampler[int]):
    """
    Indices in blocks of `images_per_group` from one group each, the blocks in random order: a DataLoader whose batch
    size is a multiple of `images_per_group` gets batches of whole groups. Each epoch every group contributes
    `len(group) // images_per_group` blocks (its other images wait for another epoch's draw). Seeded by `seed` and
    the epoch (`set_epoch`), so a resumed run sees the same order.
    """

    def __init__(self, groups: list[str], images_per_group: int, seed: int = 0):
        self.images_per_group, self.seed, self.epoch = images_per_group, seed, 0
        members = {}
        for index, group in enumerate(groups):
            members.setdefault(group, []).append(index)
        self.groups = [indices for _, indices in sorted(members.items())]
        if not any(len(indices) >= images_per_group for indices in self.groups):
            raise ValueError(f"no group has images_per_group={images_per_group} images; lower it")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(len(indices) // self.images_per_group for indices in self.groups) * self.images_per_group

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        blocks = []
        for indices in self.groups:
            shuffled = [indices[i] for i in torch.randperm(len(indices), generator=generator)]
            blocks += [shuffled[i : i + self.images_per_group] for i in range(0, len(shuffled) - self.images_per_group + 1, self.images_per_group)]
        for block in torch.randperm(len(blocks), generator=generator).tolist():
            yield from blocks[block]


def blip2_pretraining_losses(
    model,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positive_mask: torch.Tensor,
    temperature: float = 0.07,
    uniform_negatives: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    BLIP-2's first-stage losses on a batch of (image_i, text_i) pairs, over a frozen vision tower:

    - ITC: with query outputs z_i (N_Q per image) and the text's [CLS] output t_j, both projected and normalised,
      s_ij = max_q <z_iq, t_j> / temperature; the symmetric InfoNCE of [`contrastive_loss`].
    - ITM: for every image a negative text and for every text a negative image ([`sample_hard_negatives`] on s, or
      uniformly over the batch with `uniform_negatives`); the Q-Former runs on Concat(queries, text) with the queries
      cross-attending to the image, `itm_head` on every query output averaged; cross-entropy on the B positive and 2B
      negative pairs.

    Args:
        model: a `Blip2ForImageTextRetrieval`.
        positive_mask: `(batch, batch)` bool, True where text i also describes image j (e.g. equal captions).

    Returns:
        `(loss_itc, loss_itm)`.
    """
    with torch.no_grad():
        image_tokens = model.vision_model(pixel_values=pixel_values).last_hidden_state  # (B, tokens, width)
    num_queries = model.query_tokens.shape[1]
    queries = model.query_tokens.expand(len(image_tokens), -1, -1)  # (B, N_Q, hidden)
    query_outputs = model.qformer(query_embeds=queries, encoder_hidden_states=image_tokens).last_hidden_state
    image_features = F.normalize(model.vision_projection(query_outputs), dim=-1)  # (B, N_Q, D)
    text_outputs = model.qformer(
        query_embeds=model.embeddings(input_ids=input_ids), query_length=0, attention_mask=attention_mask
    ).last_hidden_state
    text_features = F.normalize(model.text_projection(text_outputs[:, 0]), dim=-1)  # (B, D)
    logits_per_text = torch.einsum("iqd,td->tiq", image_features, text_features).amax(dim=-1) / temperature
    loss_itc = contrastive_loss(logits_per_text, positive_mask)

    weights = torch.zeros_like(logits_per_text) if uniform_negatives else logits_per_text
    negative_image, negative_text = sample_hard_negatives(weights, positive_mask, generator)
    rows = torch.arange(len(input_ids), device=input_ids.device)
    text_index = torch.cat([rows, rows, negative_text])
    image_index = torch.cat([rows, negative_image, rows])
    labels = torch.cat([torch.ones_like(rows), torch.zeros_like(rows), torch.zeros_like(rows)])
    pair_queries = model.query_tokens.expand(len(text_index), -1, -1)
    fused = model.qformer(
        query_embeds=model.embeddings(input_ids=input_ids[text_index], query_embeds=pair_queries),
        query_length=num_queries,
        attention_mask=torch.cat([attention_mask.new_ones(pair_queries.shape[:2]), attention_mask[text_index]], dim=1),
        encoder_hidden_states=image_tokens[image_index],
    ).last_hidden_state  # (3B, N_Q + L, hidden)
    itm_logits = model.itm_head(fused[:, :num_queries]).mean(dim=1)  # (3B, 2)
    return loss_itc, F.cross_entropy(itm_logits, labels)


class ImageTextPretrainer(Trainer):
    """`transformers.Trainer` with the losses of [`PretrainingArguments.task`] and, with `images_per_group`, batches of
    whole groups."""

    def __init__(self, *args, pretraining_args: PretrainingArguments, groups: list[str], **kwargs):
        super().__init__(*args, **kwargs)
        self.pretraining_args, self.groups = pretraining_args, groups
        if pretraining_args.images_per_group and self.args.per_device_train_batch_size % pretraining_args.images_per_group:
            raise ValueError(
                f"per_device_train_batch_size={self.args.per_device_train_batch_size} must be a multiple of "
                f"images_per_group={pretraining_args.images_per_group}, so that batches hold whole groups"
            )

    def _get_train_sampler(self, train_dataset=None):
        if not self.pretraining_args.images_per_group:
            return super()._get_train_sampler(train_dataset)
        return GroupedRandomSampler(self.groups, self.pretraining_args.images_per_group, self.args.seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        positive_mask = inputs.pop("positive_mask")
        if self.pretraining_args.task == "contrastive":
            outputs = model(**inputs)
            loss = contrastive_loss(outputs.logits_per_text, positive_mask)
        else:
            loss_itc, loss_itm = blip2_pretraining_losses(
                model,
                **inputs,
                positive_mask=positive_mask,
                temperature=self.pretraining_args.itc_temperature,
                uniform_negatives=self.state.global_step < self.pretraining_args.uniform_negative_steps,
            )
            loss, outputs = loss_itc + loss_itm, {"loss_itc": loss_itc, "loss_itm": loss_itm}
        return (loss, outputs) if return_outputs else loss


def register_blip2_vision_tower() -> None:
    """Let `AutoModel` build BLIP-2's vision tower from its config, which `VisionTextDualEncoderModel` needs to pair it
    with a text tower (transformers maps `Blip2VisionConfig` to no auto class; this uses its registration API)."""
    from transformers import AutoModel, Blip2VisionConfig, Blip2VisionModel

    AutoModel.register(Blip2VisionConfig, Blip2VisionModel, exist_ok=True)


def load_pretraining_model(task: str, model_name_or_path: str):
    """The model, tokenizer and image processor of a pre-training task, from one checkpoint folder or Hub id."""
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, Blip2ForImageTextRetrieval

    register_blip2_vision_tower()
    if task == "qformer":
        model = Blip2ForImageTextRetrieval.from_pretrained(model_name_or_path)
        model.vision_model.requires_grad_(False)
    else:
        model_type = AutoConfig.from_pretrained(model_name_or_path).model_type
        if model_type not in ("clip", "vision-text-dual-encoder"):
            raise ValueError(
                f"{model_name_or_path} is a {model_type!r} model; the contrastive task trains a CLIPModel or a "
                "VisionTextDualEncoderModel"
            )
        from transformers import AutoModel

        model = AutoModel.from_pretrained(model_name_or_path)
    return model, AutoTokenizer.from_pretrained(model_name_or_path), AutoImageProcessor.from_pretrained(model_name_or_path)


def pretrain(pretraining_args: PretrainingArguments, training_args) -> str:
    """Run one pre-training task; the model, its tokenizer and image processor are saved to `output_dir` (safetensors).
    Returns `output_dir`."""
    from datasets import Dataset

    model, tokenizer, image_processor = load_pretraining_model(pretraining_args.task, pretraining_args.model_name_or_path)
    rows = load_image_text_records(pretraining_args.train_file, pretraining_args.image_root)
    training_args.remove_unused_columns = False  # the collator reads the image paths
    trainer = ImageTextPretrainer(
        model=model,
        args=training_args,
        train_dataset=Dataset.from_list(rows),
        data_collator=ImageTextCollator(image_processor, tokenizer, pretraining_args.max_text_length),
        pretraining_args=pretraining_args,
        groups=[row["group"] for row in rows],
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(training_args.output_dir)
        image_processor.save_pretrained(training_args.output_dir)
        # Trainer pickles its arguments next to the weights; the folder should load without unpickling anything.
        os.remove(os.path.join(training_args.output_dir, "training_args.bin"))
        with open(os.path.join(training_args.output_dir, "training_args.json"), "w", encoding="utf-8") as file:
            file.write(training_args.to_json_string())
    return training_args.output_dir
