"""Benchmark tasks, one module each, registered by name (as llm-jp-eval-mm arranges them).

A task knows where its dataset is, which columns it needs, how a row becomes `Sample`s (question,
images, reference) and how per-sample scores are summarised. Adding a benchmark = one module with
a `Task` subclass decorated by `register_task`, imported below.
"""

from . import (  # noqa: F401  (each module registers its tasks)
    choice_tasks,
    heron_bench,
    ja_multi_image_vqa,
    ja_vg_vqa_500,
    ja_vlm_bench_in_the_wild,
    jawildtext,
    jdocqa,
    jmmmu,
    ocr_tasks,
    synthetic,
)
from .base import RowSource, Sample, Task, image_source, open_rows
from .registry import TASK_ALIASES, TASKS, get_task, register_task, task_names, task_table

__all__ = [
    "TASKS",
    "TASK_ALIASES",
    "RowSource",
    "Sample",
    "Task",
    "get_task",
    "image_source",
    "open_rows",
    "register_task",
    "task_names",
    "task_table",
]
