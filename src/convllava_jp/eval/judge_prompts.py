"""The judge prompts eval-mm uses (text reproduced so the judge sees exactly what it sees there),
how each reply is read, and a hash of each prompt template recorded beside every judged score.

- Heron-Bench (`heron-bench`): eval-mm's prompt since its March 2025 change (context, question,
  GPT-4o answer, model answer as a JSON-ish block; reply `{"score_gpt": int, "score": int}`).
- `llm-as-a-judge` (VG-VQA, JVB-ItW, JA-Multi-Image-VQA): a 1-5 score; eval-mm reads the first
  digit of the reply (no digit = 0) and never asks the judge about an empty answer (0).
- `jawildtext-board-vqa`: a yes/no grader; `correct: yes` = 1, anything else 0.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from .metrics import parse_judge_response

__all__ = [
    "HERON_SYSTEM",
    "JUDGE_SYSTEM_PROMPT",
    "board_vqa_messages",
    "build_judge_messages",
    "build_judge_prompt",
    "first_digit",
    "grader_verdict",
    "heron_parse",
    "llm_judge_messages",
    "prompt_sha",
]

HERON_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
JUDGE_SYSTEM_PROMPT = HERON_SYSTEM  # the old name

_HERON_HEAD = """
You are an expert evaluator. You are given the following information:
- Context: A description of the image.
- Question: A question about the image.
- GPT-4o Answer: GPT-4o's answer to the question.
- Model Answer: The target model's answer to the question.

Your task is to evaluate each answer independently based on how well it answers the question given the context.

Please assign a score from 1 to 10 for each answer according to the following guideline:
- 10: Perfect — Completely correct, relevant, and fully addresses the question based on the context.
- 8-9: Very Good — Mostly correct with only minor inaccuracies or slight omissions.
- 6-7: Good — Generally correct but contains noticeable errors or lacks important details.
- 4-5: Poor — Significant errors or missing key points, but some relevance remains.
- 1-3: Very Poor — Mostly or completely incorrect, irrelevant, or nonsensical.

Output Format (JSON):
Return the result in the following JSON format:
```json
{
    "score_gpt": int,
    "score": int
}
```
Do not output anything other than the JSON.

Input:
{
"""


def build_judge_prompt(context: str, question: str, reference: str, answer: str) -> str:
    """Heron-Bench's user message (eval-mm's layout: the values are inserted unquoted)."""
    return (
        _HERON_HEAD
        + f'    "context": {context},\n'
        + f'    "question": {question},\n'
        + f'    "gpt4o_answer": {reference},\n'
        + f'    "model_answer": {answer}\n'
        + "}\n\nOutput:\n"
    )


def build_judge_messages(context: str, question: str, reference: str, answer: str) -> list[dict[str, str]]:
    """Chat messages (system + user) for one Heron-Bench item."""
    return [
        {"role": "system", "content": HERON_SYSTEM},
        {"role": "user", "content": build_judge_prompt(context, question, reference, answer)},
    ]


def heron_parse(text: str) -> dict[str, float] | None:
    """{"score_gpt", "score"} from a Heron-Bench reply, or None (see `metrics.parse_judge_response`)."""
    scores = parse_judge_response(text)
    return None if scores is None else {"score_gpt": scores.score_gpt, "score": scores.score}


_LLM_JUDGE_SYSTEM = "You are an expert evaluator."


def build_llm_judge_prompt(question: str, answer: str, prediction: str) -> str:
    """eval-mm's `llm-as-a-judge` user message: the triplet and the 1-5 rubric."""
    return (
        "\nYou are an expert evaluator. You are given a (Question, Answer, Prediction) triplet. Your task "
        "is to evaluate how well the Prediction aligns with the Answer in the context of the Question.\n\n"
        "Please assign a score from 1 to 5 based on the following criteria:\n\n"
        "5: Excellent — The Prediction fully matches the Answer with complete correctness and relevance.\n"
        "4: Good — The Prediction is mostly correct with only minor inaccuracies or missing details.\n"
        "3: Fair — The Prediction is partially correct but contains noticeable errors or missing key points.\n"
        "2: Poor — The Prediction is mostly incorrect or irrelevant, but there are small fragments of correctness.\n"
        "1: Very Poor — The Prediction is completely incorrect or irrelevant.\n"
        "Output only the score (an integer from 1 to 5). Do not add any explanation.\n\n"
        f"Triplet:\nQuestion: {question}\nAnswer: {answer}\nPrediction: {prediction}\n\nYour Score:\n"
    )


def llm_judge_messages(question: str, answer: str, prediction: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": _LLM_JUDGE_SYSTEM},
        {"role": "user", "content": build_llm_judge_prompt(question, answer, prediction)},
    ]


_DIGIT = re.compile(r"\d")


def first_digit(text: str) -> int:
    """eval-mm's reading of a 1-5 verdict: the first digit (any script: "３" is 3) in the reply, else 0."""
    match = _DIGIT.search(text or "")
    return int(match.group()) if match else 0


_BOARD_SYSTEM = "あなたは回答の正誤を判定する専門家です。"


def build_board_vqa_prompt(question: str, gold: str, prediction: str) -> str:
    return (
        "あなたは回答の正誤を判定する専門家です。\n"
        "以下の[質問]に対する[正解]と、[モデルの回答]を比較し、正誤を判定してください。\n\n"
        f"[質問]: {question}\n[正解]: {gold}\n[モデルの回答]: {prediction}\n\n"
        "判定ルール:\n"
        "- 表記の揺れは許容してください（例: 2羽 vs 二羽, 8,000 vs 8000）\n"
        "- 数字の全角半角の違いは許容してください\n"
        "- 正解の内容を含んでいれば、追加の文脈があっても正解としてください\n"
        "- 正解と意味的に同じ回答であれば、言い回しが異なっていても正解としてください\n"
        "- 単位が質問から自明な場合、省略されていても正解としてください\n\n"
        "以下の形式のみで回答してください:\ncorrect: yes\nまたは\ncorrect: no\n"
    )


def board_vqa_messages(question: str, gold: str, prediction: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": _BOARD_SYSTEM},
        {"role": "user", "content": build_board_vqa_prompt(question, gold, prediction)},
    ]


_VERDICT = re.compile(r"correct\s*:\s*(yes|no)", re.IGNORECASE)


def grader_verdict(text: str) -> float:
    """1.0 when the grader's first `correct: yes|no` says yes, else 0.0 (eval-mm's reading)."""
    match = _VERDICT.search(text or "")
    return 1.0 if match and match.group(1).lower() == "yes" else 0.0


_TEMPLATES: dict[str, Any] = {
    "heron-judge": lambda: build_judge_messages("{context}", "{question}", "{reference}", "{answer}"),
    "llm-as-a-judge": lambda: llm_judge_messages("{question}", "{answer}", "{prediction}"),
    "jawildtext-board-vqa": lambda: board_vqa_messages("{question}", "{gold}", "{prediction}"),
}


def prompt_sha(metric: str) -> str:
    """sha256 (16 hex) of a judge metric's prompt template (system + user, placeholders in)."""
    messages = _TEMPLATES[metric]()
    text = "\n\x00\n".join(f"{m['role']}\n{m['content']}" for m in messages)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
