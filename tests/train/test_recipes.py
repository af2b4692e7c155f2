"""The article's recipes: its hyper-parameters, and the trainable counts per stage (meta device)."""

from __future__ import annotations

import pytest
import torch

from convllava_jp.errors import CheckpointError, ConfigError
from convllava_jp.model.modeling import ConvLlavaForConditionalGeneration, parameter_counts
from convllava_jp.model.presets import build_config
from convllava_jp.train.checkpoints import resolve_resume
from convllava_jp.train.freezing import apply_trainable
from convllava_jp.train.recipe import StageConfig, load_recipe
from convllava_jp.train.stages import train_recipe

RECIPES = ("convllava-jp-1.3b-768", "convllava-jp-1.3b-1280")

# Parameters of ConvLLaVA-JP-1.3b (the article's numbers), by hand:
STAGE5_DOWNSAMPLE = 3072 + (1536 * 3072 * 4 + 3072)  # LayerNorm2d(1536) + 2x2 conv to 3072
STAGE5_BLOCK = (3072 * 49 + 3072) + 2 * 3072 + (3072 * 12288 + 12288) + (12288 * 3072 + 3072) + 3072
STAGE5 = STAGE5_DOWNSAMPLE + 6 * STAGE5_BLOCK  # block: dwconv 7x7, LN, fc1, fc2, layer scale
PROJECTOR = (3072 * 2048 + 2048) + (2048 * 2048 + 2048)
GPT2_LAYER = (
    2 * 4096 + (2048 * 6144 + 6144) + (2048 * 2048 + 2048) + (2048 * 8192 + 8192) + (8192 * 2048 + 2048)
)
LLM = 50570 * 2048 + 2048 * 2048 + 24 * GPT2_LAYER + 4096 + 50570 * 2048  # wte, wpe, blocks, ln_f, lm_head
VISION_TRUNK = 196_227_264  # ConvNeXt-Large stages 1-4 (timm convnext_large without its head)


def test_hand_counts_are_the_articles_numbers():
    assert STAGE5 == 472_934_400
    assert PROJECTOR == 10_489_856
    assert LLM == 1_419_931_648
    assert round((VISION_TRUNK + STAGE5 + PROJECTOR + LLM) / 1e9, 2) == 2.10


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_matches_design_table(name):
    recipe = load_recipe(name)
    assert recipe.stage_names() == ["1", "2", "3"]
    assert recipe.model.llm == "llm-jp/llm-jp-1.3b-v1.0"
    assert recipe.model.vision == "hf-hub:laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft"
    assert recipe.model.preset == name
    s1, s2, s3 = (recipe.stages[k] for k in ("1", "2", "3"))
    assert [s.lr for s in (s1, s2, s3)] == [3e-4, 2e-5, 2e-5]
    assert [s.optimizer for s in (s1, s2, s3)] == ["adamw", "adamw_8bit", "adamw_8bit"]
    assert [s.template for s in (s1, s2, s3)] == ["plain", "plain", "llm-jp-v1"]
    assert [s.trainable for s in (s1, s2, s3)] == [
        ["stage5", "projector"],
        ["vision", "projector"],
        ["projector", "llm"],
    ]
    assert [s.data[0].path for s in (s1, s2, s3)] == [
        "turing-motors/LLaVA-Pretrain-JA",
        "turing-motors/LLaVA-Pretrain-JA",
        "turing-motors/LLaVA-v1.5-Instruct-620K-JA",
    ]
    for s in (s1, s2, s3):
        assert s.global_batch == 32 and s.epochs == 1 and s.schedule == "cosine"
        assert s.warmup_ratio == 0.03 and s.weight_decay == 0.0 and s.max_length == 1532
        assert s.precision == "auto" and s.gradient_checkpointing and s.lora is None
        assert s.data[0].text_field == "value"
        for world in (1, 2, 4, 8, 16, 32):  # global batch 32 however many GPUs share it
            per_device, accum = s.batch_plan(world)
            assert per_device * accum * world == 32 and per_device <= s.per_device_batch


@pytest.mark.parametrize("name", RECIPES)
def test_trainable_parameters_per_stage_on_the_meta_device(name):
    recipe = load_recipe(name)
    with torch.device("meta"):
        model = ConvLlavaForConditionalGeneration(build_config(recipe.model.preset))
    counts = parameter_counts(model)
    assert (counts["vision_trunk"], counts["stage5"], counts["projector"], counts["llm"]) == (
        VISION_TRUNK,
        STAGE5,
        PROJECTOR,
        LLM,
    )
    expected = {
        "1": {"vision_trunk": 0, "stage5": STAGE5, "projector": PROJECTOR, "llm": 0},
        "2": {"vision_trunk": VISION_TRUNK, "stage5": STAGE5, "projector": PROJECTOR, "llm": 0},
        "3": {"vision_trunk": 0, "stage5": 0, "projector": PROJECTOR, "llm": LLM},
    }
    for stage_name, stage in recipe.stages.items():
        got = apply_trainable(model, stage.trainable)
        assert got == {**expected[stage_name], "total": sum(expected[stage_name].values())}, stage_name
    assert expected["1"]["stage5"] + expected["1"]["projector"] == 483_424_256


def test_vars_point_the_recipe_at_local_data():
    recipe = load_recipe(
        "convllava-jp-1.3b-768",
        [
            "vars.pretrain_data=/data/ja/llava_pretrain_ja.jsonl",
            "vars.pretrain_images=/data/LLaVA-Pretrain",
            "vars.text_field=jp",
            "vars.output_root=/scratch/runs",
            "stages.3.lora.r=64",
        ],
    )
    data = recipe.stages["2"].data[0]
    assert (data.path, data.image_root, data.text_field) == (
        "/data/ja/llava_pretrain_ja.jsonl",
        "/data/LLaVA-Pretrain",
        "jp",
    )
    assert recipe.output_dir == "/scratch/runs/convllava-jp-1.3b-768"
    assert recipe.stages["3"].lora.r == 64 and recipe.stages["3"].lora.bits is None


def test_a_data_source_may_allow_image_paths_outside_its_root(tmp_path):
    from convllava_jp.data.records import DataSource

    assert all(not d.allow_outside_root for d in load_recipe("convllava-jp-1.3b-768").stages["2"].data)
    (tmp_path / "r.yaml").write_text(
        "name: t\nmodel: {init: /m}\noutput_dir: /o\nstages:\n"
        "  '1': {data: [{path: /d/a.json, allow_outside_root: true}, {path: /d/b.json}], max_steps: 1}\n",
        encoding="utf-8",
    )
    data = load_recipe(tmp_path / "r.yaml").stages["1"].data
    assert [d.allow_outside_root for d in data] == [True, False]
    assert data[0].image_path("/elsewhere/x.png").as_posix() == "/elsewhere/x.png"
    with pytest.raises(ConfigError, match="allow_outside_root must be true or false"):
        DataSource("/d/a.json", allow_outside_root="yes")


def test_numbers_in_exponent_notation_and_bad_numbers():
    # PyYAML reads `2e-3` (no dot) as text; the recipe must still take it as a number.
    recipe = load_recipe("tiny-synthetic", ["stages.3.lr=2e-3", "stages.1.lr_multipliers.vision=1e-1"])
    assert recipe.stages["3"].lr == pytest.approx(0.002)
    assert recipe.stages["1"].lr_multipliers["vision"] == pytest.approx(0.1)
    assert load_recipe("tiny-synthetic", ["stages.3.max_steps='12'"]).stages["3"].max_steps == 12
    lora = load_recipe("convllava-jp-1.3b-768", ["stages.3.lora.dropout=5e-2"]).stages["3"].lora
    assert lora.dropout == pytest.approx(0.05)
    for override, message in [
        ("stages.3.lr=fast", "lr must be a number, got 'fast'"),
        ("stages.3.lr=true", "lr must be a number"),
        ("stages.3.max_steps=1.5", "max_steps must be a whole number"),
        ("stages.3.max_steps=.inf", "max_steps must be a number"),
        ("stages.3.lr=nan", "lr must be a number"),
        ("stages.3.lr_multipliers.llm=x", "lr_multipliers.llm must be a number"),
        ("stages.3.lr_multipliers.llm=-1", "lr_multipliers.llm must be a number >= 0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_recipe("tiny-synthetic", [override])


def test_batch_plan_keeps_the_global_batch_or_says_what_to_do():
    stage = StageConfig(name="1", data=[{"path": "x.json"}], global_batch=32, per_device_batch=8)
    assert stage.batch_plan(1) == (8, 4)
    assert stage.batch_plan(8) == (4, 1)
    assert stage.batch_plan(2) == (8, 2)
    with pytest.raises(ConfigError, match="global_batch=64"):
        stage.batch_plan(64)
    odd = StageConfig(name="1", data=[{"path": "x.json"}], global_batch=24, per_device_batch=16)
    assert odd.batch_plan(1) == (12, 2)
    plain = StageConfig(name="1", data=[{"path": "x.json"}], per_device_batch=3, grad_accum=5)
    assert plain.batch_plan(4) == (3, 5)


def test_resume_arguments_are_checked(tmp_path):
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        resolve_resume(tmp_path, str(tmp_path / "checkpoint-7"))
    assert resolve_resume(tmp_path, True) is None
    (tmp_path / "checkpoint-3").mkdir()  # no trainer_state.json: never published, never resumed
    assert resolve_resume(tmp_path, True) is None
    recipe = load_recipe("convllava-jp-1.3b-768")
    with pytest.raises(ConfigError, match="resumes one stage"):
        train_recipe(recipe, "all", resume=str(tmp_path / "checkpoint-3"))
