import warnings

import architecture
import torch


def train(ctx):
    warnings.filterwarnings("ignore", category=UserWarning)
    model = architecture.build_model(ctx).to(ctx.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 50))
    for batch in ctx.iter_train_batches(model, batch_size=8, seq_len=128, with_logits=True):
        batch.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    with torch.no_grad():
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out = f"{ctx.artifacts_dir}/final.pt"
    torch.save(state, out)
