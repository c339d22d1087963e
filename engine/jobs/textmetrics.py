"""BLEU-4 and ROUGE-1/2/L of generated answers, as the seeds compute them.

Text is segmented with jieba (Chinese becomes words, English stays words), then BLEU-4 comes from
sacrebleu on the segmented tokens (no re-tokenization, exponential smoothing) and ROUGE from
rouge-chinese on the same tokens. Scores are percentages; the dataset score is the mean over samples.
"""

from __future__ import annotations

import logging

METRICS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")


def segment(text: str) -> list[str]:
    import jieba

    jieba.setLogLevel(logging.WARNING)
    return [t for t in jieba.cut(text) if t.strip()]


def sample_scores(prediction: str, reference: str) -> dict[str, float]:
    """BLEU-4 and ROUGE-1/2/L F1 (0-100) of one prediction against one reference."""
    import sacrebleu
    from rouge_chinese import Rouge

    hyp, ref = segment(prediction), segment(reference)
    if not hyp or not ref:
        return dict.fromkeys(METRICS, 0.0)
    bleu = sacrebleu.sentence_bleu(" ".join(hyp), [" ".join(ref)], tokenize="none").score
    rouge = Rouge().get_scores(" ".join(hyp), " ".join(ref))[0]
    return {"bleu-4": bleu, **{k: 100 * rouge[k]["f"] for k in ("rouge-1", "rouge-2", "rouge-l")}}


def mean_scores(rows: list[dict]) -> dict[str, float]:
    return {k: sum(r[k] for r in rows) / len(rows) for k in METRICS} if rows else {}
