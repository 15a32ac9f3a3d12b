"""Gradients of CrossTVR's training losses on a fixed global batch, in one process or split over several.

    python tests/scripts/distributed_losses.py OUT.safetensors                                # one process
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 tests/scripts/distributed_losses.py OUT.safetensors

Each process takes its contiguous share of the global batch, runs `forward(process_group=...)` through the
DDP-wrapped model, and backpropagates; rank 0 writes the losses and the (DDP-averaged) gradients. The model is in eval
mode (hard token selection, no dropout) so that both runs compute exactly the same function.
"""

import os
import sys

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from safetensors.torch import save_file


sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from conftest import CrossTVRModelTester  # noqa: E402


GLOBAL_BATCH = 4


def main(output: str) -> None:
    # In eval mode the token selector's hard top-k passes no gradient to its scorer: those parameters go unused.
    accelerator = Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    tester = CrossTVRModelTester()
    model = tester.get_model(seed=0, temporal_aggregator="transformer").eval()
    inputs = tester.get_inputs(batch_size=GLOBAL_BATCH, seed=1)
    inputs["video_ids"] = torch.tensor([0, 1, 1, 2])  # two captions of video 1
    share = GLOBAL_BATCH // accelerator.num_processes
    rows = slice(accelerator.process_index * share, (accelerator.process_index + 1) * share)
    local = {key: value[rows] for key, value in inputs.items()}
    model = accelerator.prepare(model)
    group = torch.distributed.group.WORLD if accelerator.num_processes > 1 else None
    outputs = model(**local, process_group=group, generator=torch.Generator().manual_seed(7))
    accelerator.backward(outputs.loss_contrastive + outputs.loss_matching)
    # Every process holds a third of the pairs' matching loss; report the global mean like the gradient does.
    matching = accelerator.reduce(outputs.loss_matching.detach(), reduction="mean")
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        tensors = {f"grad/{name}": p.grad.detach().clone() for name, p in unwrapped.named_parameters() if p.grad is not None}
        tensors["loss_contrastive"] = outputs.loss_contrastive.detach().reshape(1)
        tensors["loss_matching"] = matching.reshape(1)
        save_file(tensors, output)


if __name__ == "__main__":
    main(sys.argv[1])
