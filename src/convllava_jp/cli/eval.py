"""`convllava-jp eval`: the arguments, and a thin call into `eval.runner` and `eval.report`.

Importing this module imports neither torch nor transformers: they load inside the command, after
the datasets have been checked, so `--help` and a wrong `--data` answer at once.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from ..errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_TASKS = "ja-vg-vqa-500,ja-vlm-bench-in-the-wild,heron-bench,jdocqa,synthetic"
DEFAULT_JUDGE_MODEL = "gpt-4o-2024-11-20"  # llm-jp-eval-mm's default judge

_DESCRIPTION = """\
Score models on the Japanese benchmarks exactly as llm-jp-eval-mm does, and print a summary table
beside published rows (the ConvLLaVA-JP article, llm-jp-eval-mm's leaderboard).

Tasks (`--list-tasks` prints every task with its metric and the local layout it expects):
  ja-vg-vqa-500             SakanaAI/JA-VG-VQA-500 [test], Japanese ROUGE-L (x100) + LLM judge 1-5
  ja-vlm-bench-in-the-wild  SakanaAI/JA-VLM-Bench-In-the-Wild [test], ROUGE-L + LLM judge 1-5
  heron-bench               Silviase/Japanese-Heron-Bench [train], LLM judge (needs --judge-url)
  jdocqa                    speed/JDocQA [test], exact match (containment) / BLEU per answer type
  synthetic                 the synthetic world's held-out split (needs --data synthetic=WORLD_DIR)
  also: cvqa, cc-ocr, jic-vqa, ja-multi-image-vqa, jmmmu, mecha-ja, jawildtext-board-vqa,
        jawildtext-handwriting-ocr, jawildtext-receipt-kie (eval-mm's ids; --tasks all)

Datasets load by hub id on a connected machine; elsewhere give a local copy with --data TASK=PATH:
a save_to_disk dir, a folder of the hub's parquet files, one .parquet, or .json/.jsonl. A copy
without the task's split is refused unless --allow-other-split (the split read is recorded).

Results go to OUTPUT/<task>/<model>/ (prediction.jsonl, evaluation.jsonl, judge.jsonl, run.json,
summary.json) and OUTPUT/summary.md + summary.csv. A rerun reuses every prediction made with the
same model files, prompt and decoding settings, and every judge verdict already logged (an
interrupted run resumes without paying twice); --rescore recomputes the scores from saved
predictions without loading any model. --judge-runs N asks the judge N times per item and reports
the mean and spread.
"""

_EPILOG = """\
examples:
  convllava-jp eval --model runs/stage3 --tasks synthetic --data synthetic=demo-output/world
  convllava-jp eval --model runs/stage3 --tasks ja-vg-vqa-500,heron-bench \\
      --data ja-vg-vqa-500=data/ja-vg-vqa-500 --data heron-bench=data/heron.parquet \\
      --judge-url https://api.openai.com --judge-model gpt-4o-2024-11-20
  convllava-jp eval --rescore --tasks heron-bench --judge-url http://localhost:8000 --judge-model qwen
"""


def _data_arg(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--data takes TASK=PATH, got {text!r}")
    return name, path


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _add_judge_arguments(p: argparse.ArgumentParser) -> None:
    j = p.add_argument_group(
        "LLM judge (any OpenAI-compatible /v1/chat/completions; a key only over https or loopback)"
    )
    j.add_argument("--judge-url", help="server root, its /v1, or the full chat-completions URL")
    j.add_argument(
        "--judge-model", default=DEFAULT_JUDGE_MODEL, help="judge model name (default: %(default)s)"
    )
    j.add_argument(
        "--judge-api-key-env",
        default="OPENAI_API_KEY",
        metavar="VAR",
        help="environment variable holding the judge's API key (default: %(default)s; unset = no key)",
    )
    j.add_argument("--judge-retries", type=int, default=5, help="retries per request (default: %(default)s)")
    j.add_argument(
        "--judge-timeout", type=float, default=60.0, help="seconds per request (default: %(default)s)"
    )
    j.add_argument(
        "--judge-runs",
        type=_positive_int,
        default=1,
        help="ask the judge N times per item; summaries give the mean and spread (default: %(default)s)",
    )
    j.add_argument(
        "--judge-workers",
        type=_positive_int,
        default=4,
        help="concurrent judge requests (default: %(default)s)",
    )


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="DIR|NAME=DIR",
        help="model dir to evaluate (repeat for several; results are filed under NAME, default the dir's "
        "name). With --rescore, names only (default: every model already under OUTPUT/<task>/)",
    )
    p.add_argument(
        "--tasks",
        default=DEFAULT_TASKS,
        help="comma-separated tasks, or 'all' (default: %(default)s)",
    )
    p.add_argument(
        "--data",
        action="append",
        type=_data_arg,
        default=[],
        metavar="TASK=PATH",
        help="local copy of a task's dataset (save_to_disk dir, parquet, json/jsonl); repeatable",
    )
    p.add_argument("--output", default="result", help="results root (default: %(default)s)")
    p.add_argument(
        "--batch-size", type=_positive_int, default=8, help="generation batch size (default: %(default)s)"
    )
    p.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        help="answer length cap for every task (default: each task's: 256 as llm-jp-eval-mm; synthetic 16)",
    )
    p.add_argument(
        "--temperature", type=float, default=0.0, help="0 = greedy, as the published numbers (default: 0)"
    )
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling when --temperature > 0")
    p.add_argument(
        "--limit",
        type=_positive_int,
        help="only the first N samples of each task (smoke runs; the saved results then hold those N)",
    )
    p.add_argument(
        "--rescore", action="store_true", help="recompute scores from saved predictions; load no model"
    )
    p.add_argument(
        "--no-cache", action="store_true", help="regenerate every prediction and ask the judge again"
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto (default: %(default)s)")
    p.add_argument(
        "--dtype",
        help="float32, bfloat16, float16 or auto (bfloat16 where the device has native bf16); bfloat16 "
        "on the CPU takes the fast path (default: as saved, exact)",
    )
    p.add_argument(
        "--template",
        help="chat template of the prompts: a name (llm-jp-v1, plain, llm-jp-3, qwen3, ...) or a .jinja file "
        "(default: the one the model was trained with, recorded in its dir, else llm-jp-v1)",
    )
    _add_judge_arguments(p)
    p.add_argument(
        "--allow-other-split",
        action="store_true",
        help="score a local copy's only split when it lacks the task's split (recorded as read)",
    )
    p.add_argument(
        "--rotate-choices",
        action="store_true",
        help="mecha-ja: ask each question once per rotation of its options (eval-mm's --rotate_choices)",
    )
    p.add_argument(
        "--list-tasks", action="store_true", help="list every task, its metric and data layout; exit"
    )
    p.add_argument("--no-reference", action="store_true", help="leave the published rows out of the table")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _task_list(text: str) -> list[str]:
    from ..eval.tasks import TASK_ALIASES, task_names

    names = task_names() if text.strip() == "all" else [t.strip() for t in text.split(",") if t.strip()]
    names = [TASK_ALIASES.get(n, n) for n in names]
    if not names:
        raise ConfigError("--tasks is empty")
    return list(dict.fromkeys(names))


def _judge_config(args: argparse.Namespace, tasks: Sequence[str]):
    from ..eval.tasks import get_task

    if not args.judge_url:
        if any(get_task(t).needs_judge for t in tasks):
            log.warning("no --judge-url: judged tasks' answers are generated and saved but not judged")
        return None
    from ..eval.judge import JudgeConfig

    return JudgeConfig(
        url=args.judge_url,
        model=args.judge_model,
        api_key_env=args.judge_api_key_env,
        max_retries=args.judge_retries,
        timeout_s=args.judge_timeout,
        max_workers=args.judge_workers,
    )


def cmd_eval(args: argparse.Namespace) -> int:
    """Run the eval described by parsed `args`; prints the summary table."""
    from ..eval.report import write_summary
    from ..eval.runner import EvalModel, EvalSettings, run_eval, saved_model_names

    if args.list_tasks:
        from ..eval.tasks import task_table

        print(task_table(), end="")
        return 0
    tasks = _task_list(args.tasks)
    data: dict[str, str] = {}
    for name, path in args.data:
        from ..eval.tasks import TASK_ALIASES

        data[TASK_ALIASES.get(name, name)] = path
    if args.rescore:
        names = args.model or saved_model_names(args.output, tasks)
        models = [EvalModel(EvalModel.parse(n).name, None) for n in names]
    else:
        if not args.model:
            raise ConfigError("give at least one --model DIR (or --rescore to rescore saved predictions)")
        models = [EvalModel.parse(m) for m in args.model]
    if len({m.name for m in models}) != len(models):
        raise ConfigError(
            f"two models share a name: {[m.name for m in models]}; use NAME=DIR to tell them apart"
        )
    settings = EvalSettings(
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        limit=args.limit,
        use_cache=not args.no_cache,
        device=args.device,
        dtype=args.dtype,
        template=args.template,
        show_progress=not args.no_progress,
        judge_runs=args.judge_runs,
        allow_other_split=args.allow_other_split,
        rotate_choices=args.rotate_choices,
    )
    judge = _judge_config(args, tasks)
    run_eval(models, tasks, args.output, settings, data=data, judge=judge, rescore=args.rescore)
    md_path, csv_path, tables = write_summary(args.output, include_article=not args.no_reference)
    print(tables.markdown, end="")
    print(f"\nwrote {md_path} and {csv_path}")
    return 0


def add_commands(sub) -> None:
    """Add `eval` to the `convllava-jp` subparsers."""
    p = sub.add_parser(
        "eval",
        help="score models on JA-VG-VQA-500, JA-VLM-Bench, Heron-Bench, JDocQA, synthetic (llm-jp-eval-mm scoring)",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(p)
    p.set_defaults(func=cmd_eval)
