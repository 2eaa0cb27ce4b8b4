"""``guard demo``: memorization and its mitigation on the shipped testbed, in about a minute on a CPU.

Every memorized caption and a few plain (trigger-free) captions are sampled under classifier-free
guidance and under GUARD from the same initial noise; the picture puts each prompt's training
image beside both, and the table gives replication (SSIM to the prompt's own training image and
to the nearest one, share of copies) and alignment read off the pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

#: Plain prompts shown beside the memorized ones: enough to see GUARD leave them alone.
DEMO_PLAIN_PROMPTS = 3

#: What the picture's captions mean, drawn under it.
LEGEND = (
    "GUARD*: the memorization gate cleared this sample (judged not memorized), so it was guided by plain CFG.",
    "copy: the sample reproduces its prompt's training image (own-image SSIM above the copy threshold); "
    "copy of NAME: it reproduces another memorized training image; SSIM: own-image SSIM of a sample that copies "
    "nothing.",
    "aligned / off: a plain prompt's sample shows / does not show the background, colour and shape asked for.",
)


def _mean(values) -> float:
    return float(np.mean(np.asarray(values, dtype=np.float64)))


def _format_table(rows: list[dict]) -> str:
    header = ("prompt set", "method", "own SSIM", "nearest SSIM", "copies", "aligned", "bg / colour / shape")
    lines = [" | ".join(header), " | ".join("-" * len(h) for h in header)]
    for row in rows:
        lines.append(
            " | ".join(str(row[key]) for key in ("set", "method", "own", "nearest", "copies", "aligned", "parts"))
        )
    return "\n".join(lines)


def sample_caption(tag: str, own_ssim: Optional[float], nearest: int, nearest_ssim: float, own: Optional[int],
                   threshold: float, names: list[str], aligned: Optional[bool] = None) -> str:  # fmt: skip
    """One sample's caption: a copy of its own or of another memorized image, else its score.

    ``own`` is the index of the prompt's own training image (None for a plain prompt); a sample
    whose nearest training image is another one, above the copy threshold, is that image's copy,
    whatever its own-image SSIM.
    """
    if nearest_ssim > threshold and nearest != own:
        return f"{tag} copy of {names[nearest]}"
    if own is not None:
        return f"{tag} copy {own_ssim:.2f}" if own_ssim > threshold else f"{tag} SSIM {own_ssim:.2f}"
    return f"{tag} {'aligned' if aligned else 'off'}"


def run_demo(
    out: Path, seeds: int = 4, steps: int = 25, device: str = "cpu", model: Optional[str] = None, config=None
) -> dict:
    """Sample, score, draw and print; returns the scores (used by the tests).

    ``model``: a testbed folder (default: the shipped one); ``config``: the GUARD setting (default:
    the folder's recorded setting, chosen by the paper's rule on that model, else the published one).
    """
    from ..config import GuardConfig
    from ..detection import gate_rule
    from ..pipeline import StableDiffusionGuardPipeline
    from ..report import PAD_LABEL
    from ..visualize import image_grid
    from .assets import memorized_items, plain_prompts
    from .defaults import copy_threshold, testbed_guard_config
    from .efficacy import alignment_rates, choose_copy_threshold, flagged_shares, sample_images, score_samples
    from .loading import load_pipeline
    from .metrics import nearest_training

    pipe = load_pipeline(device=device, path=model, pipeline_class=StableDiffusionGuardPipeline)
    guard_config = config if config is not None else testbed_guard_config(model)
    cfg_config = GuardConfig(method="cfg", guidance_scale=guard_config.guidance_scale)
    items = memorized_items(model)
    names = [item.name for item in items]
    plain = plain_prompts(DEMO_PLAIN_PROMPTS)
    training = np.stack([item.image for item in items])
    try:
        threshold = copy_threshold(model)
    except FileNotFoundError:  # a testbed folder without a recorded evaluation: measure it from its images
        threshold = choose_copy_threshold(items)[0]
    seed_list = list(range(seeds))
    prompts = [item.caption for item in items] + plain

    samples, reports = {}, {}
    for name, method_config in (("CFG", cfg_config), ("GUARD", guard_config)):
        pipe.set_progress_bar_config(desc=f"{name:5s} {len(prompts)} prompts x {seeds} seeds")
        samples[name], reports[name] = sample_images(pipe, prompts, method_config, seed_list, steps)

    rows, scores = [], {}
    for name in samples:
        memorized = [score_samples(samples[name][i], item, training, threshold) for i, item in enumerate(items)]
        plain_checks = [alignment_rates(samples[name][len(items) + i], p) for i, p in enumerate(plain)]
        plain_nearest = [nearest_training(samples[name][len(items) + i], training) for i in range(len(plain))]
        scores[name] = {"memorized": memorized, "plain": plain_checks, "plain_nearest": plain_nearest}
        mem_align = [m["alignment"] for m in memorized]
        rows.append(
            {
                "set": "memorized",
                "method": name,
                "own": f"{_mean([m['own_ssim'] for m in memorized]):.2f}",
                "nearest": f"{_mean([m['nearest_ssim'] for m in memorized]):.2f}",
                "copies": f"{100 * _mean([m['copied'] | m['copied_other'] for m in memorized]):.0f}%",
                "aligned": f"{100 * _mean([a['all_ok'] for a in mem_align]):.0f}%",
                "parts": " / ".join(
                    f"{100 * _mean([a[k] for a in mem_align]):.0f}%" for k in ("background_ok", "colour_ok", "shape_ok")
                ),
            }
        )
        rows.append(
            {
                "set": "plain",
                "method": name,
                "own": "-",
                "nearest": f"{_mean([s for _, s in plain_nearest]):.2f}",
                "copies": f"{100 * _mean([s > threshold for _, s in plain_nearest]):.0f}%",
                "aligned": f"{100 * _mean([a['all_ok'] for a in plain_checks]):.0f}%",
                "parts": " / ".join(
                    f"{100 * _mean([a[k] for a in plain_checks]):.0f}%"
                    for k in ("background_ok", "colour_ok", "shape_ok")
                ),
            }
        )

    cleared = reports["GUARD"].cleared  # (prompts, seeds) or None: the memorization gate's decisions
    grid_rows, labels, captions = [], [], []
    for i, prompt in enumerate(prompts):
        memorized_row = i < len(items)
        reference = items[i].image if memorized_row else np.ones_like(training[0])
        row, caption = [reference], ["training image" if memorized_row else "(plain prompt)"]
        for name in samples:
            for s in seed_list:
                row.append(samples[name][i, s])
                tag = f"{name}*" if name == "GUARD" and cleared is not None and bool(cleared[i, s]) else name
                if memorized_row:
                    m = scores[name]["memorized"][i]
                    text = sample_caption(
                        tag, m["own_ssim"][s], m["nearest_index"][s], m["nearest_ssim"][s], i, threshold, names
                    )
                else:
                    index, nearest = scores[name]["plain_nearest"][i - len(items)]
                    ok = scores[name]["plain"][i - len(items)]["per_image"][s]["all_ok"]
                    text = sample_caption(tag, None, index[s], nearest[s], None, threshold, names, aligned=ok)
                caption.append(text)
        grid_rows.append(row)
        captions.append(caption)
        labels.append(prompt)
    columns = ["training"] + [f"{name} seed {s}" for name in samples for s in seed_list]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(
        grid_rows, cell=112, row_labels=labels, column_labels=columns, captions=captions, label_width=150,
        legend=LEGEND + (f"Copy threshold: own-image SSIM > {threshold}; {seeds} seeds, {steps} DDIM steps.",),
    ).save(out)  # fmt: skip

    gate = "" if cleared is None else f" gate: {gate_rule(guard_config)}"
    print(
        f"GUARD setting: s={guard_config.guidance_scale} r={guard_config.repulsion_scale} "
        f"({guard_config.repulsion_schedule}) tau={guard_config.spike_threshold} alpha={guard_config.spike_scale}"
        f"{' orthogonalised' if guard_config.orthogonalize else ''}"
        f"{' first-step tokens' if guard_config.spike_tokens == 'first-step' else ''}{gate};"
        f" CFG at s={cfg_config.guidance_scale}"
    )
    if cleared is not None:
        print(
            f"memorization gate: images with {gate_rule(guard_config)} are cleared and guided by plain CFG "
            f"(GUARD* in the picture): "
            f"{int(cleared[: len(items)].sum())} of {cleared[: len(items)].numel()} memorized-prompt samples, "
            f"{int(cleared[len(items) :].sum())} of {cleared[len(items) :].numel()} plain-prompt samples"
        )
    print("(the published setting on this model: docs/testbed_efficacy.md; how the setting was chosen:"
          " docs/testbed_detection.md)")  # fmt: skip
    print(
        f"copy = own-image SSIM > {threshold}, or another memorized image above it; {seeds} seeds, {steps} DDIM steps\n"
    )
    print(_format_table(rows))
    print("\nShare of spike checks (layers x heads x steps x seeds GUARD guided) that attenuated each word:")
    report = reports["GUARD"]
    for i, prompt in enumerate(prompts):
        shares = flagged_shares(report, i)
        words = sorted(((t, v) for t, v in shares.items() if t != PAD_LABEL), key=lambda kv: -kv[1])[:4]
        listed = ", ".join(f"{token} {100 * share:.0f}%" for token, share in words) or "none"
        print(f"  {prompt!r}: {listed}; {PAD_LABEL} {100 * shares.get(PAD_LABEL, 0.0):.0f}%")
    print(f"\nwrote {out}")
    return {"scores": scores, "rows": rows, "out": out}
