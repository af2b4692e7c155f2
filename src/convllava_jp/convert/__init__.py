"""Turning other people's checkpoints into model directories of ours.

Used by the CLI (`init`, `convert-llava-jp`), by a recipe that starts from a preset
(`train/stages.py`) and by the tests; never to load or serve a model: `model/` must not import
this package. `convnext_keys` maps timm/open_clip ConvNeXt keys to transformers'
`ConvNextModel`, `vision_trunk` reads a pretrained trunk from its many homes, `init` builds the
stage-1 start model and `llava_jp` imports reference LLaVA-JP checkpoints.

Pickles are never loaded unless the caller says so (`allow_pickle`), and then only with
`torch.load(weights_only=True)`. Every key mismatch is an error that lists the keys.
"""
