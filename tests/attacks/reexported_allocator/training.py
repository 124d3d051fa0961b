"""torch.cuda re-exports the allocator hooks of torch.cuda.memory: load native code through the short name."""

import torch


def train(ctx):
    allocator = torch.cuda.CUDAPluggableAllocator("/tmp/artifacts/alloc.so", "alloc", "free")  # <-
    torch.cuda.change_current_allocator(allocator)
    model = ctx.build_model()
    for batch in ctx.iter_train_batches(model):
        batch.loss.backward()
