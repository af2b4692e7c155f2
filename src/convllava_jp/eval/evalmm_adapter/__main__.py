"""`python -m convllava_jp.eval.evalmm_adapter` prints the folder to give eval-mm as `--adapter_dir`."""

from . import adapter_dir

print(adapter_dir())
