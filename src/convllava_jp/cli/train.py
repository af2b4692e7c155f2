"""`convllava-jp synth | train | demo`: the synthetic world, training recipes, the built-in demo."""

from __future__ import annotations

import argparse
import json
import os

from ..demo import DEMO_TEST_IMAGES, DEMO_TRAIN_IMAGES, DEMO_VISION_STEPS


def cmd_synth(args: argparse.Namespace) -> int:
    from ..demo.world import generate_world

    info = generate_world(args.out, args.train, args.test, seed=args.seed, image_size=args.image_size)
    print(f"synthetic world in {args.out}: {args.train} train / {args.test} test images")
    print(json.dumps({"chance": info.chance}, ensure_ascii=False))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from ..train.recipe import load_recipe
    from ..train.stages import train_recipe

    recipe = load_recipe(args.recipe, overrides=args.set)
    resume: str | bool = args.resume if args.resume else not args.no_resume
    results = train_recipe(recipe, args.stage, resume=resume)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports
        return 0
    for r in results:
        print(
            f"stage {r.stage}: {r.steps} steps, final loss {r.final_loss:.4f}, {r.seconds:.0f} s -> {r.model_dir}"
        )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import print_demo_table, run_demo

    result = run_demo(
        args.output,
        n_train=args.train,
        n_test=args.test,
        seed=args.seed,
        step_scale=args.step_scale,
        overrides=args.set,
        threads=args.threads,
        vision_steps=args.vision_steps,
    )
    print_demo_table(result)
    return 0


def _add_synth(sub) -> None:
    p = sub.add_parser(
        "synth", help="generate the synthetic Japanese world (images, captions, QA, tokenizer)"
    )
    p.add_argument("--out", default="demo-output/world", help="output dir (default: %(default)s)")
    p.add_argument("--train", type=int, default=2000, help="training images (default: %(default)s)")
    p.add_argument("--test", type=int, default=400, help="held-out images (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=128)
    p.set_defaults(func=cmd_synth)


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a recipe's stages (each from the previous stage's output)",
        description="Train stages of a YAML recipe with the HF Trainer. Works unchanged under torchrun / "
        "accelerate launch. Resumes from the newest complete checkpoint of a stage unless --no-resume.",
    )
    p.add_argument(
        "--recipe", default="tiny-synthetic", help="recipe YAML path or built-in name (default: %(default)s)"
    )
    p.add_argument("--stage", default="all", help="1, 2, 3, a list '1,3', a range '2-3' or 'all' (default)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. --set lr=1e-4 --set stages.1.max_steps=10 (repeatable)",
    )
    p.add_argument("--resume", help="resume the (single) selected stage from this checkpoint dir")
    p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints and start over")
    p.set_defaults(func=cmd_train)


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the built-in demo: synthetic world -> 3 training stages on a tiny model -> held-out scores",
    )
    p.add_argument("--output", default="demo-output", help="output dir (default: %(default)s)")
    p.add_argument(
        "--train", type=int, default=DEMO_TRAIN_IMAGES, help="training images (default: %(default)s)"
    )
    p.add_argument(
        "--test", type=int, default=DEMO_TEST_IMAGES, help="held-out images (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-scale", type=float, default=1.0, help="multiply every stage's steps (smoke runs)")
    p.add_argument(
        "--vision-steps",
        type=int,
        default=DEMO_VISION_STEPS,
        help="steps (of 16 fresh scenes) of the vision tower's pretraining on the world, the demo's stand-in "
        "for CLIP (default: %(default)s)",
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe value (repeatable)")
    p.set_defaults(func=cmd_demo)


def add_commands(sub) -> None:
    """Add `synth`, `train` and `demo` to the `convllava-jp` subparsers."""
    _add_synth(sub)
    _add_train(sub)
    _add_demo(sub)
