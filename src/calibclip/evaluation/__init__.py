"""Evaluation: metrics (pure functions), the Evaluator, reports."""

# The CalibCLIP reference repository's names (thin aliases, see calibclip.evaluation.compat and docs/compat.md).
from calibclip.evaluation.compat import (
    RetrievalEngine,
    compute_ap,
    compute_map,
    compute_metrics,
    compute_minp,
    compute_minp_all,
    compute_rank,
    compute_similarity,
)
from calibclip.evaluation.evaluator import Evaluator, dataset_metrics, evaluate_retrieval, similarity_matrix
from calibclip.evaluation.metrics import (
    caption_metrics,
    iter_positive_ranks,
    positive_ranks,
    recall_at_k,
    retrieval_metrics,
)
from calibclip.evaluation.report import markdown_table, plot_recall, write_batch_report, write_report

__all__ = [
    "Evaluator",
    "caption_metrics",
    "dataset_metrics",
    "evaluate_retrieval",
    "iter_positive_ranks",
    "markdown_table",
    "plot_recall",
    "positive_ranks",
    "recall_at_k",
    "retrieval_metrics",
    "similarity_matrix",
    "write_batch_report",
    "write_report",
    # reference-repository aliases
    "RetrievalEngine",
    "compute_ap",
    "compute_map",
    "compute_metrics",
    "compute_minp",
    "compute_minp_all",
    "compute_rank",
    "compute_similarity",
]
