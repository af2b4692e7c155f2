"""JA-VLM-Bench-In-the-Wild (SakanaAI/JA-VLM-Bench-In-the-Wild, split test): ROUGE-L.

One image, question and answer a row; llm-jp-eval-mm numbers the rows 0..N-1 as question ids.
"""

from __future__ import annotations

from .base import IMAGE_TAG, RowSource, Sample, Task, raw_text_field, required_image
from .registry import register_task


@register_task
class JaVLMBenchInTheWild(Task):
    name = "ja-vlm-bench-in-the-wild"
    title = "JA-VLM-Bench-In-the-Wild"
    hub_id = "SakanaAI/JA-VLM-Bench-In-the-Wild"
    split = "test"
    metric = "rouge-l-ja"
    judge_metric = "llm-as-a-judge"  # eval-mm's second metric; asked only with --judge-url
    required_columns = ("image", "question", "answer")
    schema_hint = "Expected (as on the hub): page_url, image_url, image, question, answer."

    def build_samples(self, source: RowSource) -> list[Sample]:
        samples = []
        for i, row in enumerate(source):
            where = f"{source.origin} row {i}"
            image = required_image(row["image"], source.base_dir, where)
            raw = self.text(row["question"], where, "question")
            question = raw.replace(IMAGE_TAG, "")
            samples.append(
                Sample(
                    id=str(i),
                    question=question,
                    reference=self.text(row["answer"], where, "answer"),
                    images=[image],
                    fields=raw_text_field(raw, question),
                )
            )
        return samples
