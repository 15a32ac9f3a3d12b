"""Gradients of one stage's training loss on a fixed global batch, in one process or split over several and over
accumulated micro-batches.

    python tests/scripts/distributed_losses.py OUT.safetensors STAGE MICRO_BATCHES [SIMILARITY_HEAD]   # one process
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 tests/scripts/distributed_losses.py OUT STAGE MICRO_BATCHES

Each process takes its contiguous share of the global batch. With one micro-batch it runs `forward(process_group=...)`
through the DDP-wrapped model and backpropagates; with several, `crosstvr.training.global_batch_backward` runs them as
one step. Rank 0 writes the step's loss and the gradients. Stage 2 reads precomputed stage-1 embeddings and stage-2
tokens, as from the token cache, with two given negative videos per caption and the listwise loss. The model is in eval mode (hard token selection, no dropout) so that every split
computes exactly the same function.
"""

import faulthandler
import os
import sys

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from safetensors.torch import save_file


sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from conftest import CrossTVRModelTester  # noqa: E402

from crosstvr.training import global_batch_backward  # noqa: E402


GLOBAL_BATCH = 8
LISTWISE_LOSS_WEIGHT = 0.5


def main(output: str, stage: int, micro_batches: int, similarity_head: str = "mean") -> None:
    # In eval mode the token selector's hard top-k passes no gradient to its scorer: those parameters go unused.
    accelerator = Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    tester = CrossTVRModelTester()
    model = tester.get_model(seed=0, temporal_aggregator="transformer", similarity_head=similarity_head).eval()
    inputs = tester.get_inputs(batch_size=GLOBAL_BATCH, seed=1)
    inputs["video_index"] = torch.tensor([0, 1, 1, 2, 3, 4, 4, 5])  # two captions of videos 1 and 4
    if stage == 1:
        inputs = {k: v for k, v in inputs.items() if not k.startswith("qformer")}
    else:
        with torch.no_grad():
            video = model.encode_video(inputs.pop("pixel_values"), inputs["video_mask"])
        inputs.update(video_embeds=video.video_embeds, vision_tokens=video.vision_tokens)
        rows = torch.arange(GLOBAL_BATCH).unsqueeze(1)
        negatives = torch.cat([(rows + 2) % GLOBAL_BATCH, (rows + 5) % GLOBAL_BATCH], dim=1)  # (batch, 2)
        inputs.update(negative_vision_tokens=video.vision_tokens[negatives], negative_video_mask=inputs["video_mask"][negatives])
    share = GLOBAL_BATCH // accelerator.num_processes
    local = {key: value[accelerator.process_index * share : (accelerator.process_index + 1) * share]
             for key, value in inputs.items()}
    model = accelerator.prepare(model)
    generator = torch.Generator().manual_seed(7)
    if micro_batches == 1:
        group = torch.distributed.group.WORLD if accelerator.num_processes > 1 else None
        outputs = model(**{k: v for k, v in local.items() if k != "video_index"}, video_ids=local["video_index"],
                        listwise_loss_weight=LISTWISE_LOSS_WEIGHT, process_group=group, generator=generator)
        loss = outputs.loss_contrastive
        if stage == 2:
            loss = outputs.loss_matching + LISTWISE_LOSS_WEIGHT * outputs.loss_listwise
        accelerator.backward(loss)
        loss = accelerator.reduce(loss.detach(), reduction="mean")  # a process's matching loss covers its own pairs
    else:
        rows = share // micro_batches
        batches = [{key: value[i * rows : (i + 1) * rows] for key, value in local.items()} for i in range(micro_batches)]
        loss = global_batch_backward(accelerator, model, batches, stage, generator, LISTWISE_LOSS_WEIGHT)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        tensors = {f"grad/{name}": p.grad.detach().clone() for name, p in unwrapped.named_parameters()
                   if p.grad is not None and p.grad.abs().sum() > 0}
        tensors["loss"] = loss.reshape(1)
        save_file(tensors, output)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    # A hang anywhere (a collective, the rendezvous) prints every thread's stack and fails the run instead of stalling
    # the test until its timeout with nothing to read.
    faulthandler.dump_traceback_later(240, exit=True)
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:])
    # Leave without the interpreter's finalization: tearing down gloo's worker threads there (or in
    # destroy_process_group) can abort or hang once in many runs (pytorch/pytorch#75097, #190489), and the results are
    # already on disk.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
