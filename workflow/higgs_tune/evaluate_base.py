"""The base model's side of "did fine-tuning help?": :mod:`higgs_tune.evaluate` without an adapter.

CLI (stage ``evaluate_base``, as ``workflow/rules/evaluate.smk`` renders it): ``python -m
higgs_tune.evaluate_base --config-json ... --val V --index I --metrics M --generated G --audio D``
builds the base model (config ``model`` section, no LoRA), generates the first
``eval.generate.n_samples`` val rows with the same seeds and sampling as ``evaluate`` does for the
fine-tuned model, and scores them the same way (no ground-truth/codec calibration rows, no val
losses). Its rows are what ``evaluate --base-generated`` pairs the fine-tuned rows with.
"""

from __future__ import annotations

import logging

from .config import config_from_args
from .evaluate import EVALUATE_PATHS, run_evaluate
from .stage_cli import stage_parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = stage_parser("python -m higgs_tune.evaluate_base", __doc__.splitlines()[0], **EVALUATE_PATHS)
    args = parser.parse_args(argv)
    run_evaluate(config_from_args(args), adapter=None, val=args.val, index=args.index, metrics_out=args.metrics,
                 generated_out=args.generated, audio_dir=args.audio)


if __name__ == "__main__":
    main()
