"""JA-Multi-Image-VQA (SakanaAI/JA-Multi-Image-VQA, split test): several images a question, ROUGE-L
and (with a judge) eval-mm's llm-as-a-judge.

As eval-mm: ids are row numbers, the images are the `images` list in order, the model's text has
every "<image>" tag removed (its task drops "<image> ", its runner any "<image>") and the judge
sees the question as written.
"""

from __future__ import annotations

from collections.abc import Mapping

from ...errors import DataError
from .base import IMAGE_TAG, RowSource, Sample, Task, image_source, raw_text_field
from .registry import register_task


@register_task
class JaMultiImageVQA(Task):
    name = "ja-multi-image-vqa"
    title = "JA-Multi-Image-VQA"
    hub_id = "SakanaAI/JA-Multi-Image-VQA"
    split = "test"
    metric = "rouge-l-ja"
    judge_metric = "llm-as-a-judge"
    required_columns = ("images", "question", "answer")
    schema_hint = (
        "Expected (as on the hub): images (a list of images), question, answer, and its other columns."
    )
    layout = (
        "save_to_disk dir / hub parquet folder / .parquet / .json(l) with images (list), question, answer"
    )

    def build_samples(self, source: RowSource) -> list[Sample]:
        samples = []
        for i, row in enumerate(source):
            where = f"{source.origin} row {i}"
            cells = row["images"]
            if isinstance(cells, Mapping) or not isinstance(cells, (list, tuple)) or not cells:
                raise DataError(f"{where}: 'images' must be a non-empty list of images")
            images = [image_source(c, source.base_dir, f"{where} images[{k}]") for k, c in enumerate(cells)]
            if any(im is None for im in images):
                raise DataError(f"{where}: 'images' holds an empty cell")
            raw = self.text(row["question"], where, "question")
            question = raw.replace("<image> ", "").replace(IMAGE_TAG, "")
            samples.append(
                Sample(
                    id=str(i),
                    question=question,
                    reference=self.text(row["answer"], where, "answer"),
                    images=images,
                    fields=raw_text_field(raw, question),
                )
            )
        return samples
