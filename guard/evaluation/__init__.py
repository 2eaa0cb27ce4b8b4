"""The evaluation protocol of the GUARD paper (arXiv 2603.00133) as reusable pieces.

prompts: the public memorized-prompt lists as typed records (NeMo's lists ship in ``data/``; the
    others load from a folder), verbatim/template splits and the "unmitigated SSCD > 0.7" filter.
ground_truth: the user's training images by LAION index.
sscd / clip_score: the two image metrics (model files supplied by the user, never downloaded).
scorers: the runner's one scorer interface (name + score(prompt record, images) -> row fields).
fid: FID per method against reference images (torchmetrics, a TorchScript Inception the user names).
stats: mean with a 95% interval. generation: one seeded generator per image, batched pipeline calls.
runner: resumable generation and scoring of (prompt, method) pairs; sharding: multi-process launches.
results: the run directory's files. summary: the paper-style markdown table.
command / ``python -m guard.evaluation``: run, rescore, summarise.
"""

from .clip_score import ClipScorer, prompt_clip_score
from .embeddings import PromptScore, l2_normalize
from .fid import FIDScorer, fid_by_method, frechet_distance, load_feature_network
from .generation import Generation, PipelineGenerator, image_seed
from .ground_truth import GroundTruth, MissingGroundTruthError, find_ground_truth, open_images
from .prompts import (
    DATA_DIR_ENV,
    KINDS,
    LIST_SOURCES,
    PROMPT_SETS,
    PromptRecord,
    list_path,
    load_nemo_memorized,
    load_nemo_unmemorized,
    load_prompt_file,
    load_prompt_set,
    load_prompts,
    load_sd1_nonmemorized,
    load_sd2_memorized,
    load_sdv1_memorized,
    records_from_captions,
    reference_scores,
    resolve_data_dir,
    select_above,
    select_kind,
    split_by_kind,
)
from .runner import evaluate_prompts, pipeline_generate_fn, rescore
from .scorers import Scorer, clip_scorer, sscd_scorer
from .sharding import Shard, current_shard
from .sscd import SSCDScorer, prompt_sscd
from .sscd import preprocess as sscd_preprocess
from .stats import Interval, mean_interval, student_t_quantile
from .summary import SummaryRow, format_markdown, prompt_scores, summarise, summary_rows

__all__ = [
    "DATA_DIR_ENV",
    "KINDS",
    "LIST_SOURCES",
    "PROMPT_SETS",
    "ClipScorer",
    "FIDScorer",
    "Generation",
    "GroundTruth",
    "Interval",
    "MissingGroundTruthError",
    "PromptRecord",
    "PipelineGenerator",
    "PromptScore",
    "SSCDScorer",
    "Scorer",
    "Shard",
    "SummaryRow",
    "clip_scorer",
    "current_shard",
    "evaluate_prompts",
    "fid_by_method",
    "find_ground_truth",
    "format_markdown",
    "frechet_distance",
    "image_seed",
    "l2_normalize",
    "list_path",
    "load_feature_network",
    "load_nemo_memorized",
    "load_nemo_unmemorized",
    "load_prompt_file",
    "load_prompt_set",
    "load_prompts",
    "load_sd1_nonmemorized",
    "load_sd2_memorized",
    "load_sdv1_memorized",
    "mean_interval",
    "open_images",
    "pipeline_generate_fn",
    "prompt_clip_score",
    "prompt_scores",
    "prompt_sscd",
    "records_from_captions",
    "reference_scores",
    "rescore",
    "resolve_data_dir",
    "select_above",
    "select_kind",
    "split_by_kind",
    "sscd_preprocess",
    "sscd_scorer",
    "student_t_quantile",
    "summarise",
    "summary_rows",
]
