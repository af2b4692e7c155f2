"""Serving ConvLLaVA models with vLLM.

Road taken (issue 16): a model dir is exported to transformers' own FastVLM class
(`convert.export`, exact and verified) and vLLM serves that export with its Transformers backend
(`vllm serve OUT --model-impl transformers`); GPT-2 LLMs are exported as GPTBigCode, the same
network, which that backend loads completely. `launch` builds the `vllm serve` command line; it
never imports vLLM, which usually lives in its own virtual environment (it pins an older
transformers than this package needs).
"""
