"""`calibclip batch-evaluate`: one model on several datasets; a combined table (markdown, CSV,
JSON) and one recall@K plot."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from calibclip.cli.evaluate import add_common_arguments, dataset_choices

    choices = dataset_choices()

    p = sub.add_parser(
        "batch-evaluate",
        help="evaluate one model on several datasets into one table",
        description="Evaluate one model on several datasets (the i-th --data-roots entry is the folder of the "
        "i-th --datasets entry); writes results.{md,csv,json} and recall.png to --output-dir.",
    )
    p.add_argument(
        "--datasets",
        nargs="+",
        required=True,
        choices=choices,
        metavar="DATASET",
        help=f"datasets ({', '.join(choices)})",
    )
    p.add_argument("--data-roots", nargs="+", required=True, metavar="DIR", help="one folder per dataset")
    add_common_arguments(p)
    return p


def run(args: argparse.Namespace) -> int:
    from calibclip.cli.evaluate import config_from_args
    from calibclip.datasets import canonical_dataset, dataset_task
    from calibclip.evaluation.report import markdown_table, write_batch_report
    from calibclip.evaluation.runner import load_encoder, run_evaluation

    if len(args.datasets) != len(args.data_roots):
        raise ValueError(
            f"--datasets has {len(args.datasets)} entries but --data-roots has {len(args.data_roots)}: give one "
            "folder per dataset, in the same order"
        )
    if not args.output_dir:
        raise ValueError("give --output-dir for the combined table and plot")
    from pathlib import Path

    names = [canonical_dataset(d) for d in args.datasets]  # every name and root is checked before the first run
    missing = [f"{d}: {r}" for d, r in zip(names, args.data_roots) if not Path(r).is_dir()]
    if missing:
        raise FileNotFoundError(f"data root(s) not found: {'; '.join(missing)} (nothing was evaluated)")
    repeated = {d for d in names if names.count(d) > 1}
    cfg = config_from_args(args)
    model = args.checkpoint or args.model or cfg["model"]["name"]
    encoders: dict[str, object] = {}  # one encoder per task family (person may use another input size)
    results = []
    for dataset, root in zip(args.datasets, args.data_roots):
        task = dataset_task(canonical_dataset(dataset))
        if task not in encoders:
            m = cfg["model"]
            encoders[task] = load_encoder(model, task, m["device"], m["precision"], m.get("clip_image_size"))
        result = run_evaluation(
            dataset,
            root,
            cfg,
            model=model,
            split=args.split,
            encoder=encoders[task],  # type: ignore[arg-type]
            calibrate=args.calibrate,
            calibration_method=args.calibration_method,
            rerank=args.rerank,
            rerank_top_k=args.rerank_top_k,
        )
        if result["dataset"] in repeated:  # two roots of one dataset: tell the rows apart
            result["dataset"] = f"{result['dataset']} ({root})"
        results.append(result)
        print(
            f"{result['dataset']} ({result['split']}): "
            + ", ".join(f"{k} {v:.2f}" for k, v in result["metrics"].items())
        )
    paths = write_batch_report(results, args.output_dir)
    columns = ["dataset", "split", *dict.fromkeys(k for r in results for k in r["metrics"])]
    print(
        markdown_table([{"dataset": r["dataset"], "split": r["split"], **r["metrics"]} for r in results], columns),
        end="",
    )
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0
