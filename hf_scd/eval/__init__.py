"""Fidelity evaluation (DESIGN.md §4): held-out corpus, QA set, metrics, one transfer protocol, its methods, runner."""

from .baselines import KIVI, Int8KV, KVCoder, ProducerKV, RawKV, RowCoder
from .corpus import calibration_texts, evaluation_texts, token_documents
from .fidelity import Row, format_table, qa_scores, run_fidelity, teacher_forced_scores
from .kvtc import KVTC, KVTCBasis, parse_kvtc_name
from .metrics import mean_nll, next_token_kl, top1_agreement
from .qa import QAItem, qa_items, qa_prompt_split, token_f1
from .transfer import Recompute, Shipment, Transfer

__all__ = [
    "KIVI",
    "Int8KV",
    "KVCoder",
    "KVTC",
    "KVTCBasis",
    "ProducerKV",
    "QAItem",
    "RawKV",
    "Recompute",
    "RowCoder",
    "Row",
    "Shipment",
    "Transfer",
    "calibration_texts",
    "evaluation_texts",
    "format_table",
    "mean_nll",
    "next_token_kl",
    "parse_kvtc_name",
    "qa_items",
    "qa_prompt_split",
    "qa_scores",
    "run_fidelity",
    "teacher_forced_scores",
    "token_documents",
    "token_f1",
    "top1_agreement",
]
