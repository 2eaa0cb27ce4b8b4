"""Train the testbed from scratch: UNet and text encoder jointly, with EMA, resumable checkpoints.

    python -m guard.testbed.train --out /tmp/testbed_run [--steps N] [--batch-size B] [--size tiny]

The run resumes from ``OUT/checkpoint.pt`` when it exists (model, EMA, optimizer, step, RNG states),
writes a checkpoint every ``--checkpoint-every`` steps, and exports the EMA weights as a diffusers
pipeline folder to ``OUT/pipeline`` at every checkpoint and at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .assets import MEMORIZED_DIR_NAME, MEMORIZED_INDEX, WEIGHTS_DIR, memorized_items, write_memorized_assets
from .model import PREDICTION_TYPE, PREDICTION_TYPES, build_text_encoder, build_unet, training_scheduler
from .tokenizer import build_tokenizer

CHECKPOINT = "checkpoint.pt"
EXPORT_DIR = "pipeline"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="run folder (checkpoints and exported pipeline)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--memorized-per-batch",
        type=int,
        default=5,
        help="rows of every batch that are memorized items (the duplication that makes copies)",
    )
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument(
        "--named-share",
        type=float,
        default=0.5,
        help="share of shape rows credited to a random made-up artist (see captions.py)",
    )
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--min-snr-gamma", type=float, default=5.0)
    parser.add_argument("--size", choices=["base", "tiny"], default="base")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--no-resume", action="store_true", help="start from scratch even if a checkpoint exists")
    parser.add_argument("--prediction-type", choices=PREDICTION_TYPES, default=PREDICTION_TYPE)
    parser.add_argument(
        "--init-from",
        default=None,
        help="checkpoint.pt of another run whose EMA weights start this one (fresh optimizer, step 0)",
    )
    parser.add_argument(
        "--init-unet-from",
        default=None,
        help="pipeline folder whose UNet weights start this run (text encoder fresh, step 0)",
    )
    parser.add_argument(
        "--assets",
        default=None,
        help="folder with memorized.json and PNGs (default: the shipped ones, rendered if absent)",
    )
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "checkpoint_every", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.memorized_per_batch < args.batch_size:
        parser.error("--memorized-per-batch must be in [0, batch-size)")
    if not 0.0 < args.ema_decay < 1.0:
        parser.error("--ema-decay must be in (0, 1)")
    if not 0.0 <= args.named_share <= 1.0:
        parser.error("--named-share must be in [0, 1]")
    if args.init_from and args.init_unet_from:
        parser.error("give at most one of --init-from and --init-unet-from")
    return args


class EMA:
    """Exponential moving average of parameters, with the usual warm-up so early steps are not frozen in."""

    def __init__(self, modules: dict[str, torch.nn.Module], decay: float):
        self.decay = decay
        self.shadow = {f"{k}.{n}": p.detach().clone() for k, m in modules.items() for n, p in m.named_parameters()}

    @torch.no_grad()
    def update(self, modules: dict[str, torch.nn.Module], step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for k, m in modules.items():
            for n, p in m.named_parameters():
                self.shadow[f"{k}.{n}"].lerp_(p.detach(), 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, modules: dict[str, torch.nn.Module]) -> None:
        for k, m in modules.items():
            for n, p in m.named_parameters():
                p.copy_(self.shadow[f"{k}.{n}"])


@torch.no_grad()
def load_matching(modules: dict[str, torch.nn.Module], weights: dict[str, torch.Tensor]) -> list[str]:
    """Copy ``weights`` (EMA-shadow naming, ``unet.<param>``) into parameters of the same name and shape.

    Parameters the source lacks keep their fresh initialisation, except the output projections of
    new attention blocks, which are zeroed: those blocks are residual, so the network starts out
    computing exactly what the source did. Returns the names that were not copied.
    """
    fresh = []
    for key, module in modules.items():
        for name, param in module.named_parameters():
            source = weights.get(f"{key}.{name}")
            if source is not None and source.shape == param.shape:
                param.copy_(source)
                continue
            fresh.append(f"{key}.{name}")
            if ".proj_out." in name:
                param.zero_()
    return fresh


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def export_pipeline(unet, text_encoder, tokenizer, ema: EMA, folder: Path, assets: Path, meta: dict) -> None:
    """Write the EMA weights as a diffusers pipeline folder, with the memorized items beside them."""
    import copy

    from .loading import assemble_pipeline

    ema_unet, ema_text = copy.deepcopy(unet), copy.deepcopy(text_encoder)
    ema.copy_to({"unet": ema_unet, "text_encoder": ema_text})
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    assemble_pipeline(
        ema_unet.eval(), ema_text.eval(), tokenizer, prediction_type=meta["prediction_type"]
    ).save_pretrained(tmp, safe_serialization=True)
    shutil.copy(assets / MEMORIZED_INDEX, tmp / MEMORIZED_INDEX)
    shutil.copytree(assets / MEMORIZED_DIR_NAME, tmp / MEMORIZED_DIR_NAME)
    (tmp / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def main(argv=None) -> Path:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    assets = Path(args.assets) if args.assets else WEIGHTS_DIR
    if not (assets / MEMORIZED_INDEX).is_file():
        write_memorized_assets(assets)
    items = memorized_items(assets)
    from .data import TrainingStream

    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer()
    unet = build_unet(args.size)
    text_encoder = build_text_encoder(tokenizer, args.size)
    modules = {"unet": unet, "text_encoder": text_encoder}
    params = [p for m in modules.values() for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    ema = EMA(modules, args.ema_decay)
    noise_scheduler = training_scheduler(args.prediction_type)
    alphas_cumprod = noise_scheduler.alphas_cumprod
    stream = TrainingStream(
        [it.image for it in items],
        [it.caption for it in items],
        seed=args.seed,
        memorized_per_batch=args.memorized_per_batch,
        caption_dropout=args.caption_dropout,
        named_share=args.named_share,
    )
    step, elapsed, losses = 0, 0.0, []

    checkpoint_path = out / CHECKPOINT
    if args.init_from and not (checkpoint_path.is_file() and not args.no_resume):
        source = torch.load(args.init_from, weights_only=False)
        fresh = load_matching(modules, source["ema"])
        ema = EMA(modules, args.ema_decay)
        print(
            f"initialised from the EMA weights of {args.init_from} (step {source['step']}); "
            f"{len(fresh)} parameters new to this architecture",
            flush=True,
        )
    if args.init_unet_from and not (checkpoint_path.is_file() and not args.no_resume):
        from diffusers import UNet2DConditionModel

        source_unet = UNet2DConditionModel.from_pretrained(args.init_unet_from, subfolder="unet")
        unet.load_state_dict(source_unet.state_dict())
        ema = EMA(modules, args.ema_decay)
        print(f"UNet initialised from {args.init_unet_from}; text encoder fresh", flush=True)
    if checkpoint_path.is_file() and not args.no_resume:
        state = torch.load(checkpoint_path, weights_only=False)
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        optimizer.load_state_dict(state["optimizer"])
        ema.shadow = state["ema"]
        step, elapsed, losses = state["step"], state["elapsed"], state["losses"]
        torch.set_rng_state(state["torch_rng"])
        stream.rng.bit_generator.state = state["numpy_rng"]
        print(f"resumed from {checkpoint_path} at step {step}", flush=True)

    def save(final: bool) -> None:
        recent = float(np.mean(losses[-100:])) if losses else float("nan")
        meta = dict(
            steps=step,
            batch_size=args.batch_size,
            size=args.size,
            seed=args.seed,
            lr=args.lr,
            memorized_per_batch=args.memorized_per_batch,
            caption_dropout=args.caption_dropout,
            named_share=args.named_share,
            ema_decay=args.ema_decay,
            min_snr_gamma=args.min_snr_gamma,
            threads=args.threads,
            prediction_type=args.prediction_type,
            init_from=args.init_from or args.init_unet_from,
            train_seconds=round(elapsed, 1),
            loss_last_100_steps=recent,
        )
        torch.save(
            dict(
                unet=unet.state_dict(),
                text_encoder=text_encoder.state_dict(),
                optimizer=optimizer.state_dict(),
                ema=ema.shadow,
                step=step,
                elapsed=elapsed,
                losses=losses,
                torch_rng=torch.get_rng_state(),
                numpy_rng=stream.rng.bit_generator.state,
                args=vars(args),
            ),
            out / (CHECKPOINT + ".tmp"),
        )
        (out / (CHECKPOINT + ".tmp")).replace(checkpoint_path)
        export_pipeline(unet, text_encoder, tokenizer, ema, out / EXPORT_DIR, assets, meta)
        print(
            f"step {step}: checkpoint and export written ({'final' if final else 'periodic'}), "
            f"loss(last 100) {recent:.4f}, {elapsed / 60:.1f} min",
            flush=True,
        )

    unet.train()
    text_encoder.train()
    progress = tqdm(total=args.steps, initial=step, desc="training", mininterval=20)
    while step < args.steps:
        start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        images, captions = stream.batch(args.batch_size)
        clean = torch.from_numpy(images)
        ids = tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (clean.shape[0],))
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        prediction = unet(noisy, timesteps, text_encoder(ids)[0]).sample
        # Min-SNR weighting: keeps the many near-noiseless timesteps from dominating the gradient.
        snr = alphas_cumprod[timesteps] / (1 - alphas_cumprod[timesteps])
        if args.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(clean, noise, timesteps)
            weight = torch.clamp(snr, max=args.min_snr_gamma) / (snr + 1)
        else:
            target = noise
            weight = torch.clamp(snr, max=args.min_snr_gamma) / snr
        loss = (weight * (prediction - target).pow(2).mean(dim=(1, 2, 3))).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema.update(modules, step)
        step += 1
        losses.append(loss.item())
        elapsed += time.perf_counter() - start
        progress.update(1)
        progress.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", refresh=False)
        if step % args.checkpoint_every == 0 or step == args.steps:
            save(final=step == args.steps)
    progress.close()
    if not (out / EXPORT_DIR).is_dir():
        save(final=True)
    return out / EXPORT_DIR


if __name__ == "__main__":
    main()
