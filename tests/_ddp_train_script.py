"""Run by tests/test_train_ddp.py as ``torchrun --standalone --nproc_per_node 2 tests/_ddp_train_script.py OUT [SHARDS]``.

Part 1 (gradient equivalence): every rank builds the same tiny SiT and the same global batch of 8 with
fixed random draws (posterior eps, t, noise, label drops). Each rank trains on its half through the real
``loss_from_latents`` + accelerate DDP with gradient accumulation 2 (micro-batch 2), clipping and AdamW; a plain
single-process copy trains on the whole batch of 8 in one go. After 3 steps the weights must agree.
Part 2 (end to end, only with SHARDS): ``train()`` with 2 processes for 4 steps, checkpoint at 2, then a
resumed run from step 2 to 4. Rank 0 writes OUT/result.json.
"""
import copy
import json
import os
import sys

import torch

torch.set_num_threads(1)

from repa.trainer.ema import make_ema, update_ema  # noqa: E402
from repa.trainer.loss import REPALoss  # noqa: E402
from repa.trainer.models import SiT  # noqa: E402
from repa.trainer.train import TrainConfig, loss_from_latents, make_accelerator, train  # noqa: E402

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, encoder_depth=1,
            z_dims=[16], projector_dim=32, num_classes=10, class_dropout_prob=0.1)


def gradient_equivalence(accelerator) -> float:
    rank, world = accelerator.process_index, accelerator.num_processes
    g = torch.Generator().manual_seed(123)
    B = 8
    batch = {"moments": torch.cat([torch.randn(B, 4, 8, 8, generator=g), torch.rand(B, 4, 8, 8, generator=g)], 1),
             "label": torch.randint(10, (B,), generator=g), "feat.0": torch.randn(B, 16, 16, generator=g)}
    scale, bias = torch.full((1, 4, 1, 1), 0.5), torch.zeros(1, 4, 1, 1)
    loss_fn = REPALoss()
    torch.manual_seed(0)
    model = SiT(**TINY)
    ref = copy.deepcopy(model)
    init = copy.deepcopy(model)
    ema, ref_ema = make_ema(model), make_ema(ref)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    ddp, opt = accelerator.prepare(model, opt)
    kw = dict(feats=["feat.0"], proj_coeff=0.5)

    def loss_with(model, part, d):  # the step with fixed draws: posterior eps, t, noise, label drop
        mean, std = part["moments"].float().chunk(2, dim=1)
        x0 = (mean + std * d["posterior"]) * scale + bias
        return loss_from_latents(model, loss_fn, part, x0, t=d["t"], noise=d["noise"], drop=d["drop"], **kw)
    for step in range(3):
        draws = {"posterior": torch.randn(B, 4, 8, 8, generator=g), "t": torch.rand(B, generator=g),
                 "noise": torch.randn(B, 4, 8, 8, generator=g), "drop": (torch.rand(B, generator=g) < 0.3).long()}
        # reference: one process, the whole global batch at once
        loss, _ = loss_with(ref, batch, draws)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)  # small max-norm: clipping is active
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        update_ema(ref_ema, ref, 0.9)
        # DDP: this rank's half, as 2 accumulated micro-batches of 2
        mine = slice(rank * B // world, (rank + 1) * B // world)
        for micro in range(2):
            sl = slice(mine.start + 2 * micro, mine.start + 2 * micro + 2)
            part = {k: v[sl] for k, v in batch.items()}
            ctx = accelerator.no_sync(ddp) if micro == 0 else torch.enable_grad()
            with ctx:
                loss, _ = loss_with(ddp, part, {k: v[sl] for k, v in draws.items()})
                accelerator.backward(loss / 2)
        accelerator.clip_grad_norm_(ddp.parameters(), 0.05)
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_ema(ema, accelerator.unwrap_model(ddp), 0.9)
    raw = accelerator.unwrap_model(ddp)
    diff = max((a - b).abs().max().item() for a, b in zip(raw.parameters(), ref.parameters()))
    ema_diff = max((a - b).abs().max().item() for a, b in zip(ema.parameters(), ref_ema.parameters()))
    moved = max((a - b).abs().max().item() for a, b in zip(ref.parameters(), init.parameters()))
    return {"max_param_diff": diff, "max_ema_diff": ema_diff, "moved": moved}


def main():
    out = sys.argv[1]
    shards = sys.argv[2] if len(sys.argv) > 2 else None
    cfg = TrainConfig(mixed_precision="no")
    accelerator = make_accelerator(cfg, None, False, out)
    result = {"world": accelerator.num_processes, "equiv": gradient_equivalence(accelerator)}
    if shards:
        common = dict(shards=shards, output_dir=out, model="SiT-S/2", batch_size=8, num_workers=0,
                      mixed_precision="no", sampling_steps=0, checkpointing_steps=2, encoder_depth=1,
                      model_kwargs={"depth": 2, "hidden_size": 32, "num_heads": 2, "projector_dim": 32})
        full = train(TrainConfig(exp_name="full", max_train_steps=4, **common))
        os.makedirs(os.path.join(out, "resumed", "checkpoints"), exist_ok=True)
        half = train(TrainConfig(exp_name="resumed", max_train_steps=2, **common))
        resumed = train(TrainConfig(exp_name="resumed", max_train_steps=4, resume="auto", **common))
        result.update(full=full, half=half, resumed=resumed)
    if accelerator.is_main_process:
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
