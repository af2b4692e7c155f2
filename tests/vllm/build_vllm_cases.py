"""Build the vLLM parity cases in the MAIN venv: tiny random models, their exports, our answers.

    python tests/vllm/build_vllm_cases.py OUT [--questions N] [--demo-model DIR [--demo-world DIR]]

vLLM pins an older transformers than this package needs, so the reference answers come from
here: for each case OUT/<case>/ holds `model/` (ours) and, where the export can carry it, `hf/`
(`export --format transformers`); OUT/cases.json lists, per case, the prompts (rendered chat text
with one `<image>`), the image files, and `VLMPipeline`'s greedy prompt ids and answer ids (fp32).
`test_vllm_parity.py` (in the vLLM venv) serves each `model/` through our vLLM plugin and each
`hf/` through vLLM's Transformers backend, and compares token for token.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "convert"))
from test_export import build_model_dir  # noqa: E402  (the tiny model builder of the export tests)

from convllava_jp.convert.export import ExportError, export_model_dir  # noqa: E402
from convllava_jp.demo.world import generate_world  # noqa: E402
from convllava_jp.infer.generation import GenerationConfig, GenerationRequest, VLMPipeline  # noqa: E402
from convllava_jp.model.image_processing import ConvLlavaImageProcessor  # noqa: E402
from convllava_jp.model.model_dir import load_processor  # noqa: E402
from convllava_jp.model.processing import ConvLlavaProcessor  # noqa: E402

# The demo model's shape (tiny preset: GPT-2, pad, 128 px), one tiny model per other family, and
# what only the plugin serves: keep-aspect images (256 px long side, at most 10 tokens: 4 to 9
# tokens for the images below), here with a tied GPT-2 and a linear projector.
CASES = {
    "demo-gpt2": {"family": "gpt2", "mode": "pad"},
    "llama": {"family": "llama", "mode": "crop"},
    "qwen2": {"family": "qwen2", "mode": "pad"},
    "gpt_neox": {"family": "gpt_neox", "mode": "crop"},
    "keep-aspect": {"family": "gpt2", "mode": "keep-aspect", "tied": True, "projector": "linear"},
}
KEEP_ASPECT = {"image_size": 256, "max_image_tokens": 10}
QUESTIONS = ["図形はいくつありますか？", "何色ですか？", "左上にあるのは何ですか？", "円はありますか？"]


def _images(out: Path, world: Path, n: int) -> list[Path]:
    """n images: the world's scenes (192x128, not square), random squares at the model's size and
    random tall ones (300x80)."""
    scenes = sorted((world / "images").glob("*.png"))
    paths = []
    for i in range(n):
        if i % 2 == 0 and scenes:
            paths.append(scenes[i % len(scenes)])
            continue
        path = out / f"random_{i}.png"
        shape = (300, 80, 3) if i % 4 == 3 else (128, 128, 3)
        pixels = np.random.RandomState(i).randint(0, 256, shape, dtype=np.uint8)
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def _keep_aspect(model: Path) -> None:
    """Give a model dir keep-aspect images with `KEEP_ASPECT`'s size and token budget."""
    processor = load_processor(model)
    image_processor = ConvLlavaImageProcessor(mode="keep-aspect", stride=processor.stride, **KEEP_ASPECT)
    ConvLlavaProcessor(image_processor, processor.tokenizer).save_pretrained(model)


def _asked(images: list[Path]) -> list[tuple[str, Path]]:
    return [(QUESTIONS[i % len(QUESTIONS)], image) for i, image in enumerate(images)]


def _held_out(world: Path, n: int) -> list[tuple[str, Path]]:
    """The first n held-out questions of a demo world (test.json) with their scenes."""
    items = json.loads((world / "test.json").read_text(encoding="utf-8"))[:n]
    return [
        (it["conversations"][0]["value"].replace("<image>", "").strip(), world / it["image"]) for it in items
    ]


def build_case(
    out: Path, tokenizer: Path, asked: list[tuple[str, Path]], max_new_tokens: int, model_dir=None, **kw
):
    """Our model (or `model_dir`), its export where there is one, and VLMPipeline's greedy answers
    for each image."""
    out.mkdir(parents=True, exist_ok=True)
    if model_dir:
        model = Path(model_dir)
    else:
        model = build_model_dir(out / "model", tokenizer, **kw)
        if kw.get("mode") == "keep-aspect":
            _keep_aspect(model)
    try:
        hf_dir = str(export_model_dir(model, out / "hf"))
    except ExportError:  # keep-aspect, other projectors...: the plugin road only
        hf_dir = None
    pipe = VLMPipeline.from_pretrained(model, dtype="float32")
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    prompts = []
    for question, image in asked:
        messages = VLMPipeline.question_messages(question)
        request = GenerationRequest(messages, [str(image)])
        encoded = pipe.encode(request)
        # the ids themselves (not the text) so a stop at EOS is visible
        with torch.inference_mode():
            inputs = pipe.batch_inputs([encoded])
            ids = pipe.model.generate(**inputs, **pipe._hf_kwargs(config))[0, len(encoded.input_ids) :]
        answer = [int(t) for t in ids]
        end = next((j for j, t in enumerate(answer) if t in pipe.stop_token_ids), None)
        prompts.append(
            {
                "prompt": pipe.processor.render(messages, add_generation_prompt=True),
                "image": str(image),
                "prompt_ids": encoded.input_ids,
                "image_tokens": encoded.input_ids.count(pipe.model.config.image_token_id),
                "answer_ids": answer if end is None else answer[:end],
                "stopped": end is not None,
            }
        )
    return {
        "model_dir": str(model),
        "hf_dir": hf_dir,
        "image_token_id": pipe.model.config.image_token_id,
        # ids outside the vocabulary (GPT-2's default EOS 50256 in a tiny vocabulary) are never generated
        "stop_token_ids": [t for t in pipe.stop_token_ids if t < pipe.model.config.text_config.vocab_size],
        "max_new_tokens": max_new_tokens,
        "max_model_len": pipe.max_context,
        "prompts": prompts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--questions", type=int, default=6, help="prompts per model (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--demo-model", help="also check this trained model dir (e.g. demo-output/model)")
    parser.add_argument(
        "--demo-world", type=Path, help="ask the demo model its world's held-out questions (test.json)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    world = args.out / "world"
    if not (world / "tokenizer").is_dir():
        generate_world(world, 64, 16, seed=0, progress=False, n_pretrain_text=200)
    images = _images(args.out, world, args.questions)
    cases = {
        name: build_case(args.out / name, world / "tokenizer", _asked(images), args.max_new_tokens, **kw)
        for name, kw in CASES.items()
    }
    if args.demo_model:
        cases["demo-model"] = build_case(
            args.out / "demo-model",
            world / "tokenizer",
            _held_out(args.demo_world, args.questions) if args.demo_world else _asked(images),
            args.max_new_tokens,
            model_dir=args.demo_model,
        )
    (args.out / "cases.json").write_text(json.dumps(cases, ensure_ascii=False, indent=1))
    print(f"wrote {len(cases)} cases to {args.out / 'cases.json'}")


if __name__ == "__main__":
    main()
